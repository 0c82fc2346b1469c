"""The machine-control interface the QMP server drives.

`vmm.machine.Machine` implements `MachineControl`; the QMP layer only ever
talks to a machine through it, so the server can be tested with a fake and
the VM core never imports the control plane.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

# QEMU RunState names (qapi/run-state.json) that pyvmm uses.
RUN_STATE_RUNNING = "running"
RUN_STATE_PAUSED = "paused"
RUN_STATE_SHUTDOWN = "shutdown"
RUN_STATE_PRELAUNCH = "prelaunch"
RUN_STATE_GUEST_PANICKED = "guest-panicked"
RUN_STATE_INTERNAL_ERROR = "internal-error"

# States out of which `cont` is refused until `system_reset`, as QEMU's
# runstate_needs_reset() decides.
RUN_STATES_NEEDING_RESET = frozenset(
    {RUN_STATE_SHUTDOWN, RUN_STATE_GUEST_PANICKED, RUN_STATE_INTERNAL_ERROR}
)

#: Signature of a machine event listener: (event name, event data or None).
EventListener = Callable[[str, "dict[str, Any] | None"], None]


@runtime_checkable
class MachineControl(Protocol):
    """What the control plane may ask of a machine.

    Every method may be called from the QMP server's worker thread while
    vCPU threads run; implementations do their own locking.  Events
    (SHUTDOWN {"guest": bool, "reason": str}, RESET, STOP, RESUME,
    POWERDOWN, GUEST_PANICKED, ...) are reported through the listeners,
    from any thread.
    """

    def status(self) -> str:
        """The current QEMU RunState name, e.g. "running" or "paused"."""
        ...

    def pause(self) -> None:
        """Stop all vCPUs (QMP `stop`); emits STOP."""
        ...

    def resume(self) -> None:
        """Restart the vCPUs (QMP `cont`); emits RESUME."""
        ...

    def powerdown(self) -> None:
        """Press the ACPI power button; emits POWERDOWN."""
        ...

    def reset(self) -> None:
        """Reset the machine (QMP `system_reset`); emits RESET."""
        ...

    def quit(self) -> None:
        """Tear the VM down (QMP `quit`); emits SHUTDOWN."""
        ...

    def stats(self) -> dict[str, Any]:
        """JSON-able counters: exits by reason, assists, unclaimed accesses..."""
        ...

    def version(self) -> tuple[int, int, int]:
        """(major, minor, micro) of the VMM."""
        ...

    def add_event_listener(self, cb: EventListener) -> None:
        """Call `cb(name, data)` for every machine event, from any thread."""
        ...


class CommandRegistrar(Protocol):
    """What a device module needs to add QMP commands (duck-typed: the
    device receives a `pyvmm.qmp.commands.CommandTable` without importing
    it)."""

    def register(
        self,
        name: str,
        handler: Callable[[dict[str, Any]], Any],
        args: "dict[str, str] | None" = None,
        *,
        help: str = "",
    ) -> None: ...


class HmpRegistrar(Protocol):
    """What a device module needs to add an HMP `info` subcommand."""

    def register_info(
        self, name: str, handler: Callable[[], str], help: str = ""
    ) -> None: ...
