"""The scenario registry: kits (virtio-mem, hv-balloon) and the scenarios registered for each.

A scenario is a function of one argument, the kit's context (pyvmm.check.context), that
raises CheckFailed when the guest does not behave as expected. Registering one takes a
decorator (the docstring's first paragraph says what the scenario expects):

    from pyvmm.check import scenario

    @scenario("virtio-mem", expects="plugging 64 MiB grows MemTotal by 64 MiB")
    def plug_64m(ctx):
        ctx.plug(64 << 20)
        ctx.expect_memtotal_delta(64 << 20)
        ctx.plug(0)

Scenarios run in registration order; the name defaults to the function's, with "-" for "_".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

ScenarioFunc = Callable[[Any], None]


@dataclass(frozen=True)
class Scenario:
    kit: str
    name: str
    func: ScenarioFunc
    expects: str        # what the scenario expects from the guest, one sentence

    def __call__(self, ctx: Any) -> None:
        self.func(ctx)


class SelectionError(ValueError):
    """An unknown kit or scenario name (one line, for the CLI's exit status 2)."""


class Registry:
    def __init__(self) -> None:
        self._kits: dict[str, Any] = {}
        self._scenarios: dict[str, dict[str, Scenario]] = {}

    # ------------------------------------------------------------------ kits
    def add_kit(self, kit: Any) -> Any:
        """Register a kit (an object with at least `name`)."""
        self._kits[kit.name] = kit
        self._scenarios.setdefault(kit.name, {})
        return kit

    def kit(self, name: str) -> Any:
        load_builtin_kits()
        try:
            return self._kits[name]
        except KeyError:
            raise SelectionError(f"unknown kit {name!r}; known: {', '.join(sorted(self._kits))}") from None

    def kit_names(self) -> list[str]:
        load_builtin_kits()
        return list(self._kits)

    # ------------------------------------------------------------------ scenarios
    def add(self, sc: Scenario) -> Scenario:
        by_name = self._scenarios.setdefault(sc.kit, {})
        if sc.name in by_name and by_name[sc.name].func is not sc.func:
            raise ValueError(f"scenario {sc.kit}/{sc.name} is registered twice")
        by_name[sc.name] = sc
        return sc

    def scenarios(self, kit: str) -> list[Scenario]:
        load_builtin_kits()
        return list(self._scenarios.get(kit, {}).values())

    def select(self, kit: str, names: list[str] | None) -> list[Scenario]:
        """The named scenarios of `kit` in registration order (all when `names` is empty)."""
        available = {sc.name: sc for sc in self.scenarios(kit)}
        if not names:
            return list(available.values())
        unknown = [n for n in names if n not in available]
        if unknown:
            raise SelectionError(f"unknown {kit} scenario{'s' if len(unknown) > 1 else ''} "
                                 f"{', '.join(unknown)}; known: {', '.join(available)}")
        wanted = set(names)
        return [sc for sc in available.values() if sc.name in wanted]


REGISTRY = Registry()
_builtin_loaded = False


def load_builtin_kits() -> None:
    """Import the built-in kits and their scenarios once (they register themselves)."""
    global _builtin_loaded
    if _builtin_loaded:
        return
    _builtin_loaded = True
    from pyvmm.check import hv_balloon_scenarios, virtio_mem_scenarios  # noqa: F401


def scenario(kit: str, name: str | None = None, *, expects: str | None = None
             ) -> Callable[[ScenarioFunc], ScenarioFunc]:
    """Decorator: register `func(ctx)` as a scenario of `kit`. `expects` defaults to the
    first paragraph of the function's docstring."""
    load_builtin_kits()  # built-in scenarios first, so a user's run after them

    def register(func: ScenarioFunc) -> ScenarioFunc:
        paragraph = (func.__doc__ or "").strip().split("\n\n")[0]
        text = expects or " ".join(paragraph.split())
        REGISTRY.add(Scenario(kit, name or func.__name__.replace("_", "-"), func, text))
        return func
    return register
