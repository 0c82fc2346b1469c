"""The table of QMP commands and the generic argument check.

Each command is registered with a QAPI-style argument schema,
``{"name": "str", "*optional-name": "int", "list-arg": "[str]"}``, so the
dispatcher can reject missing, unexpected and mistyped arguments with the
same messages QEMU gives before any handler runs.  Device modules add their
own commands through `CommandTable.register`; they receive the table object
and never import this module or the server.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

# QMP error classes (qapi/error.json).
ERROR_GENERIC = "GenericError"
ERROR_COMMAND_NOT_FOUND = "CommandNotFound"
ERROR_DEVICE_NOT_ACTIVE = "DeviceNotActive"
ERROR_DEVICE_NOT_FOUND = "DeviceNotFound"
ERROR_KVM_MISSING_CAP = "KVMMissingCap"

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1

OPTIONAL_PREFIX = "*"


class QmpCommandError(Exception):
    """Raised by a handler (or the argument check) to produce an error reply.

    A handler may raise any exception: the server turns it into a
    GenericError whose desc is ``str(exc)``.  Raise this one, or any
    exception with a ``qmp_error_class`` attribute, to choose the class.
    """

    def __init__(self, desc: str, error_class: str = ERROR_GENERIC) -> None:
        super().__init__(desc)
        self.desc = desc
        self.qmp_error_class = error_class


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Scalar type name -> (predicate, name QEMU uses in "expected: ..." errors).
_SCALAR_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "str": (lambda v: isinstance(v, str), "string"),
    "int": (lambda v: _is_int(v) and INT64_MIN <= v <= INT64_MAX, "integer"),
    "uint64": (lambda v: _is_int(v) and 0 <= v <= UINT64_MAX, "uint64"),
    "size": (lambda v: _is_int(v) and 0 <= v <= UINT64_MAX, "size"),
    "number": (lambda v: _is_int(v) or isinstance(v, float), "number"),
    "bool": (lambda v: isinstance(v, bool), "boolean"),
    "object": (lambda v: isinstance(v, dict), "object"),
    "any": (lambda v: True, "any"),
}


@dataclass(frozen=True)
class ArgSpec:
    """One argument of a command: name, type name, and whether optional."""

    name: str
    type: str
    optional: bool = False

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "optional": self.optional}


def parse_schema(schema: Mapping[str, str] | None) -> tuple[ArgSpec, ...]:
    """Turn ``{"a": "str", "*b": "[int]"}`` into ArgSpecs; ValueError if bad."""
    specs: list[ArgSpec] = []
    seen: set[str] = set()
    for raw_name, type_name in (schema or {}).items():
        optional = raw_name.startswith(OPTIONAL_PREFIX)
        name = raw_name[1:] if optional else raw_name
        if not name or name in seen:
            raise ValueError(f"bad or duplicate argument name {raw_name!r}")
        if not isinstance(type_name, str) or not _type_known(type_name):
            raise ValueError(f"argument {name!r}: unknown type {type_name!r}")
        seen.add(name)
        specs.append(ArgSpec(name, type_name, optional))
    return tuple(specs)


def _type_known(type_name: str) -> bool:
    if type_name.startswith("[") and type_name.endswith("]"):
        return _type_known(type_name[1:-1])
    return type_name in _SCALAR_TYPES


def _check_value(path: str, type_name: str, value: Any) -> None:
    """Raise QmpCommandError if `value` does not have type `type_name`."""
    if type_name.startswith("["):
        if not isinstance(value, list):
            raise QmpCommandError(
                f"Invalid parameter type for '{path}', expected: array"
            )
        element_type = type_name[1:-1]
        for index, element in enumerate(value):
            _check_value(f"{path}[{index}]", element_type, element)
        return
    predicate, expected = _SCALAR_TYPES[type_name]
    if not predicate(value):
        raise QmpCommandError(
            f"Invalid parameter type for '{path}', expected: {expected}"
        )


def check_arguments(specs: tuple[ArgSpec, ...], arguments: Mapping[str, Any]) -> dict[str, Any]:
    """Check `arguments` against `specs` in declaration order, like QEMU's
    input visitor: first a missing or mistyped member, then any member the
    schema lacks.  Returns a plain copy of the arguments."""
    for spec in specs:
        if spec.name not in arguments:
            if spec.optional:
                continue
            raise QmpCommandError(f"Parameter '{spec.name}' is missing")
        _check_value(spec.name, spec.type, arguments[spec.name])
    known = {spec.name for spec in specs}
    for name in arguments:
        if name not in known:
            raise QmpCommandError(f"Parameter '{name}' is unexpected")
    return dict(arguments)


class CommandContext:
    """Per-call facts and hooks for handlers registered with takes_context."""

    def __init__(self, session: Any, table: "CommandTable") -> None:
        self.session = session
        self.table = table
        self._after_reply: list[Callable[[], None]] = []

    def after_reply(self, fn: Callable[[], None]) -> None:
        """Run `fn` once the reply has been written (e.g. `quit`)."""
        self._after_reply.append(fn)

    def take_after_reply(self) -> list[Callable[[], None]]:
        actions, self._after_reply = self._after_reply, []
        return actions


@dataclass(frozen=True)
class Command:
    """One registered command."""

    name: str
    handler: Callable[..., Any]
    args: tuple[ArgSpec, ...] = ()
    help: str = ""
    takes_context: bool = False
    # Only qmp_capabilities may run in capabilities-negotiation mode.
    negotiation: bool = False

    def run(self, arguments: Mapping[str, Any], ctx: CommandContext) -> Any:
        checked = check_arguments(self.args, arguments)
        if self.takes_context:
            return self.handler(checked, ctx)
        return self.handler(checked)


class CommandTable:
    """Name -> Command, safe to extend while the server runs.

    ``table.register("query-foo", handler, {"id": "str", "*verbose": "bool"})``
    where ``handler(args: dict) -> JSON-able result`` (None means ``{}``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Replaced, never mutated, so readers need no lock.
        self._commands: dict[str, Command] = {}

    def register(
        self,
        name: str,
        handler: Callable[..., Any],
        args: Mapping[str, str] | None = None,
        *,
        help: str = "",
        takes_context: bool = False,
        negotiation: bool = False,
    ) -> None:
        """Add a command; ValueError on a duplicate name or a bad schema."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"bad command name {name!r}")
        if not callable(handler):
            raise ValueError(f"command {name!r}: handler is not callable")
        command = Command(
            name=name,
            handler=handler,
            args=parse_schema(args),
            help=help,
            takes_context=takes_context,
            negotiation=negotiation,
        )
        with self._lock:
            if name in self._commands:
                raise ValueError(f"command {name!r} is already registered")
            updated = dict(self._commands)
            updated[name] = command
            self._commands = updated

    def unregister(self, name: str) -> None:
        """Remove a command (e.g. when its device is unplugged)."""
        with self._lock:
            if name not in self._commands:
                raise KeyError(name)
            updated = dict(self._commands)
            del updated[name]
            self._commands = updated

    def command(
        self, name: str, args: Mapping[str, str] | None = None, **options: Any
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator form of `register`."""

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.register(name, fn, args, **options)
            return fn

        return decorate

    def get(self, name: str) -> Command | None:
        return self._commands.get(name)

    def names(self) -> list[str]:
        return list(self._commands)

    def __contains__(self, name: object) -> bool:
        return name in self._commands

    def __iter__(self) -> Iterator[Command]:
        return iter(list(self._commands.values()))

    def __len__(self) -> int:
        return len(self._commands)
