"""The standard QMP commands and HMP `info` subcommands on a MachineControl.

Registers `query-status`, `query-version`, `stop`, `cont`,
`system_powerdown`, `system_reset`, `quit`, `query-vm-stats` (pyvmm's own)
and `human-monitor-command`, plus HMP `info status|version|stats` and the
run-control HMP commands.  Run-state events are the machine's to emit.
"""

from __future__ import annotations

from typing import Any, Callable

from .commands import CommandContext, CommandTable, QmpCommandError
from .hmp import HmpTable
from .machine_api import RUN_STATE_PAUSED, RUN_STATE_RUNNING, RUN_STATES_NEEDING_RESET, MachineControl

# QEMU's "package" string; pyvmm has no distribution tag.
VERSION_PACKAGE = ""
STATS_INDENT = "  "


def status_info(machine: MachineControl) -> dict[str, Any]:
    """query-status's StatusInfo."""
    status = machine.status()
    return {"status": status, "running": status == RUN_STATE_RUNNING, "singlestep": False}


def version_info(machine: MachineControl) -> dict[str, Any]:
    """query-version's VersionInfo (the greeting carries the same object)."""
    major, minor, micro = (int(part) for part in machine.version())
    return {"qemu": {"micro": micro, "minor": minor, "major": major}, "package": VERSION_PACKAGE}


def format_status(info: dict[str, Any]) -> str:
    """`info status` text, worded as QEMU's hmp_info_status."""
    text = "VM status: " + ("running" if info["running"] else "paused")
    if not info["running"] and info["status"] != RUN_STATE_PAUSED:
        text += f" ({info['status']})"
    return text + "\n"


def format_version(info: dict[str, Any]) -> str:
    q = info["qemu"]
    return f"{q['major']}.{q['minor']}.{q['micro']}{info['package']}\n"


def format_stats(stats: Any, depth: int = 0) -> str:
    """Nested dicts as an indented "key: value" outline."""
    lines: list[str] = []
    pad = STATS_INDENT * depth
    if isinstance(stats, dict):
        for key, value in stats.items():
            if isinstance(value, dict):
                lines.append(f"{pad}{key}:\n" + format_stats(value, depth + 1))
            else:
                lines.append(f"{pad}{key}: {value}\n")
    else:
        lines.append(f"{pad}{stats}\n")
    return "".join(lines)


def register_machine_commands(
    table: CommandTable,
    hmp: HmpTable,
    machine: MachineControl,
    extra_stats: Callable[[], dict[str, Any]] | None = None,
) -> None:
    """Fill `table` and `hmp` with the commands that act on `machine`.

    `extra_stats` (e.g. the server's own counters) is merged into
    query-vm-stats under the key "qmp".
    """

    def do_stop() -> None:
        # QEMU's stop is a no-op on a VM that is not running.
        if machine.status() == RUN_STATE_RUNNING:
            machine.pause()

    def do_cont() -> None:
        status = machine.status()
        if status in RUN_STATES_NEEDING_RESET:
            raise QmpCommandError("Resetting the Virtual Machine is required")
        if status != RUN_STATE_RUNNING:
            machine.resume()

    def vm_stats() -> dict[str, Any]:
        stats = dict(machine.stats())
        if extra_stats is not None:
            stats.setdefault("qmp", extra_stats())
        return stats

    def do_quit(args: dict[str, Any], ctx: CommandContext) -> None:
        # The reply must reach the client before the machine goes away.
        ctx.after_reply(machine.quit)

    table.register("query-status", lambda args: status_info(machine),
                   help="Query the run status of the VM")
    table.register("query-version", lambda args: version_info(machine),
                   help="Return the current version of the VMM")
    table.register("stop", lambda args: do_stop(), help="Stop all guest VCPU execution")
    table.register("cont", lambda args: do_cont(), help="Resume guest VCPU execution")
    table.register("system_powerdown", lambda args: machine.powerdown(),
                   help="Request graceful power down (ACPI power button)")
    table.register("system_reset", lambda args: machine.reset(), help="Perform a hard reset")
    table.register("quit", do_quit, takes_context=True, help="Exit the VMM")
    table.register("query-vm-stats", lambda args: vm_stats(),
                   help="pyvmm: exits, assists, unclaimed bus accesses, vCPU run time")
    table.register(
        "human-monitor-command",
        lambda args: hmp.execute(args["command-line"]),
        {"command-line": "str", "*cpu-index": "int"},
        help="Execute a command on the human monitor and return the output",
    )

    hmp.register_info("status", lambda: format_status(status_info(machine)),
                      "show the current VM status (running|paused)")
    hmp.register_info("version", lambda: format_version(version_info(machine)),
                      "show the version of QEMU")
    hmp.register_info("stats", lambda: format_stats(vm_stats()), "show statistics")
    hmp.register("stop", _no_output(do_stop), "stop emulation", aliases=("s",))
    hmp.register("cont", _no_output(do_cont), "resume emulation", aliases=("c",))
    hmp.register("system_reset", _no_output(machine.reset), "reset the system")
    hmp.register("system_powerdown", _no_output(machine.powerdown), "send system power down event")


def _no_output(action: Callable[[], None]) -> Callable[[], str]:
    """An HMP handler that runs `action` and prints nothing, as QEMU's do.
    (A failure becomes "Error: ..." in HmpTable.)"""

    def run() -> str:
        action()
        return ""

    return run
