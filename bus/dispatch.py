"""Address-range dispatch from a vCPU exit to the device that owns the address.

One `Bus` serves port I/O and another MMIO. Ranges never overlap (checked at registration).
An access nobody claims reads as all-ones and writes are dropped, as on real hardware; it is
counted per address and logged once, never fatal.
"""

from __future__ import annotations

from bisect import bisect_right
import logging
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("pyvmm.bus")


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> bytes: ...
    def write(self, offset: int, data: bytes) -> None: ...


class BusOverlapError(ValueError):
    """A registration overlaps a range that is already claimed."""


@dataclass(frozen=True)
class BusRange:
    base: int
    size: int
    device: BusDevice
    name: str

    @property
    def end(self) -> int:
        return self.base + self.size


class Bus:
    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        # (sorted bases, ranges), replaced as one tuple on change so lookups need no lock.
        self._table: tuple[list[int], list[BusRange]] = ([], [])
        self.unclaimed: dict[int, int] = {}
        self.device_errors: Counter[str] = Counter()

    def register(self, base: int, size: int, device: BusDevice, name: str) -> BusRange:
        if size <= 0 or base < 0:
            raise ValueError(f"{self.name}: bad range {base:#x}+{size:#x} for {name}")
        with self._lock:
            bases, ranges = self._table
            i = bisect_right(bases, base)
            for neighbour in ranges[max(i - 1, 0):i + 1]:
                if neighbour.base < base + size and base < neighbour.end:
                    raise BusOverlapError(f"{self.name}: {name} at {base:#x}+{size:#x} overlaps "
                                          f"{neighbour.name} at {neighbour.base:#x}+{neighbour.size:#x}")
            r = BusRange(base, size, device, name)
            self._table = (bases[:i] + [base] + bases[i:], ranges[:i] + [r] + ranges[i:])
            return r

    def unregister(self, r: BusRange) -> None:
        with self._lock:
            bases, ranges = self._table
            i = ranges.index(r)
            self._table = (bases[:i] + bases[i + 1:], ranges[:i] + ranges[i + 1:])

    def find(self, addr: int) -> BusRange | None:
        bases, ranges = self._table
        i = bisect_right(bases, addr) - 1
        if i >= 0:
            r = ranges[i]
            if addr < r.base + r.size:
                return r
        return None

    def ranges(self) -> list[BusRange]:
        return list(self._table[1])

    # read and write repeat find()'s lookup inline: they run on every I/O exit, and a call
    # costs more than the lookup itself.
    def read(self, addr: int, size: int) -> bytes:
        bases, ranges = self._table
        i = bisect_right(bases, addr) - 1
        r = ranges[i] if i >= 0 else None
        if r is None or addr >= r.base + r.size:
            self._unclaimed(addr, "read", size)
            return b"\xff" * size
        try:
            data = r.device.read(addr - r.base, size)
        except Exception:  # a device bug must not kill the vCPU thread
            self._device_error(r, addr, "read")
            return b"\xff" * size
        return data if len(data) == size else (data + b"\xff" * size)[:size]

    def write(self, addr: int, data: bytes) -> None:
        bases, ranges = self._table
        i = bisect_right(bases, addr) - 1
        r = ranges[i] if i >= 0 else None
        if r is None or addr >= r.base + r.size:
            self._unclaimed(addr, "write", len(data))
            return
        try:
            r.device.write(addr - r.base, data)
        except Exception:
            self._device_error(r, addr, "write")

    def _unclaimed(self, addr: int, kind: str, size: int) -> None:
        n = self.unclaimed.get(addr, 0)
        self.unclaimed[addr] = n + 1
        if not n:
            log.info("%s: unclaimed %d-byte %s at %#x (logged once per address)", self.name, size, kind, addr)

    def _device_error(self, r: BusRange, addr: int, kind: str) -> None:
        self.device_errors[r.name] += 1
        if self.device_errors[r.name] == 1:
            log.exception("%s: %s raised on a %s at %#x", self.name, r.name, kind, addr)

    def stats(self) -> dict:
        return {"unclaimed-accesses": sum(self.unclaimed.values()),
                "unclaimed-addresses": len(self.unclaimed),
                "device-errors": dict(self.device_errors)}
