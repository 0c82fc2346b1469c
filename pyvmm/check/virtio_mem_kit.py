"""The virtio-mem kit: its VM (one virtio-mem device), the runtime driver check, and the
helpers its scenarios use (VirtioMemContext).

Facts come from both sides: the device's own view over QMP (`query-memory-devices` size and
requested-size, `query-memslots`, the request counters in `query-vm-stats`) and the guest's
view through the agent (MemTotal, memory blocks with their zones, dmesg).
"""

from __future__ import annotations

import re
from typing import Any

from pyvmm.check import kernel_probe, waits
from pyvmm.check.context import Context
from pyvmm.check.host_memory import region_rss
from pyvmm.check.kit import Kit
from pyvmm.check.outcomes import CheckFailed
from pyvmm.check.registry import REGISTRY
from pyvmm.check.waits import MiB, mib

DEVICE_ID = "vm0"
BOOT_MEMORY = 256 * MiB
REGION_SIZE = 1024 * MiB
VIRTIO_ID_MEM = 24  # the virtio device ID of virtio-mem (VIRTIO spec 5.15)
# Linux's virtio_mem plugs in its own units: subblocks (x86: 4 MiB pageblocks) or big blocks,
# as it prints at probe time.
GUEST_UNIT_LINE = re.compile(r"virtio_mem \S+: (subblock|big block) size: (0x[0-9a-f]+)")
DEFAULT_GUEST_UNIT = 4 * MiB
DMESG_LINES = 400
# Counters of the device that must never grow while a conforming guest drives it.
FAULT_COUNTERS = ("malformed", "internal-errors", "slot-failures", "protect-failures",
                  "discard-failures", "unplugged-accesses")


class VirtioMemContext(Context):
    """Helpers for the virtio-mem scenarios. Sizes are bytes; `unit` is the guest's plug
    granularity; `base_memtotal` is MemTotal with nothing plugged."""

    device_id = DEVICE_ID

    # ------------------------------------------------------------------ device side
    def info(self) -> dict:
        for dev in self.qmp.execute("query-memory-devices"):
            if dev["type"] == "virtio-mem" and dev["data"]["id"] == self.device_id:
                return dev["data"]
        raise CheckFailed(f"query-memory-devices lists no virtio-mem device {self.device_id!r}")

    @property
    def plugged(self) -> int:
        return self.info()["size"]

    def counters(self) -> dict:
        return self.vm_stats()["virtio-mem"][self.device_id]

    def slots(self) -> list[dict]:
        return self.memslots(f"virtio-mem:{self.device_id}")

    def request(self, size: int) -> None:
        self.log(f"requested-size := {mib(size)}")
        self.qmp.execute("qom-set", {"path": f"/machine/peripheral/{self.device_id}",
                                     "property": "requested-size", "value": int(size)})

    def wait_plugged(self, size: int, timeout: float | None = None) -> None:
        """Wait until the device reports `size` plugged (the guest's plug/unplug requests)."""
        start = self.plugged
        if timeout is None:
            timeout = waits.size_timeout(size - start, waits.PLUG_BASE_S, waits.PLUG_PER_128M_S, self.scale)
        self.wait_until(lambda: self.plugged == size, timeout,
                        f"the guest to get virtio-mem {self.device_id} to {mib(size)} plugged "
                        f"(requested-size {mib(size)})",
                        seen=lambda: f"{mib(self.plugged)} plugged")
        self.log(f"plugged = {mib(size)}")

    def plug(self, size: int, memtotal: bool = True) -> None:
        """Request `size`, wait for the device to report it plugged and (by default) for the
        guest's MemTotal to agree."""
        self.request(size)
        self.wait_plugged(size)
        if memtotal:
            self.wait_memtotal(size)

    # ------------------------------------------------------------------ guest side
    def region_blocks(self) -> list[dict]:
        """The guest's memory blocks inside the device's region."""
        info = self.info()
        lo, hi = info["memaddr"], info["memaddr"] + info["max-size"]
        return [b for b in self.agent.memory_blocks() if lo <= b["phys_start"] < hi]

    # ------------------------------------------------------------------ checks
    def expect_slots_cover_plugged(self) -> None:
        """Memslots: none when nothing is plugged, else at least the plugged size, all inside
        the device's region."""
        info, slots = self.info(), self.slots()
        mapped = sum(s["size"] for s in slots)
        lo, hi = info["memaddr"], info["memaddr"] + info["max-size"]
        self.expect(all(lo <= s["gpa"] and s["gpa"] + s["size"] <= hi for s in slots),
                    f"a memslot of {self.device_id} lies outside its region: {slots}")
        if info["size"] == 0:
            self.expect(not slots, f"nothing is plugged but {len(slots)} memslots ({mib(mapped)}) stay mapped")
        else:
            self.expect(mapped >= info["size"], f"{mib(info['size'])} plugged but only {mib(mapped)} "
                                                f"of memslots mapped")
        self.log(f"memslots map {mib(mapped)} for {mib(info['size'])} plugged")

    def fault_counts(self) -> dict[str, int]:
        c = self.counters()
        out = {k: int(c.get(k, 0)) for k in FAULT_COUNTERS}
        out["error-answers"] = sum(answers.get("error", 0) for answers in c.get("requests", {}).values())
        return out

    def expect_no_new_faults(self, before: dict[str, int]) -> None:
        """The device saw no malformed or out-of-range request and no guest access to
        unplugged memory since `before` (fault_counts())."""
        now = self.fault_counts()
        grown = {k: now[k] - before.get(k, 0) for k in now if now[k] > before.get(k, 0)}
        self.expect(not grown, "the device counted faults during the scenario: "
                    + ", ".join(f"{k} +{v}" for k, v in grown.items())
                    + (" (the guest touched memory it had not plugged)" if "unplugged-accesses" in grown else ""))

    def region_host_rss(self) -> int | None:
        """Bytes of the device's region resident on the host, or None before its host
        address is known (learned from the first memslot seen)."""
        base = self.state.get("region_host_base")
        if base is None:
            slots = self.slots()
            if not slots:
                return None
            info = self.info()
            base = slots[0]["host-addr"] - (slots[0]["gpa"] - info["memaddr"])
            self.state["region_host_base"] = base
        return region_rss(self.vm.pid, base, base + REGION_SIZE)

    # ------------------------------------------------------------------ kit hooks
    @property
    def base_memtotal(self) -> int:
        return self.state["base_memtotal"]

    @property
    def unit(self) -> int:
        return self.state["unit"]

    def setup(self) -> None:
        self.expect_driver_bound()
        info = self.info()
        self.expect(info["size"] == 0, f"{mib(info['size'])} already plugged right after boot "
                                       f"(requested-size {mib(info['requested-size'])}); the kit starts from 0")
        self.state["base_memtotal"] = self.memtotal()
        self.state["unit"] = self.guest_unit(info["block-size"])
        self.log(f"boot MemTotal {self.base_memtotal} bytes, guest plug unit {mib(self.unit)}")

    def expect_driver_bound(self) -> None:
        """The guest lists the virtio-mem device on its virtio bus with virtio_mem bound."""
        seen: dict[str, Any] = {}

        def bound() -> bool:
            devs = [d for d in self.agent.devices() if d["bus"] == "virtio"]
            seen["devs"] = devs
            mem = [d for d in devs if _int(d.get("device")) == VIRTIO_ID_MEM]
            return bool(mem) and all(d.get("driver") for d in mem)

        try:
            self.wait_until(bound, self.timeout(waits.DRIVER_BIND_TIMEOUT_S), "the virtio-mem driver to bind",
                            interval=2.0)
        except CheckFailed:
            devs = seen.get("devs", [])
            mem = [d for d in devs if _int(d.get("device")) == VIRTIO_ID_MEM]
            if not mem:
                raise CheckFailed("the guest sees no virtio-mem device on its virtio bus (virtio devices: "
                                  f"{[d['name'] for d in devs] or 'none'}): is CONFIG_VIRTIO_MMIO enabled "
                                  "(pyvmm's virtio devices are virtio-mmio, described in ACPI)?") from None
            raise CheckFailed("no driver bound to the virtio-mem device: is CONFIG_VIRTIO_MEM enabled?") from None
        drivers = {d.get("driver") for d in seen["devs"] if _int(d.get("device")) == VIRTIO_ID_MEM}
        self.expect(drivers == {"virtio_mem"}, f"the virtio-mem device is bound to {drivers}, not virtio_mem")
        self.log("virtio_mem is bound to the device")

    def guest_unit(self, device_block: int) -> int:
        """The guest driver's plug granularity, from its probe messages."""
        m = GUEST_UNIT_LINE.findall(self.agent.dmesg(DMESG_LINES))
        if m:
            return int(m[-1][1], 16)
        self.log(f"dmesg does not show the driver's unit: assuming {mib(DEFAULT_GUEST_UNIT)}")
        return max(device_block, DEFAULT_GUEST_UNIT)

    def settle(self) -> None:
        """Back to nothing plugged, as every scenario starts."""
        if self.plugged or self.info()["requested-size"]:
            self.log("back to nothing plugged")
            self.plug(0, memtotal=False)

    def prepare(self) -> None:
        self.settle()


def _int(text: str | None) -> int | None:
    try:
        return int(text, 0) if text else None
    except ValueError:
        return None


class VirtioMemKit(Kit):
    name = "virtio-mem"
    title = "the Linux virtio-mem driver"
    requirements = [kernel_probe.VIRTIO_MMIO, kernel_probe.VIRTIO_MEM, kernel_probe.MEMORY_HOTPLUG,
                    kernel_probe.MEMORY_HOTREMOVE]
    context_class = VirtioMemContext

    def vm_kwargs(self) -> dict[str, Any]:
        return {"memory": BOOT_MEMORY,
                "virtio_mem": [f"id={DEVICE_ID},size={REGION_SIZE // MiB}M,requested-size=0"]}


KIT = REGISTRY.add_kit(VirtioMemKit())
