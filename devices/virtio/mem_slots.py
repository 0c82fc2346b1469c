"""Dynamic KVM memslots for one virtio-mem region.

The region is cut into fixed-size slots (the last one may be shorter). A slot is registered
with KVM, through the `MemslotManager`, while at least one of its blocks is plugged: the
device registers the slots a PLUG touches right after it has answered the PLUG (until then
the region's MMIO trap serves the plugged blocks), and drops a slot once its last block is
unplugged and the answer is out. A guest that touches a slot with nothing plugged therefore
gets an MMIO exit instead of silently faulting in host memory, and KVM's shadow MMU keeps
per-page metadata (rmaps) only for slots in use.

This module only tracks which slots are mapped and how many plugged blocks each holds; the
device (`devices/virtio/mem.py`) owns the block bitmap and the host-memory discards.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmm.hostmem import HostMapping
from vmm.memslots import Memslot, MemslotManager

MiB, GiB = 1 << 20, 1 << 30

# Default slot size, and why.
# - Cost of a slot here: KVM allocates the shadow MMU's reverse maps for the whole slot when
#   it is added (about 0.45 ms per GiB), and a touched slot costs about 1.3 ms per GiB to
#   delete after MADV_DONTNEED (docs: host-kvm.md). With 1 GiB slots (QEMU's minimum) the
#   first 2 MiB block plugged into an empty slot pays for a whole GiB; with 128 MiB it pays
#   about 56 us.
# - 128 MiB is also the x86 Linux memory-block (section) size, the unit in which the guest
#   driver adds and removes memory: a slot then appears when the guest adds a memory block
#   and disappears when it removes it, so slots track the guest's own granularity.
#   Firecracker chose the same 128 MiB.
# - Slots are not free either: each one is a KVM memslot (32764 on this host, shared with boot
#   RAM, other virtio-mem devices and hv-balloon) and the MemslotManager copies its sorted
#   table on every change. So one device uses at most MAX_MEMSLOTS_PER_DEVICE slots: the slot
#   size doubles until the region fits (a 1 TiB region gets 1 GiB slots, as in QEMU).
DEFAULT_MEMSLOT_SIZE = 128 * MiB
MAX_MEMSLOTS_PER_DEVICE = 1024


def default_memslot_size(region_size: int, block_size: int) -> int:
    """The slot size for a region: 128 MiB (at least one block), doubled until ≤ 1024 slots."""
    size = max(DEFAULT_MEMSLOT_SIZE, block_size)
    while -(-region_size // size) > MAX_MEMSLOTS_PER_DEVICE:
        size *= 2
    return size


@dataclass
class SlotStats:
    adds: int = 0
    removes: int = 0
    failures: int = 0  # KVM refused an add or a remove


class SlotMap:
    """Which slots of a virtio-mem region are registered with KVM, and their plugged-block counts."""

    def __init__(self, memslots: MemslotManager, mapping: HostMapping, gpa: int, region_size: int,
                 slot_size: int, block_size: int, owner: str) -> None:
        if slot_size <= 0 or slot_size % block_size:
            raise ValueError(f"memslot size {slot_size:#x} must be a positive multiple of the block size {block_size:#x}")
        self._memslots = memslots
        self._mapping = mapping
        self.gpa = gpa
        self.region_size = region_size
        self.slot_size = slot_size
        self.block_size = block_size
        self.owner = owner
        self.blocks_per_slot = slot_size // block_size
        self.count = -(-region_size // slot_size)
        self._plugged = [0] * self.count            # plugged blocks per slot
        self._mapped: list[Memslot | None] = [None] * self.count
        self.stats = SlotStats()

    # --- geometry ---
    def slot_extent(self, index: int) -> tuple[int, int]:
        """(offset into the region, size) of slot `index`; the last slot may be shorter."""
        offset = index * self.slot_size
        return offset, min(self.slot_size, self.region_size - offset)

    def _overlaps(self, first_block: int, nb_blocks: int):
        """(slot index, blocks of the range inside that slot) for each slot the range touches."""
        end = first_block + nb_blocks
        for index in range(first_block // self.blocks_per_slot, (end - 1) // self.blocks_per_slot + 1):
            lo = max(first_block, index * self.blocks_per_slot)
            hi = min(end, (index + 1) * self.blocks_per_slot)
            yield index, hi - lo

    # --- state ---
    def is_mapped(self, index: int) -> bool:
        return self._mapped[index] is not None

    def mapped_count(self) -> int:
        return sum(ms is not None for ms in self._mapped)

    def plugged_in(self, index: int) -> int:
        return self._plugged[index]

    def mapped_slots(self) -> list[Memslot]:
        return [ms for ms in self._mapped if ms is not None]

    # --- plug ---
    def map_for_plug(self, first_block: int, nb_blocks: int, in_use_only: bool = False) -> list[int]:
        """Register every slot the range touches that is not registered yet (with
        `in_use_only`, only those that hold plugged blocks).

        Returns the indices it newly registered (for `unmap_unused` on a later failure). If
        KVM refuses one, the slots registered by this call are removed again and the error
        propagates, so a failed PLUG leaves the slot map as it found it.
        """
        added: list[int] = []
        try:
            for index, _ in self._overlaps(first_block, nb_blocks):
                if self._mapped[index] is None and not (in_use_only and self._plugged[index] == 0):
                    offset, size = self.slot_extent(index)
                    self._mapped[index] = self._memslots.add(self.gpa + offset, size, self._mapping, offset, self.owner)
                    self.stats.adds += 1
                    added.append(index)
        except Exception:
            self.stats.failures += 1
            self.unmap_unused(added)
            raise
        return added

    def account_plug(self, first_block: int, nb_blocks: int) -> None:
        """Count newly plugged blocks (all of them were unplugged; their slots are mapped)."""
        for index, n in self._overlaps(first_block, nb_blocks):
            self._plugged[index] += n

    # --- unplug ---
    def account_unplug(self, first_block: int, nb_blocks: int) -> int:
        """Count unplugged blocks and drop every slot left with none. Returns slots removed."""
        return self.unmap_unused(self.count_unplug(first_block, nb_blocks))

    def count_unplug(self, first_block: int, nb_blocks: int) -> list[int]:
        """Count unplugged blocks; returns the slots left with none, still registered."""
        emptied = []
        for index, n in self._overlaps(first_block, nb_blocks):
            self._plugged[index] -= n
            if self._plugged[index] == 0:
                emptied.append(index)
        return emptied

    def unmap_unused(self, indices: list[int]) -> int:
        """Remove the KVM slots among `indices` that hold no plugged block. Returns slots removed.

        A remove KVM refuses is counted and the slot stays registered (its memory is already
        discarded, so only the shadow-MMU metadata lingers until the next reset).
        """
        removed = 0
        for index in indices:
            ms = self._mapped[index]
            if ms is None or self._plugged[index]:
                continue
            try:
                self._memslots.remove(ms)
            except Exception:
                self.stats.failures += 1
                continue
            self._mapped[index] = None
            self.stats.removes += 1
            removed += 1
        return removed

    def clear(self) -> int:
        """Forget all plugged blocks and remove every registered slot (unplug-all, reset)."""
        self._plugged = [0] * self.count
        return self.unmap_unused(list(range(self.count)))
