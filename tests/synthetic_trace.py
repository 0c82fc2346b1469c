"""Builds pyvmm traces (format version 1) in memory, as the VMM would write them.

`TraceBuilder` emits events with the same fields and ordering the VMM uses: a PLUG maps the
slots it needs before it is acknowledged, an UNPLUG is acknowledged before the slots it
emptied go. `realistic_trace()` tells a whole story (boot, plug to 1 GiB, partial unplug,
reset, replug, an hv-balloon balloon and hot-add) for the plot tests and for looking at.
"""

from __future__ import annotations

import json
from pathlib import Path

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40
T0 = 5000.0  # a CLOCK_MONOTONIC-like start, to check that times are made relative


class TraceBuilder:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.t = T0
        self._next_slot = 0
        self.devices: dict[str, dict] = {}
        self.mapped: dict[tuple[str, int], int] = {}  # (device, slot index) -> KVM slot
        self.emit("trace-start", version=1, pid=4242, wall="2026-11-23T20:00:00Z")

    # --- raw events ---
    def emit(self, ev: str, **fields) -> None:
        record = {"t": round(self.t, 6), "ev": ev}
        record.update({k.replace("_", "-"): v for k, v in fields.items()})
        self.lines.append(json.dumps(record))

    def at(self, seconds: float) -> TraceBuilder:
        """Move the clock to `seconds` after the start."""
        self.t = T0 + seconds
        return self

    def tick(self, seconds: float = 0.001) -> None:
        self.t += seconds

    def text(self) -> str:
        return "".join(line + "\n" for line in self.lines)

    def write(self, path: Path) -> Path:
        path.write_text(self.text())
        return path

    # --- memslots ---
    def slot_add(self, gpa: int, size: int, owner: str) -> int:
        slot = self._next_slot
        self._next_slot += 1
        self.emit("memslot.add", slot=slot, gpa=gpa, size=size, owner=owner, us=40)
        return slot

    def slot_remove(self, slot: int, gpa: int, size: int, owner: str) -> None:
        self.emit("memslot.remove", slot=slot, gpa=gpa, size=size, owner=owner, us=300)

    # --- virtio-mem ---
    def virtio_mem(self, id: str, addr: int, region_size: int, block_size: int = 2 * MiB,
                   slot_size: int = 128 * MiB, requested: int = 0) -> None:
        self.devices[id] = {"addr": addr, "region": region_size, "bs": block_size, "slot": slot_size,
                            "plugged": set(), "requested": requested}
        self.emit("virtio-mem.device", id=id, addr=addr, region_size=region_size, block_size=block_size,
                  slot_size=slot_size, requested_size=requested)

    def request_size(self, id: str, size: int) -> None:
        self.devices[id]["requested"] = size
        self.emit("virtio-mem.requested-size", id=id, size=size)

    def _slot_indices(self, id: str, first: int, nb: int) -> range:
        d = self.devices[id]
        per_slot = d["slot"] // d["bs"]
        return range(first // per_slot, (first + nb - 1) // per_slot + 1)

    def _size_event(self, id: str) -> None:
        d = self.devices[id]
        self.emit("virtio-mem.size", id=id, size=len(d["plugged"]) * d["bs"])

    def plug(self, id: str, first: int, nb: int, resp: str = "ack") -> None:
        d = self.devices[id]
        addr = d["addr"] + first * d["bs"]
        self.emit("virtio-mem.request", id=id, type="plug", addr=addr, nb_blocks=nb)
        if resp == "ack":
            for index in self._slot_indices(id, first, nb):
                if (id, index) not in self.mapped:
                    self.mapped[(id, index)] = self.slot_add(d["addr"] + index * d["slot"], d["slot"],
                                                             f"virtio-mem:{id}")
            d["plugged"].update(range(first, first + nb))
        self.emit("virtio-mem.response", id=id, type="plug", addr=addr, nb_blocks=nb, resp=resp, us=120)
        if resp == "ack":
            self._size_event(id)

    def unplug(self, id: str, first: int, nb: int, resp: str = "ack") -> None:
        d = self.devices[id]
        addr = d["addr"] + first * d["bs"]
        self.emit("virtio-mem.request", id=id, type="unplug", addr=addr, nb_blocks=nb)
        if resp == "ack":
            d["plugged"].difference_update(range(first, first + nb))
        self.emit("virtio-mem.response", id=id, type="unplug", addr=addr, nb_blocks=nb, resp=resp, us=90)
        if resp == "ack":
            self._size_event(id)
            self._drop_empty_slots(id)

    def expected_states(self, id: str) -> list[int]:
        """Per block, the state the trace format says the blocks are in now (from this
        builder's own bookkeeping): 2 plugged, 1 protected, 0 no memslot."""
        d = self.devices[id]
        per_slot = d["slot"] // d["bs"]
        return [2 if b in d["plugged"] else 1 if (id, b // per_slot) in self.mapped else 0
                for b in range(d["region"] // d["bs"])]

    def unplug_all(self, id: str) -> None:
        self.emit("virtio-mem.request", id=id, type="unplug-all", addr=0, nb_blocks=0)
        self.devices[id]["plugged"].clear()
        self.emit("virtio-mem.response", id=id, type="unplug-all", addr=0, nb_blocks=0, resp="ack", us=900)
        self._size_event(id)
        self._drop_empty_slots(id)

    def reset(self, id: str) -> None:
        self.devices[id]["plugged"].clear()
        self.emit("virtio-mem.reset", id=id)
        self._size_event(id)
        self._drop_empty_slots(id)

    def _drop_empty_slots(self, id: str) -> None:
        d = self.devices[id]
        per_slot = d["slot"] // d["bs"]
        for (dev, index), slot in sorted(self.mapped.items()):
            if dev != id:
                continue
            if not any(b in d["plugged"] for b in range(index * per_slot, (index + 1) * per_slot)):
                self.slot_remove(slot, d["addr"] + index * d["slot"], d["slot"], f"virtio-mem:{id}")
                del self.mapped[(dev, index)]

    # --- hv-balloon ---
    def hv_balloon(self, id: str, memdev_size: int, hot_add_addr: int | None) -> None:
        self.emit("hv-balloon.device", id=id, memdev_size=memdev_size, hot_add_addr=hot_add_addr)

    def balloon_state(self, id: str, target: int, ballooned: int, hot_added: int) -> None:
        self.emit("hv-balloon.state", id=id, target=target, ballooned=ballooned, hot_added=hot_added)

    def balloon_status(self, id: str, committed: int, available: int) -> None:
        self.emit("hv-balloon.status", id=id, committed=committed, available=available)


RAM = 1 * GiB
VMEM_ADDR = 0x140000000
VMEM_REGION = 4 * GiB
HV_ADDR = 0x240000000


def realistic_trace() -> TraceBuilder:
    """About 30 s of a guest with one virtio-mem device (4 GiB region) and an hv-balloon.

    Linux's driver plugs and unplugs in 128 MiB memory blocks of 2 MiB sub-blocks: it plugs
    whole memory blocks, and when asked to shrink it unplugs sub-blocks, removing a memory
    block (and so emptying its memslot) only once all of it is unplugged.
    """
    b = TraceBuilder()
    b.slot_add(0, 768 * MiB, "ram")
    b.slot_add(4 * GiB, RAM - 768 * MiB, "ram")
    b.virtio_mem("vm0", VMEM_ADDR, VMEM_REGION)
    b.hv_balloon("hv0", 2 * GiB, HV_ADDR)
    b.balloon_state("hv0", RAM, 0, 0)
    per_mb = 64  # 2 MiB blocks in a 128 MiB memory block
    # grow to 1 GiB: eight memory blocks, one request each, 0.4 s apart (onlining is slow)
    b.at(2.0).request_size("vm0", 1 * GiB)
    for i in range(8):
        b.at(2.3 + 0.4 * i).plug("vm0", i * per_mb, per_mb)
    b.at(5.6).plug("vm0", 8 * per_mb, per_mb, resp="nack")
    # shrink to 608 MiB: 2 MiB sub-blocks from the top memory blocks, three of every four as
    # the driver finds them movable; the top block empties completely and its slot goes
    b.at(8.0).request_size("vm0", 608 * MiB)
    b.at(8.3).unplug("vm0", 7 * per_mb, per_mb)
    for k, first in enumerate(range(4 * per_mb, 7 * per_mb, 4)):
        b.at(8.5 + 0.02 * k).unplug("vm0", first, 3)
    b.at(9.6)
    b.emit("unplugged-access", device="vm0", gpa=VMEM_ADDR + 7 * 128 * MiB + 4096, kind="read")
    # the balloon: inflate by 256 MiB, then hot-add 1 GiB
    b.at(11.0).balloon_state("hv0", RAM - 256 * MiB, 0, 0)
    for k in range(1, 5):
        b.at(11.0 + 0.5 * k).balloon_state("hv0", RAM - 256 * MiB, 64 * MiB * k, 0)
        b.balloon_status("hv0", RAM - 64 * MiB * k, 300 * MiB)
    b.at(15.0).balloon_state("hv0", 2 * GiB, 256 * MiB, 0)
    b.at(15.5).balloon_state("hv0", 2 * GiB, 0, 0)
    hv_slot = b.slot_add(HV_ADDR, 1 * GiB, "hv-balloon:hv0")
    for k in range(1, 5):
        b.at(15.5 + 0.5 * k).balloon_state("hv0", 2 * GiB, 0, 256 * MiB * k)
        b.balloon_status("hv0", RAM + 256 * MiB * k, 900 * MiB)
    # a reboot: everything unplugs, the hot-added memory goes, the guest re-plugs 608 MiB
    b.at(20.0).reset("vm0")
    b.slot_remove(hv_slot, HV_ADDR, 1 * GiB, "hv-balloon:hv0")
    b.balloon_state("hv0", 2 * GiB, 0, 0)
    for i in range(4):
        b.at(24.0 + 0.4 * i).plug("vm0", i * per_mb, per_mb)
    b.at(25.6).plug("vm0", 4 * per_mb, 48)
    # the operator asks for everything back
    b.at(28.0).request_size("vm0", 0)
    b.at(28.4).unplug_all("vm0")
    b.at(30.0).emit("trace-end", dropped=0)
    return b
