"""The human monitor (HMP) behind QMP's `human-monitor-command`.

Two tables: top-level commands (`info`, `help`, `stop`, ...) and the `info`
subcommands.  Both are filled by registration, so a device module adds
``info memory-devices`` with ``hmp.register_info(name, handler, help)``.
Output follows QEMU's monitor: plain text, each line ended by CRLF, and
errors are text too ("unknown command: 'info foo'"), never QMP errors.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("pyvmm.qmp.hmp")

INFO_COMMAND = "info"
HELP_COMMAND = "help"


@dataclass(frozen=True)
class HmpCommand:
    """A top-level command or an `info` subcommand."""

    name: str
    handler: Callable[..., str]
    help: str = ""
    params: str = ""
    aliases: tuple[str, ...] = ()
    # When False, text after the name is an error (QEMU's "extraneous
    # characters") and the handler is called without it.
    takes_args: bool = False

    def call(self, args: str) -> str:
        return self.handler(args) if self.takes_args else self.handler()

    def label(self) -> str:
        return "|".join((self.name,) + self.aliases)


def _split_word(text: str, start: int) -> tuple[int, int]:
    """(begin, end) of the first whitespace-delimited word at/after start."""
    begin = start
    while begin < len(text) and text[begin].isspace():
        begin += 1
    end = begin
    while end < len(text) and not text[end].isspace():
        end += 1
    return begin, end


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def to_monitor_text(text: str) -> str:
    """Line ends as QEMU's monitor sends them: every newline becomes CRLF."""
    return text.replace("\r\n", "\n").replace("\n", "\r\n")


class HmpTable:
    """Registered HMP commands and `info` subcommands; thread safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._commands: dict[str, HmpCommand] = {}  # name or alias -> command
        self._info: dict[str, HmpCommand] = {}
        # `info` is dispatched by _execute itself (its argument selects a
        # subcommand); the entry makes it known to lookup and help.
        self.register(
            INFO_COMMAND,
            self._info_help,
            "show various information about the system state",
            params="[subcommand]",
        )
        self.register(
            HELP_COMMAND,
            self._do_help,
            "show the help",
            params="[cmd]",
            aliases=("?",),
            takes_args=True,
        )

    # -- registration -----------------------------------------------------

    def register(
        self,
        name: str,
        handler: Callable[..., str],
        help: str = "",
        *,
        params: str = "",
        aliases: tuple[str, ...] = (),
        takes_args: bool = False,
    ) -> None:
        """Add a top-level command; `handler(args)` if takes_args else `handler()`."""
        command = HmpCommand(name, handler, help, params, tuple(aliases), takes_args)
        with self._lock:
            self._commands = self._added(self._commands, command)

    def register_info(
        self,
        name: str,
        handler: Callable[..., str],
        help: str = "",
        *,
        takes_args: bool = False,
    ) -> None:
        """Add ``info NAME``; the handler returns the text to show."""
        command = HmpCommand(name, handler, help, takes_args=takes_args)
        with self._lock:
            self._info = self._added(self._info, command)

    def unregister_info(self, name: str) -> None:
        with self._lock:
            if name not in self._info:
                raise KeyError(name)
            self._info = {k: v for k, v in self._info.items() if k != name}

    @staticmethod
    def _added(table: dict[str, HmpCommand], command: HmpCommand) -> dict[str, HmpCommand]:
        keys = (command.name,) + command.aliases
        for key in keys:
            if not key or any(c.isspace() for c in key):
                raise ValueError(f"bad HMP command name {key!r}")
            if key in table:
                raise ValueError(f"HMP command {key!r} is already registered")
        updated = dict(table)
        for key in keys:
            updated[key] = command
        return updated

    def info_names(self) -> list[str]:
        return sorted(self._info)

    def command_names(self) -> list[str]:
        return sorted({c.name for c in self._commands.values()})

    # -- execution --------------------------------------------------------

    def execute(self, command_line: str) -> str:
        """Run one monitor line and return its output, CRLF line ends."""
        return to_monitor_text(self._execute(command_line))

    def _execute(self, line: str) -> str:
        begin, end = _split_word(line, 0)
        if begin == end:
            return ""  # a blank line does nothing, as in QEMU
        command = self._commands.get(line[begin:end])
        if command is None:
            return f"unknown command: '{line[:end]}'\n"
        if command.name == INFO_COMMAND:
            sub_begin, sub_end = _split_word(line, end)
            if sub_begin == sub_end:
                return self._info_help()
            sub = self._info.get(line[sub_begin:sub_end])
            if sub is None:
                return f"unknown command: '{line[:sub_end]}'\n"
            return self._run(sub, line, sub_end)
        return self._run(command, line, end)

    def _run(self, command: HmpCommand, line: str, name_end: int) -> str:
        args_at = _skip_space(line, name_end)
        args = line[args_at:].rstrip()
        if args and not command.takes_args:
            return (
                f"{command.name}: extraneous characters at the end of line\n"
                f'Try "help {line[:name_end].strip()}" for more information\n'
            )
        try:
            text = command.call(args)
        except Exception as exc:  # a bad handler must not break the monitor
            log.exception("HMP command %r failed", line)
            return f"Error: {exc or type(exc).__name__}\n"
        if not isinstance(text, str):
            log.error("HMP command %r returned %r, not text", line, type(text))
            return f"Error: {command.name} returned no text\n"
        return text

    # -- built-ins --------------------------------------------------------

    def _info_help(self) -> str:
        info = self._info
        return "".join(f"info {name} -- {info[name].help}\n" for name in sorted(info))

    def _do_help(self, args: str) -> str:
        if not args:
            seen: list[HmpCommand] = []
            for command in self._commands.values():
                if command not in seen:
                    seen.append(command)
            return "".join(
                f"{c.label()} {c.params} -- {c.help}\n".replace("  --", " --")
                for c in sorted(seen, key=lambda c: c.name)
            )
        begin, end = _split_word(args, 0)
        command = self._commands.get(args[begin:end])
        if command is None:
            return f"unknown command: '{args[:end]}'\n"
        if command.name == INFO_COMMAND:
            return self._info_help()
        return f"{command.label()} {command.params} -- {command.help}\n".replace("  --", " --")
