"""Host memory behind the hv-balloon device: the two seams it needs from the machine, and
implementations of both over the memslot manager.

`BalloonMemory` gives ballooned guest pages back to the host (`discard`) and is told when the
device returns them to the guest (`reclaim`). `HotAddMemory` backs the hot-add region: the
device calls `map` for each part of the region just before it offers that part to the guest
(so a KVM memslot exists before the guest can touch it) and `unmap_all` when the guest is back
at its boot size (machine reset).

The device calls these hooks with its lock held, so that a discard can never overtake the
unballoon that hands the same pages back to the guest; implementations must not call back
into the device. They may raise: the device counts the failure and carries on.

`MemslotDiscard` discards through whatever memslot backs a guest-physical address (boot RAM
and the hot-add region alike). `HotAddSlots` registers the hot-add region with KVM in
fixed-size slots (as virtio-mem does, `devices/virtio/mem_slots.py`), only for the slots the
device has asked for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from devices.virtio.mem_slots import default_memslot_size
from vmm.hostmem import HUGE_PAGE_SIZE, PAGE_SIZE, HostMapping, HostMemoryError, format_size
from vmm.memslots import Memslot, MemslotManager

log = logging.getLogger("pyvmm.hv-balloon")


class BalloonMemory(Protocol):
    """Guest RAM as the balloon sees it. Ranges are 4 KiB aligned and lie inside one boot RAM
    range or inside the hot-add region (the device splits them at those boundaries)."""

    def discard(self, gpa: int, size: int) -> None:
        """The guest gave these pages up: free their host memory (the next touch reads zeros)."""
        ...

    def reclaim(self, gpa: int, size: int) -> None:
        """These pages are about to go back to the guest (before the unballoon is sent)."""
        ...


class HotAddMemory(Protocol):
    """The hot-add region's host memory and KVM slots."""

    def map(self, gpa: int, size: int) -> None:
        """Make [gpa, gpa+size) of the region guest-accessible (register the slots covering it).
        Called before the guest is told to add it; may be called for parts already mapped."""
        ...

    def unmap_all(self) -> None:
        """Remove every slot of the region and free its host memory."""
        ...


@dataclass
class DiscardStats:
    discards: int = 0
    bytes: int = 0
    skipped_bytes: int = 0  # parts of a hugetlb page the guest only partly ballooned
    reclaims: int = 0


class MemslotDiscard:
    """`BalloonMemory` over the memslot manager: a discard goes to the host mapping of each
    memslot the range crosses. A hugetlb-backed slot can only give back whole 2 MiB pages, so
    the parts of a range that only cover part of a huge page stay resident (counted).
    `reclaim` has nothing to do: anonymous and memfd memory come back zero-filled on the
    guest's next touch."""

    def __init__(self, memslots: MemslotManager) -> None:
        self._memslots = memslots
        self.stats = DiscardStats()

    def discard(self, gpa: int, size: int) -> None:
        if gpa % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
            raise HostMemoryError(f"discard of {gpa:#x}+{size:#x} is not page aligned")
        end = gpa + size
        pos = gpa
        while pos < end:
            ms = self._memslots.lookup(pos)
            if ms is None:
                raise HostMemoryError(f"guest-physical address {pos:#x} is not backed by a memslot")
            n = min(end, ms.end) - pos
            self._discard_in_slot(ms, ms.offset + (pos - ms.gpa), n)
            pos += n
        self.stats.discards += 1

    def _discard_in_slot(self, ms: Memslot, offset: int, length: int) -> None:
        mapping = ms.mapping
        lo, hi = offset, offset + length
        if getattr(mapping, "backend", "anon") == "hugetlb":
            lo = -(-lo // HUGE_PAGE_SIZE) * HUGE_PAGE_SIZE
            hi = hi // HUGE_PAGE_SIZE * HUGE_PAGE_SIZE
            self.stats.skipped_bytes += length - max(hi - lo, 0)
            if hi <= lo:
                return
        mapping.discard(lo, hi - lo)
        self.stats.bytes += hi - lo

    def reclaim(self, gpa: int, size: int) -> None:
        self.stats.reclaims += 1


@dataclass
class HotAddSlotStats:
    adds: int = 0
    removes: int = 0
    failures: int = 0


class HotAddSlots:
    """`HotAddMemory` over the memslot manager: the region [gpa, gpa + mapping.size) is cut
    into slots of `slot_size` (default: 128 MiB, doubled until at most 1024 slots, as for
    virtio-mem); `map` registers every slot a range touches, `unmap_all` removes them all
    and discards the region's memory."""

    def __init__(self, memslots: MemslotManager, mapping: HostMapping, gpa: int, *,
                 slot_size: int | None = None, owner: str = "hv-balloon") -> None:
        if gpa % PAGE_SIZE or gpa < 0:
            raise ValueError(f"hot-add region address {gpa:#x} is not page aligned")
        if slot_size is None:
            slot_size = default_memslot_size(mapping.size, PAGE_SIZE)
        if slot_size <= 0 or slot_size % PAGE_SIZE:
            raise ValueError(f"memslot size {slot_size:#x} must be a positive multiple of {PAGE_SIZE}")
        self._memslots = memslots
        self.mapping = mapping
        self.gpa = gpa
        self.size = mapping.size
        self.slot_size = slot_size
        self.owner = owner
        self._slots: list[Memslot | None] = [None] * -(-self.size // slot_size)
        self.stats = HotAddSlotStats()

    def map(self, gpa: int, size: int) -> None:
        if size <= 0 or gpa < self.gpa or gpa + size > self.gpa + self.size:
            raise HostMemoryError(f"hot-add range {gpa:#x}+{size:#x} is outside the region "
                                  f"{self.gpa:#x}+{format_size(self.size)}")
        first = (gpa - self.gpa) // self.slot_size
        last = (gpa + size - 1 - self.gpa) // self.slot_size
        added: list[int] = []
        try:
            for index in range(first, last + 1):
                if self._slots[index] is None:
                    offset = index * self.slot_size
                    length = min(self.slot_size, self.size - offset)
                    self._slots[index] = self._memslots.add(self.gpa + offset, length, self.mapping, offset, self.owner)
                    self.stats.adds += 1
                    added.append(index)
        except Exception:
            self.stats.failures += 1
            for index in added:  # leave the region as this call found it
                self._remove(index)
            raise

    def unmap_all(self) -> None:
        for index in range(len(self._slots)):
            self._remove(index)
        try:
            self.mapping.discard(0, self.size)
        except HostMemoryError as e:
            self.stats.failures += 1
            log.warning("hv-balloon: cannot discard the hot-add region (the host keeps it): %s", e)

    def _remove(self, index: int) -> None:
        ms = self._slots[index]
        if ms is None:
            return
        try:
            self._memslots.remove(ms)
        except Exception as e:
            self.stats.failures += 1
            log.warning("hv-balloon: KVM refused to remove hot-add slot %d: %s", ms.slot, e)
            return
        self._slots[index] = None
        self.stats.removes += 1

    def mapped(self) -> list[tuple[int, int]]:
        """(gpa, size) of each registered slot, in address order."""
        return [(ms.gpa, ms.size) for ms in self._slots if ms is not None]
