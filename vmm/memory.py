"""Guest-physical memory access and the boot RAM layout.

`GuestMemory` reads and writes guest-physical addresses through the memslot manager, so a
device sees exactly what the guest sees: an address outside every slot raises
`GuestMemoryError` (a device turns that into its protocol's error answer). `RamLayout`
places boot RAM around the 32-bit MMIO hole.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmm.memslots import MemslotManager

MMIO_HOLE_START = 3 << 30  # 3 GiB: the 32-bit window for the IOAPIC, LAPIC and device MMIO
MMIO_HOLE_END = 4 << 30


class GuestMemoryError(Exception):
    """A guest-physical access fell outside mapped guest memory."""


@dataclass(frozen=True)
class RamRange:
    gpa: int
    size: int
    offset: int  # into the RAM host mapping

    @property
    def end(self) -> int:
        return self.gpa + self.size


def ram_layout(size: int) -> list[RamRange]:
    """Boot RAM: below the 32-bit hole, the rest from 4 GiB up."""
    low = min(size, MMIO_HOLE_START)
    ranges = [RamRange(0, low, 0)]
    if size > low:
        ranges.append(RamRange(MMIO_HOLE_END, size - low, low))
    return ranges


def ram_end(size: int) -> int:
    """First guest-physical address above boot RAM."""
    return ram_layout(size)[-1].end


# The memslot owner of boot RAM (vmm/machine.py), the one memory that never goes away.
STABLE_OWNER = "ram"


class GuestMemory:
    def __init__(self, slots: MemslotManager) -> None:
        self.slots = slots

    def _locate(self, gpa: int, size: int):
        ms = self.slots.lookup(gpa)
        if ms is None or gpa < 0 or gpa + size > ms.end:
            raise GuestMemoryError(f"guest-physical range {gpa:#x}+{size:#x} is not backed by guest memory")
        return ms.mapping, ms.offset + (gpa - ms.gpa)

    def read(self, gpa: int, size: int) -> bytes:
        mapping, off = self._locate(gpa, size)
        return mapping.read(off, size)

    def write(self, gpa: int, data: bytes) -> None:
        mapping, off = self._locate(gpa, len(data))
        mapping.write(off, data)

    def view(self, gpa: int, size: int) -> memoryview:
        mapping, off = self._locate(gpa, size)
        return mapping.view(off, size)

    def stable_view(self, gpa: int, size: int) -> memoryview | None:
        """A view of [gpa, gpa+size) that stays valid for the VM's life, or None.

        Only boot RAM qualifies: its memslots are registered once and its mapping is neither
        protected nor unmapped while the VM runs, whereas hot-plugged memory (virtio-mem,
        hv-balloon hot-add) may be made inaccessible at any time. Devices cache such views
        for structures they touch on every request, such as virtqueue rings.
        """
        region = self.stable_region(gpa)
        if region is None or size < 0 or gpa + size > region[0] + len(region[1]):
            return None
        start = gpa - region[0]
        return region[1][start:start + size]

    def stable_region(self, gpa: int) -> tuple[int, memoryview] | None:
        """(first guest-physical address, view) of the whole boot-RAM memslot holding `gpa`,
        or None if `gpa` is not boot RAM. Same lifetime guarantee as `stable_view`."""
        ms = self.slots.lookup(gpa)
        if ms is None or ms.owner != STABLE_OWNER:
            return None
        return ms.gpa, ms.mapping.view(ms.offset, ms.size)

    def read_u32(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 4), "little")

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 8), "little")

    # the emulation assist's GuestMemory protocol
    read_phys = read
    write_phys = write
