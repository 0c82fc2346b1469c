"""The hv-balloon kit: its VM (a Hyper-V partition with the Dynamic Memory device on VMBus),
the runtime driver check, and the helpers its scenarios use (HvBalloonContext).

The device's view comes over QMP (`query-balloon` actual, the counters under
`query-vm-stats` "hv-balloon", `query-memslots`, status reports); the guest's through the
agent (MemTotal, MemAvailable, memory blocks, dmesg).
"""

from __future__ import annotations

from typing import Any

from pyvmm.check import kernel_probe, waits
from pyvmm.check.context import Context
from pyvmm.check.kit import Kit
from pyvmm.check.outcomes import CheckFailed
from pyvmm.check.registry import REGISTRY
from pyvmm.check.waits import MiB, mib

DEVICE_ID = "hvb0"
BOOT_MEMORY = 256 * MiB
HOT_ADD_SIZE = 256 * MiB
# The Dynamic Memory device's VMBus class (the guest lists it as class_id).
HV_DM_CLASS_ID = "{525074dc-8985-46e2-8057-a307dc18a502}"


class HvBalloonContext(Context):
    """Helpers for the hv-balloon scenarios. `boot_size` is the guest's boot RAM, the size
    `actual` starts at; `base_memtotal` is MemTotal then."""

    MEMTOTAL_WAIT_S = waits.BALLOON_BASE_S

    boot_size = BOOT_MEMORY
    hot_add_size = HOT_ADD_SIZE

    # ------------------------------------------------------------------ device side
    @property
    def actual(self) -> int:
        return self.qmp.execute("query-balloon")["actual"]

    def counters(self) -> dict:
        stats = self.vm_stats().get("hv-balloon")
        if not stats:
            raise CheckFailed("query-vm-stats has no hv-balloon counters")
        return stats

    def hot_add_slots(self) -> list[dict]:
        return self.memslots("hv-balloon")

    def status_report(self) -> dict | None:
        try:
            return self.qmp.execute("query-hv-balloon-status-report")
        except Exception as e:
            if "has not received" in str(e):
                return None
            raise

    def set_target(self, size: int) -> None:
        self.log(f"balloon target := {mib(size)}")
        self.qmp.execute("balloon", {"value": int(size)})

    def wait_actual(self, size: int, timeout: float | None = None) -> None:
        """Wait until the device reports the guest at `size` (boot + hot-added - ballooned)."""
        change = size - self.actual
        if timeout is None:
            base, per = ((waits.HOT_ADD_BASE_S, waits.HOT_ADD_PER_128M_S) if size > self.boot_size
                         else (waits.BALLOON_BASE_S, waits.BALLOON_PER_128M_S))
            timeout = waits.size_timeout(change, base, per, self.scale)
        self.wait_until(lambda: self.actual == size, timeout,
                        f"the guest to reach {mib(size)} (balloon target)",
                        seen=lambda: f"actual {mib(self.actual)}, device state {self.counters()['state']}")
        self.log(f"actual = {mib(size)}")

    def wait_idle(self, timeout: float | None = None) -> dict:
        """Wait until no request is in flight; returns the counters."""
        stats: dict = {}

        def idle() -> bool:
            stats.update(self.counters())
            return stats["state"] == "idle"
        self.wait_until(idle, timeout or self.timeout(waits.BALLOON_BASE_S), "the device to be idle",
                        seen=lambda: f"state {stats.get('state')}")
        return stats

    def resize(self, size: int, memtotal_delta: int | None = None) -> None:
        """Set the target, wait for the device to get there, and (optionally) for the guest's
        MemTotal to be the boot value + `memtotal_delta`."""
        self.set_target(size)
        self.wait_actual(size)
        if memtotal_delta is not None:
            self.wait_memtotal(memtotal_delta)

    def expect_no_bad_ranges(self) -> None:
        c = self.counters()
        self.expect(not c["bad-ranges"], f"the device refused page ranges the guest sent: {c['bad-ranges']}")
        self.expect(not c["malformed"], f"the guest sent malformed messages: {c['malformed']}")

    # ------------------------------------------------------------------ kit hooks
    @property
    def base_memtotal(self) -> int:
        return self.state["base_memtotal"]

    def setup(self) -> None:
        self.expect_driver_bound()
        self.wait_until(lambda: self.counters()["state"] == "idle", self.timeout(waits.DRIVER_BIND_TIMEOUT_S),
                        "the Dynamic Memory protocol handshake (version, capabilities) to finish",
                        seen=lambda: f"device state {self.counters()['state']}")
        self.expect(self.actual == self.boot_size,
                    f"right after boot the device reports {mib(self.actual)}, not the boot size {mib(self.boot_size)}")
        self.state["base_memtotal"] = self.memtotal()
        self.log(f"boot MemTotal {self.base_memtotal} bytes; protocol {self.counters()['version']}")

    def expect_driver_bound(self) -> None:
        """The guest lists the Dynamic Memory device on VMBus with hv_balloon bound."""
        seen: dict[str, Any] = {}

        def bound() -> bool:
            devs = [d for d in self.agent.devices() if d["bus"] == "vmbus"]
            seen["devs"] = devs
            dm = [d for d in devs if d.get("class_id") == HV_DM_CLASS_ID]
            return bool(dm) and all(d.get("driver") for d in dm)

        try:
            self.wait_until(bound, self.timeout(waits.DRIVER_BIND_TIMEOUT_S), "the hv_balloon driver to bind",
                            interval=2.0)
        except CheckFailed:
            devs = seen.get("devs", [])
            if not devs:
                raise CheckFailed("the guest has no VMBus devices at all: is CONFIG_HYPERV (hv_vmbus) "
                                  "enabled?") from None
            raise CheckFailed("no driver bound to the VMBus Dynamic Memory device: is CONFIG_HYPERV_BALLOON "
                              "enabled?") from None
        drivers = {d.get("driver") for d in seen["devs"] if d.get("class_id") == HV_DM_CLASS_ID}
        self.expect(drivers == {"hv_balloon"}, f"the Dynamic Memory device is bound to {drivers}, not hv_balloon")
        self.log("hv_balloon is bound to the VMBus Dynamic Memory device")

    def settle(self) -> None:
        """Back to the boot size: unballoon, or balloon away what was hot-added."""
        self.wait_idle()
        if self.actual != self.boot_size:
            self.resize(self.boot_size)


class HvBalloonKit(Kit):
    name = "hv-balloon"
    title = "the Linux hv_balloon driver (Hyper-V Dynamic Memory over VMBus)"
    requirements = [kernel_probe.HYPERV, kernel_probe.HYPERV_BALLOON, kernel_probe.MEMORY_HOTPLUG]
    context_class = HvBalloonContext

    def vm_kwargs(self) -> dict[str, Any]:
        return {"memory": BOOT_MEMORY,
                "hv_balloon": f"id={DEVICE_ID},memdev-size={HOT_ADD_SIZE // MiB}M,status-report=on"}


KIT = REGISTRY.add_kit(HvBalloonKit())
