"""Tests for the memslot manager (fake KVM backend), guest-physical access and the RAM layout."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from vmm.hostmem import HostMapping
from vmm.memory import GuestMemory, GuestMemoryError, ram_end, ram_layout
from vmm.memslots import MemslotError, MemslotManager

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
HOST_BASE = 0x7F00_0000_0000


@dataclass
class FakeMapping:
    """What a memslot needs of a HostMapping: its host address and size."""

    size: int
    addr: int = HOST_BASE


class FakeBackend:
    """Records KVM_SET_USER_MEMORY_REGION calls; can be told to fail the next one."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int, int, int]] = []
        self.fail_next: Exception | None = None

    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0) -> None:
        if self.fail_next is not None:
            e, self.fail_next = self.fail_next, None
            raise e
        self.calls.append((slot, gpa, size, host_addr, flags))


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def mgr(backend: FakeBackend) -> MemslotManager:
    return MemslotManager(backend)


def test_add_programs_kvm_with_host_address_and_offset(mgr: MemslotManager, backend: FakeBackend) -> None:
    m = FakeMapping(1 * GiB)
    low = mgr.add(0, 256 * MiB, m, 0, "ram")
    high = mgr.add(4 * GiB, 128 * MiB, m, 256 * MiB, "ram", flags=2)
    assert backend.calls == [(0, 0, 256 * MiB, HOST_BASE, 0),
                             (1, 4 * GiB, 128 * MiB, HOST_BASE + 256 * MiB, 2)]
    assert (low.slot, high.slot) == (0, 1)
    assert high.host_addr == HOST_BASE + 256 * MiB and high.end == 4 * GiB + 128 * MiB
    assert high.as_dict() == {"slot": 1, "gpa": 4 * GiB, "size": 128 * MiB, "host-addr": HOST_BASE + 256 * MiB,
                              "owner": "ram", "readonly": True}
    assert mgr.stats.adds == 2 and mgr.stats.removes == 0


def test_remove_deletes_the_slot_with_size_zero(mgr: MemslotManager, backend: FakeBackend) -> None:
    m = FakeMapping(16 * MiB)
    s = mgr.add(0x1000_0000, 16 * MiB, m, 0, "virtio-mem")
    backend.calls.clear()
    mgr.remove(s)
    assert backend.calls == [(s.slot, 0x1000_0000, 0, HOST_BASE, 0)]
    assert mgr.slots() == [] and mgr.lookup(0x1000_0000) is None
    assert mgr.stats.removes == 1
    with pytest.raises(MemslotError):
        mgr.remove(s)  # twice


def test_freed_slot_ids_are_reused_lowest_first(mgr: MemslotManager) -> None:
    m = FakeMapping(64 * MiB)
    slots = [mgr.add(i * 4 * MiB, 4 * MiB, m, i * 4 * MiB, "x") for i in range(5)]
    assert [s.slot for s in slots] == [0, 1, 2, 3, 4]
    mgr.remove(slots[3])
    mgr.remove(slots[1])
    assert mgr.add(0x100 * MiB, 4 * MiB, m, 0, "y").slot == 1
    assert mgr.add(0x200 * MiB, 4 * MiB, m, 0, "y").slot == 3
    assert mgr.add(0x300 * MiB, 4 * MiB, m, 0, "y").slot == 5


@pytest.mark.parametrize("gpa,size", [
    (0x100_0000, 0x1000),           # same start
    (0x0FF_F000, 0x2000),           # straddles the start
    (0x1FF_F000, 0x2000),           # straddles the end
    (0x140_0000, 0x1000),           # inside
    (0x0, 0x400_0000),              # covers it
])
def test_overlap_is_refused(mgr: MemslotManager, backend: FakeBackend, gpa: int, size: int) -> None:
    m = FakeMapping(256 * MiB)
    mgr.add(0x100_0000, 0x100_0000, m, 0, "ram")
    calls = list(backend.calls)
    with pytest.raises(MemslotError, match="overlaps"):
        mgr.add(gpa, size, m, 0, "intruder")
    assert backend.calls == calls, "KVM must not be asked for a refused slot"
    assert len(mgr.slots()) == 1


def test_adjacent_slots_are_allowed(mgr: MemslotManager) -> None:
    m = FakeMapping(64 * MiB)
    mgr.add(0x100_0000, 0x100_0000, m, 0, "a")
    mgr.add(0x200_0000, 0x100_0000, m, 0x100_0000, "b")
    mgr.add(0x0, 0x100_0000, m, 0x200_0000, "c")
    assert [s.owner for s in mgr.slots()] == ["c", "a", "b"]  # sorted by GPA


@pytest.mark.parametrize("gpa,size,offset", [
    (0x800, 0x1000, 0),        # gpa not page aligned
    (0x1000, 0x1800, 0),       # size not page aligned
    (0x1000, 0x1000, 0x10),    # offset not page aligned
    (0x1000, 0, 0),            # empty
    (0x1000, -0x1000, 0),      # negative size
])
def test_misaligned_or_empty_requests_are_refused(mgr: MemslotManager, backend: FakeBackend,
                                                  gpa: int, size: int, offset: int) -> None:
    with pytest.raises(MemslotError):
        mgr.add(gpa, size, FakeMapping(1 * MiB), offset, "x")
    assert backend.calls == []


@pytest.mark.parametrize("gpa,offset", [(0, -0x1000), (-0x1000, 0)])
def test_negative_offsets_and_addresses_are_refused(mgr: MemslotManager, backend: FakeBackend,
                                                    gpa: int, offset: int) -> None:
    """A negative offset would hand KVM a host address below the mapping."""
    with pytest.raises(MemslotError):
        mgr.add(gpa, 0x1000, FakeMapping(1 * MiB), offset, "x")
    assert backend.calls == []


def test_slot_beyond_its_mapping_is_refused(mgr: MemslotManager, backend: FakeBackend) -> None:
    with pytest.raises(MemslotError, match="exceeds"):
        mgr.add(0, 2 * MiB, FakeMapping(2 * MiB), 0x1000, "x")
    assert backend.calls == []
    mgr.add(0, 2 * MiB - 0x1000, FakeMapping(2 * MiB), 0x1000, "x")  # exactly to the end is fine


def test_backend_failure_leaves_no_slot_and_frees_the_id(mgr: MemslotManager, backend: FakeBackend) -> None:
    m = FakeMapping(8 * MiB)
    backend.fail_next = OSError(22, "Invalid argument")
    with pytest.raises(OSError):
        mgr.add(0, 4 * MiB, m, 0, "x")
    assert mgr.slots() == [] and mgr.lookup(0) is None and mgr.stats.adds == 0
    assert mgr.add(0, 4 * MiB, m, 0, "x").slot == 0, "the id of the failed add is free again"


def test_backend_failure_on_remove_keeps_the_slot(mgr: MemslotManager, backend: FakeBackend) -> None:
    s = mgr.add(0, 4 * MiB, FakeMapping(4 * MiB), 0, "x")
    backend.fail_next = OSError(16, "Device or resource busy")
    with pytest.raises(OSError):
        mgr.remove(s)
    assert mgr.lookup(0) == s


def test_running_out_of_slots(backend: FakeBackend) -> None:
    mgr = MemslotManager(backend, max_slots=3)
    m = FakeMapping(64 * MiB)
    slots = [mgr.add(i * MiB, MiB, m, 0, "x") for i in range(3)]
    with pytest.raises(MemslotError, match="no free"):
        mgr.add(16 * MiB, MiB, m, 0, "x")
    assert len(backend.calls) == 3
    mgr.remove(slots[0])
    assert mgr.add(16 * MiB, MiB, m, 0, "x").slot == 0


def test_lookup(mgr: MemslotManager) -> None:
    m = FakeMapping(64 * MiB)
    a = mgr.add(0x10_0000, 0x10_0000, m, 0, "a")
    b = mgr.add(0x40_0000, 0x10_0000, m, 0, "b")
    assert mgr.lookup(0x10_0000) is a and mgr.lookup(0x1F_FFFF) is a
    assert mgr.lookup(0x20_0000) is None and mgr.lookup(0x0) is None
    assert mgr.lookup(0x40_0000) is b and mgr.lookup(0x4F_FFFF) is b and mgr.lookup(0x50_0000) is None
    assert mgr.owned_by("b") == [b] and mgr.owned_by("nobody") == []


def test_listeners_see_every_change_after_it_happened(mgr: MemslotManager) -> None:
    seen = []
    mgr.add_listener(lambda what, s: seen.append((what, s.slot, mgr.lookup(s.gpa) is not None)))
    s = mgr.add(0, 4 * MiB, FakeMapping(4 * MiB), 0, "x")
    mgr.remove(s)
    assert seen == [("add", 0, True), ("remove", 0, False)]


def test_slots_snapshot_is_a_copy(mgr: MemslotManager) -> None:
    mgr.add(0, MiB, FakeMapping(MiB), 0, "x")
    snapshot = mgr.slots()
    snapshot.clear()
    assert len(mgr.slots()) == 1


# ------------------------------------------------------------------------------ GuestMemory


@pytest.fixture
def guest() -> GuestMemory:
    """Two slots over one real 8 MiB mapping: GPA 0..4M -> offset 0, GPA 16M..20M -> offset 4M."""
    mapping = HostMapping(8 * MiB, "anon", "test")
    mgr = MemslotManager(FakeBackend())
    mgr.add(0, 4 * MiB, mapping, 0, "low")
    mgr.add(16 * MiB, 4 * MiB, mapping, 4 * MiB, "high")
    yield GuestMemory(mgr)
    mapping.close()


def test_guest_memory_reads_what_it_wrote(guest: GuestMemory) -> None:
    guest.write(0x7000, b"boot params")
    guest.write(16 * MiB + 0x123, b"\x01\x02\x03\x04\x05\x06\x07\x08")
    assert guest.read(0x7000, 11) == b"boot params"
    assert guest.read_u32(16 * MiB + 0x123) == 0x04030201
    assert guest.read_u64(16 * MiB + 0x123) == 0x0807060504030201
    assert bytes(guest.view(0x7000, 4)) == b"boot"
    assert guest.read_phys(0x7000, 4) == b"boot"
    # the second slot is backed by the mapping at offset 4 MiB: the low slot does not see it
    assert guest.read(0x123, 8) == bytes(8)


def test_guest_memory_view_writes_through(guest: GuestMemory) -> None:
    guest.view(0x2000, 4)[:] = b"abcd"
    assert guest.read(0x2000, 4) == b"abcd"


@pytest.mark.parametrize("gpa,size", [
    (4 * MiB, 1),            # just past the low slot
    (4 * MiB - 2, 4),        # straddles its end
    (8 * MiB, 4),            # in the hole
    (20 * MiB - 1, 2),       # straddles the high slot's end
    (-4, 4),                 # negative
])
def test_guest_memory_outside_slots_raises(guest: GuestMemory, gpa: int, size: int) -> None:
    with pytest.raises(GuestMemoryError):
        guest.read(gpa, size)
    with pytest.raises(GuestMemoryError):
        guest.write(gpa, b"\0" * size)


# ------------------------------------------------------------------------------ RAM layout


def test_ram_layout_below_the_hole() -> None:
    layout = ram_layout(256 * MiB)
    assert [(r.gpa, r.size, r.offset) for r in layout] == [(0, 256 * MiB, 0)]
    assert ram_end(256 * MiB) == 256 * MiB


def test_ram_layout_exactly_3gib_needs_no_high_part() -> None:
    assert [(r.gpa, r.size, r.offset) for r in ram_layout(3 * GiB)] == [(0, 3 * GiB, 0)]


def test_ram_layout_splits_around_the_hole() -> None:
    layout = ram_layout(5 * GiB)
    assert [(r.gpa, r.size, r.offset) for r in layout] == [(0, 3 * GiB, 0), (4 * GiB, 2 * GiB, 3 * GiB)]
    assert layout[1].end == ram_end(5 * GiB) == 6 * GiB
    assert sum(r.size for r in layout) == 5 * GiB
    # nothing of RAM lands in 3..4 GiB (IOAPIC 0xfec00000, LAPIC 0xfee00000, virtio-mmio 0xd0000000)
    for addr in (0xD000_0000, 0xFEC0_0000, 0xFEE0_0000):
        assert not any(r.gpa <= addr < r.end for r in layout)
