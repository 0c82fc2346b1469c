"""QMP for the hv-balloon device, with QEMU's names: `balloon`, `query-balloon`,
`query-hv-balloon-status-report`, and HMP `info balloon`.

`balloon value=N` sets the size the guest should have (boot memory + hot-added − ballooned);
the device balloons below the boot size and hot-adds above it. Progress shows as the
BALLOON_CHANGE event, status reports as HV_BALLOON_STATUS_REPORT (both rate-limited).
"""

from __future__ import annotations

from pyvmm.qmp.commands import QmpCommandError

DEVICE_NOT_ACTIVE = "DeviceNotActive"


def register_balloon_commands(commands, hmp, machine) -> None:
    def device():
        dev = getattr(machine, "hv_balloon", None)
        if dev is None:
            raise QmpCommandError("No balloon device has been activated", DEVICE_NOT_ACTIVE)
        return dev

    def balloon(args: dict) -> dict:
        value = args["value"]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise QmpCommandError("Parameter 'value' expects a positive size in bytes")
        dev = device()
        try:
            dev.set_target(value)
        except ValueError as e:
            raise QmpCommandError(str(e)) from None
        return {}

    def query_balloon(args: dict) -> dict:
        return device().query()

    def query_status_report(args: dict) -> dict:
        report = device().status_report()
        if report is None:
            raise QmpCommandError("hv-balloon has not received a status report yet")
        return report

    def info_balloon() -> str:
        return f"balloon: actual={device().query()['actual'] >> 20}\r\n"

    commands.register("balloon", balloon, {"value": "int"},
                      help="set the guest's target size in bytes (balloon below boot size, hot-add above)")
    commands.register("query-balloon", query_balloon, {}, help="the guest's current size (actual)")
    commands.register("query-hv-balloon-status-report", query_status_report, {},
                      help="the guest's last Dynamic Memory status report (committed, available)")
    hmp.register_info("balloon", info_balloon, "show balloon information")
