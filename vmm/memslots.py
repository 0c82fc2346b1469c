"""The memslot manager: the one place that adds and removes KVM memslots.

It owns the guest-physical address map: which GPA range is backed by which host range, and
under which KVM slot number. Boot RAM, virtio-mem and hv-balloon all go through it, so
`query-memslots` and guest-physical reads see one consistent picture. Lookups from vCPU and
device threads read an immutable snapshot that is swapped atomically on every change, so
they take no lock.
"""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from vmm.hostmem import PAGE_SIZE, HostMapping
from vmm.tracing import NULL_TRACER, AnyTracer


class MemslotError(Exception):
    """A memslot request was invalid (overlap, misalignment, no free slot)."""


class SlotBackend(Protocol):
    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0) -> None: ...


@dataclass(frozen=True)
class Memslot:
    slot: int
    gpa: int
    size: int
    mapping: HostMapping
    offset: int  # into mapping
    owner: str
    flags: int = 0

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def host_addr(self) -> int:
        return self.mapping.addr + self.offset

    def as_dict(self) -> dict:
        return {"slot": self.slot, "gpa": self.gpa, "size": self.size, "host-addr": self.host_addr,
                "owner": self.owner, "readonly": bool(self.flags & 2)}


@dataclass
class MemslotStats:
    adds: int = 0
    removes: int = 0
    add_ns: int = 0
    remove_ns: int = 0


@dataclass
class _Snapshot:
    starts: list[int] = field(default_factory=list)
    slots: list[Memslot] = field(default_factory=list)


class MemslotManager:
    def __init__(self, backend: SlotBackend, max_slots: int = 32764) -> None:
        self._backend = backend
        self._max_slots = max_slots
        self._lock = threading.Lock()
        self._snap = _Snapshot()
        self._free: list[int] = []
        self._next_slot = 0
        self.stats = MemslotStats()
        self._listeners: list[Callable[[str, Memslot], None]] = []
        self.tracer: AnyTracer = NULL_TRACER  # set by the machine

    def add_listener(self, cb: Callable[[str, Memslot], None]) -> None:
        """cb("add"|"remove", slot) after each change (tracing, stats)."""
        self._listeners.append(cb)

    def add(self, gpa: int, size: int, mapping: HostMapping, offset: int, owner: str, flags: int = 0) -> Memslot:
        if size <= 0 or gpa < 0 or offset < 0 or gpa % PAGE_SIZE or size % PAGE_SIZE or offset % PAGE_SIZE:
            raise MemslotError(f"memslot {gpa:#x}+{size:#x} is not page aligned")
        if offset + size > mapping.size:
            raise MemslotError(f"memslot {gpa:#x}+{size:#x} exceeds its host mapping")
        with self._lock:
            snap = self._snap
            i = bisect.bisect_right(snap.starts, gpa)
            if i > 0 and snap.slots[i - 1].end > gpa:
                raise MemslotError(f"memslot {gpa:#x}+{size:#x} overlaps slot {snap.slots[i - 1].slot} ({snap.slots[i - 1].owner})")
            if i < len(snap.slots) and snap.slots[i].gpa < gpa + size:
                raise MemslotError(f"memslot {gpa:#x}+{size:#x} overlaps slot {snap.slots[i].slot} ({snap.slots[i].owner})")
            slot_id = self._alloc_slot_id()
            t0 = time.monotonic_ns()
            try:
                self._backend.set_user_memory_region(slot_id, gpa, size, mapping.addr + offset, flags)
            except Exception:
                self._free.append(slot_id)
                raise
            elapsed = time.monotonic_ns() - t0
            self.stats.add_ns += elapsed
            self.stats.adds += 1
            ms = Memslot(slot_id, gpa, size, mapping, offset, owner, flags)
            self._snap = _Snapshot(snap.starts[:i] + [gpa] + snap.starts[i:], snap.slots[:i] + [ms] + snap.slots[i:])
            if self.tracer.enabled:  # under the lock: the trace orders slot changes as KVM saw them
                self._trace("memslot.add", ms, elapsed)
        for cb in self._listeners:
            cb("add", ms)
        return ms

    def remove(self, ms: Memslot) -> None:
        with self._lock:
            snap = self._snap
            if ms not in snap.slots:
                raise MemslotError(f"memslot {ms.slot} is not registered")
            t0 = time.monotonic_ns()
            self._backend.set_user_memory_region(ms.slot, ms.gpa, 0, ms.host_addr, ms.flags)
            elapsed = time.monotonic_ns() - t0
            self.stats.remove_ns += elapsed
            self.stats.removes += 1
            i = snap.slots.index(ms)
            self._snap = _Snapshot(snap.starts[:i] + snap.starts[i + 1:], snap.slots[:i] + snap.slots[i + 1:])
            self._free.append(ms.slot)
            if self.tracer.enabled:
                self._trace("memslot.remove", ms, elapsed)
        for cb in self._listeners:
            cb("remove", ms)

    def _trace(self, ev: str, ms: Memslot, elapsed_ns: int) -> None:
        self.tracer.emit(ev, slot=ms.slot, gpa=ms.gpa, size=ms.size, owner=ms.owner, us=round(elapsed_ns / 1000, 1))

    def _alloc_slot_id(self) -> int:
        if self._free:
            self._free.sort(reverse=True)
            return self._free.pop()
        if self._next_slot >= self._max_slots:
            raise MemslotError(f"no free KVM memslot (the host allows {self._max_slots})")
        self._next_slot += 1
        return self._next_slot - 1

    def slots(self) -> list[Memslot]:
        return list(self._snap.slots)

    def lookup(self, gpa: int) -> Memslot | None:
        snap = self._snap
        i = bisect.bisect_right(snap.starts, gpa) - 1
        if i >= 0 and gpa < snap.slots[i].end:
            return snap.slots[i]
        return None

    def owned_by(self, owner: str) -> list[Memslot]:
        return [s for s in self._snap.slots if s.owner == owner]
