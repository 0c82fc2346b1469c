"""The hv-balloon's host-memory seams over the memslot manager: discards through memslots,
hot-add slots registered on demand, and the device wired to both with real host mappings
(the KVM backend only records KVM_SET_USER_MEMORY_REGION calls)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from devices.hyperv.balloon import HvBalloon
from devices.hyperv.balloon_memory import HotAddSlots, MemslotDiscard
from tests.hv_balloon_guest import FakeChannel, LinuxDmGuest
from vmm.hostmem import HostMapping, HostMemoryError
from vmm.memslots import MemslotManager

MiB, GiB = 1 << 20, 1 << 30
PAGE = 4096


class RecordingKvm:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []  # (slot, gpa, size); size 0 removes
        self.fail_gpa: int | None = None

    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0) -> None:
        if size and gpa == self.fail_gpa:
            raise OSError(28, "No space left on device")
        self.calls.append((slot, gpa, size))


@pytest.fixture
def kvm() -> RecordingKvm:
    return RecordingKvm()


@pytest.fixture
def region():
    mapping = HostMapping(64 * MiB, name="hv-balloon-test")
    yield mapping
    mapping.close()


def test_hot_add_slots_register_only_what_is_asked(kvm: RecordingKvm, region: HostMapping) -> None:
    slots = HotAddSlots(MemslotManager(kvm), region, 1 * GiB, slot_size=16 * MiB)
    slots.map(1 * GiB + 20 * MiB, 8 * MiB)
    assert slots.mapped() == [(1 * GiB + 16 * MiB, 16 * MiB)]
    slots.map(1 * GiB + 16 * MiB, 16 * MiB)  # already mapped: nothing new
    slots.map(1 * GiB + 24 * MiB, 16 * MiB)  # runs into the next slot
    assert slots.mapped() == [(1 * GiB + 16 * MiB, 16 * MiB), (1 * GiB + 32 * MiB, 16 * MiB)]
    assert [c[1:] for c in kvm.calls] == [(1 * GiB + 16 * MiB, 16 * MiB), (1 * GiB + 32 * MiB, 16 * MiB)]
    with pytest.raises(HostMemoryError):
        slots.map(1 * GiB + 60 * MiB, 8 * MiB)  # beyond the region
    with pytest.raises(HostMemoryError):
        slots.map(1 * GiB - PAGE, 2 * PAGE)


def test_unmap_all_drops_every_slot_and_the_memory(kvm: RecordingKvm, region: HostMapping) -> None:
    manager = MemslotManager(kvm)
    slots = HotAddSlots(manager, region, 1 * GiB, slot_size=16 * MiB)
    slots.map(1 * GiB, 40 * MiB)
    region.write(17 * MiB, b"guest data")
    slots.unmap_all()
    assert slots.mapped() == [] and manager.slots() == []
    assert sorted(c[1] for c in kvm.calls if c[2] == 0) == [1 * GiB, 1 * GiB + 16 * MiB, 1 * GiB + 32 * MiB]
    assert region.read(17 * MiB, 10) == bytes(10)
    assert slots.stats.adds == 3 and slots.stats.removes == 3


def test_a_refused_slot_leaves_the_region_as_it_was(kvm: RecordingKvm, region: HostMapping) -> None:
    manager = MemslotManager(kvm)
    slots = HotAddSlots(manager, region, 1 * GiB, slot_size=16 * MiB)
    kvm.fail_gpa = 1 * GiB + 32 * MiB
    with pytest.raises(OSError):
        slots.map(1 * GiB, 48 * MiB)
    assert slots.mapped() == [] and manager.slots() == [] and slots.stats.failures == 1


def test_default_slot_size_follows_virtio_mem(kvm: RecordingKvm, region: HostMapping) -> None:
    assert HotAddSlots(MemslotManager(kvm), region, 1 * GiB).slot_size == 128 * MiB


@dataclass
class RecordingMapping:
    """What a memslot needs of a mapping, recording discards; `backend` as HostMapping's."""

    size: int
    backend: str = "anon"
    addr: int = 0x7F00_0000_0000
    discards: list[tuple[int, int]] = field(default_factory=list)

    def discard(self, offset: int, length: int) -> None:
        self.discards.append((offset, length))


def test_discard_follows_the_memslots(kvm: RecordingKvm) -> None:
    manager = MemslotManager(kvm)
    ram = HostMapping(8 * MiB, name="ram-test")
    try:
        manager.add(0, 4 * MiB, ram, 0, "ram")
        manager.add(4 * MiB, 4 * MiB, ram, 4 * MiB, "ram")  # a second slot, adjacent
        ram.write(3 * MiB, b"a" * PAGE)
        ram.write(5 * MiB, b"b" * PAGE)
        ram.write(7 * MiB, b"c" * PAGE)
        memory = MemslotDiscard(manager)
        memory.discard(3 * MiB, 3 * MiB)  # spans both slots
        assert ram.read(3 * MiB, PAGE) == bytes(PAGE) and ram.read(5 * MiB, PAGE) == bytes(PAGE)
        assert ram.read(7 * MiB, PAGE) == b"c" * PAGE
        assert memory.stats.bytes == 3 * MiB
        with pytest.raises(HostMemoryError):
            memory.discard(8 * MiB, PAGE)  # no slot there
        with pytest.raises(HostMemoryError):
            memory.discard(PAGE + 1, PAGE)
        memory.reclaim(3 * MiB, PAGE)  # nothing to do for anonymous memory
        assert memory.stats.reclaims == 1
    finally:
        ram.close()


def test_hugetlb_slots_give_back_only_whole_huge_pages(kvm: RecordingKvm) -> None:
    manager = MemslotManager(kvm)
    huge = RecordingMapping(16 * MiB, backend="hugetlb")
    manager.add(1 * GiB, 16 * MiB, huge, 0, "ram")
    memory = MemslotDiscard(manager)
    memory.discard(1 * GiB + 1 * MiB, 6 * MiB)   # covers the huge pages at 2 and 4 MiB only
    memory.discard(1 * GiB + 9 * MiB, 512 * 1024)  # inside one huge page: nothing to give back
    assert huge.discards == [(2 * MiB, 4 * MiB)]
    assert memory.stats.skipped_bytes == 2 * MiB + 512 * 1024


def test_device_wired_to_real_memory(kvm: RecordingKvm, region: HostMapping) -> None:
    """Ballooned boot RAM reads back as zeros; hot-add registers a slot before the guest hears of it."""
    manager = MemslotManager(kvm)
    ram = HostMapping(64 * MiB, name="ram-test")
    try:
        manager.add(0, 64 * MiB, ram, 0, "ram")
        ram.buf[:] = b"\x5a" * (64 * MiB)
        hot_add = HotAddSlots(manager, region, 128 * MiB, slot_size=32 * MiB)
        dev = HvBalloon("hvb0", boot_ram=[(0, 64 * MiB)], memory=MemslotDiscard(manager),
                        hot_add_gpa=128 * MiB, hot_add_size=64 * MiB, hot_add=hot_add)
        channel = FakeChannel()
        guest = LinuxDmGuest(dev, channel, [(0, 64 * MiB)], alignment=5)  # 32 MiB blocks
        assert guest.connect()
        dev.set_target(48 * MiB)
        guest.run()
        ballooned = dev.ballooned_ranges()
        assert sum(n for _, n in ballooned) == 16 * MiB // PAGE
        for start, count in ballooned:
            assert ram.read(start * PAGE, count * PAGE) == bytes(count * PAGE)
        assert ram.read(0, 64 * MiB).count(0x5A) == 48 * MiB  # the rest untouched

        dev.set_target(64 * MiB + 32 * MiB)  # unballoon 16 MiB, then hot-add one 32 MiB block
        guest.run()
        assert dev.actual == 96 * MiB
        assert [(s.gpa, s.size, s.owner) for s in manager.owned_by("hv-balloon")] == [(128 * MiB, 32 * MiB, "hv-balloon")]
        dev.reset()
        assert manager.owned_by("hv-balloon") == [] and dev.actual == 64 * MiB
    finally:
        ram.close()
