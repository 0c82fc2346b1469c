"""Split virtqueue, device side: chains through real rings in (bytearray-backed) guest memory,
every validation error, indirect tables, interrupt suppression and event index."""

from __future__ import annotations

import struct

import pytest

from devices.virtio.queue import (
    MAX_CHAIN_BYTES,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    DescriptorChain,
    Virtqueue,
    VirtqueueError,
    vring_need_event,
)
from tests.virtio_driver import (
    MALFORMED_CHAINS,
    DriverQueue,
    GuestAllocator,
    MiB,
    make_guest_memory,
)

KiB = 1 << 10


class Rig:
    """A driver-side queue and the device-side Virtqueue over the same rings."""

    # The memslot owner of the rig's memory: "ram" lets the queue cache ring views (boot
    # RAM), anything else makes it look every ring access up; the fixture below runs each
    # test both ways.
    OWNER: str | None = None

    def __init__(self, size: int = 8, event_idx: bool = False, indirect: bool = True,
                 regions=((0, MiB),), max_chain_bytes: int = 16 * MiB) -> None:
        self.mem = make_guest_memory(regions, owner=self.OWNER)
        self.alloc = GuestAllocator.for_memory(self.mem)
        self.kicks: list[int] = []
        self.dq = DriverQueue(self.mem, self.alloc, 0, size, self.kicks.append, event_idx=event_idx)
        self.vq = Virtqueue(self.mem, size, self.dq.desc_addr, self.dq.avail_addr, self.dq.used_addr,
                            event_idx, indirect=indirect, max_chain_bytes=max_chain_bytes)

    def echo_all(self) -> int:
        """Serve every pending chain by writing back its readable bytes reversed."""
        n = 0
        while (chain := self.vq.pop()) is not None:
            data = chain.read_all(self.mem)[::-1]
            self.vq.push(chain, chain.write(self.mem, data[:chain.writable_len]))
            n += 1
        return n


@pytest.fixture(autouse=True, params=["looked-up rings", "cached ring views"])
def ring_access(request, monkeypatch) -> str:
    monkeypatch.setattr(Rig, "OWNER", "ram" if request.param == "cached ring views" else None)
    return request.param


def test_ring_views_are_cached_only_in_boot_ram(ring_access: str) -> None:
    rig = Rig()
    cached = ring_access == "cached ring views"
    assert (rig.vq._avail16 is not None) == cached and (rig.vq._desc_view is not None) == cached
    rig.dq.add([b"x"], [1])
    chain = rig.vq.pop()
    rig.vq.push(chain, chain.write(rig.mem, b"y"))
    [used] = rig.dq.get_used()
    assert (used.head, used.data) == (chain.head, b"y")


def test_chain_buffers_come_out_in_order_and_round_trip() -> None:
    rig = Rig()
    head = rig.dq.add([b"abc", b"de"], [4, 8])
    chain = rig.vq.pop()
    assert chain.head == head
    assert [n for _, n in chain.readable] == [3, 2] and [n for _, n in chain.writable] == [4, 8]
    assert chain.readable_len == 5 and chain.writable_len == 12
    assert chain.read_all(rig.mem) == b"abcde"
    assert chain.write(rig.mem, b"0123456") == 7  # spans the first writable buffer into the second
    rig.vq.push(chain, 7)
    assert rig.vq.pop() is None
    [used] = rig.dq.get_used()
    assert (used.head, used.length, used.data) == (head, 7, b"0123456")


def test_empty_queue_pops_nothing_and_leaves_used_ring_alone() -> None:
    rig = Rig()
    assert rig.vq.pop() is None
    assert rig.dq.used_idx == 0 and rig.vq.broken is None


def test_indirect_chain_reads_like_a_direct_one() -> None:
    rig = Rig()
    head = rig.dq.add([b"hello", b" world"], [5, 6], indirect=True)
    chain = rig.vq.pop()
    assert chain.head == head and chain.read_all(rig.mem) == b"hello world"
    assert chain.writable_len == 11
    rig.vq.push(chain, chain.write(rig.mem, b"dlrow olleh"))
    assert rig.dq.get_used()[0].data == b"dlrow olleh"


def test_indices_wrap_at_16_bits() -> None:
    rig = Rig(size=4)
    start = 0xFFFE
    rig.vq.last_avail_idx = rig.vq.used_idx = rig.vq._signalled_used = start
    rig.dq.avail_idx = rig.dq.last_used = start
    rig.mem.write(rig.dq.avail_addr + 2, struct.pack("<H", start))
    rig.mem.write(rig.dq.used_addr + 2, struct.pack("<H", start))
    seen = []
    for i in range(6):
        rig.dq.add([bytes([i]) * 3], [3])
        assert rig.echo_all() == 1
        seen += [u.data for u in rig.dq.get_used()]
    assert seen == [bytes([i]) * 3 for i in range(6)]
    assert rig.vq.used_idx == rig.dq.used_idx == (start + 6) & 0xFFFF == 4


def test_a_full_ring_of_chains_is_served_in_one_go() -> None:
    rig = Rig(size=8)
    for i in range(8):
        rig.dq.add([bytes([i])], [1], indirect=True)  # one descriptor per chain
    assert rig.echo_all() == 8
    assert [u.data for u in rig.dq.get_used()] == [bytes([i]) for i in range(8)]


def test_buffer_straddling_two_adjacent_memslots() -> None:
    rig = Rig(regions=((0, 64 * KiB), (64 * KiB, 64 * KiB)))
    addr = 64 * KiB - 3
    rig.mem.write(addr, b"abc")
    rig.mem.write(64 * KiB, b"def")
    rig.dq.write_desc(0, addr, 6, VRING_DESC_F_NEXT, 1)
    rig.dq.write_desc(1, addr, 6, VRING_DESC_F_WRITE)
    rig.dq.publish(0)
    chain = rig.vq.pop()
    assert chain.read_all(rig.mem) == b"abcdef"
    assert chain.write(rig.mem, b"UVWXYZ") == 6
    assert rig.mem.read(addr, 3) == b"UVW" and rig.mem.read(64 * KiB, 3) == b"XYZ"


@pytest.mark.parametrize("name", sorted(MALFORMED_CHAINS))
def test_malformed_chain_raises_and_stops_the_queue(name: str) -> None:
    reason, build = MALFORMED_CHAINS[name]
    rig = Rig()
    build(rig.dq)
    with pytest.raises(VirtqueueError) as err:
        rig.vq.pop()
    assert err.value.reason == reason and str(err.value).startswith(reason + ":")
    assert rig.vq.broken == reason
    # Stopped until reset: even a good chain is no longer taken.
    rig.dq.write_desc(2, rig.alloc.alloc(4), 4)
    rig.dq.publish(2)
    assert rig.vq.pop() is None


def test_buffer_in_a_hole_between_memslots() -> None:
    rig = Rig(regions=((0, MiB), (2 * MiB, MiB)))
    rig.dq.write_desc(0, MiB + MiB // 2, 16)
    rig.dq.publish(0)
    with pytest.raises(VirtqueueError, match="gpa-out-of-range"):
        rig.vq.pop()


def test_total_length_over_the_device_limit() -> None:
    rig = Rig(max_chain_bytes=64)
    buf = rig.alloc.alloc(64)
    rig.dq.write_desc(0, buf, 40, VRING_DESC_F_NEXT, 1)
    rig.dq.write_desc(1, buf, 40, VRING_DESC_F_WRITE)
    rig.dq.publish(0)
    with pytest.raises(VirtqueueError) as err:
        rig.vq.pop()
    assert err.value.reason == "chain-too-large"


def test_indirect_refused_when_not_negotiated() -> None:
    rig = Rig(indirect=False)
    rig.dq.add([b"a", b"b"], [], indirect=True)
    with pytest.raises(VirtqueueError) as err:
        rig.vq.pop()
    assert err.value.reason == "indirect-not-negotiated"


def test_chain_longer_than_the_queue_without_a_loop() -> None:
    rig = Rig(size=4)
    buf = rig.alloc.alloc(4)
    for i in range(4):
        rig.dq.write_desc(i, buf, 4, VRING_DESC_F_NEXT, (i + 1) % 4)  # 0->1->2->3->0
    rig.dq.publish(2)
    with pytest.raises(VirtqueueError, match="chain-loop"):
        rig.vq.pop()


@pytest.mark.parametrize("size, desc, avail, used, reason", [
    (6, 0x1000, 0x2000, 0x3000, "bad-queue-config"),            # not a power of two
    (65536, 0x1000, 0x2000, 0x3000, "bad-queue-config"),        # above 32768
    (8, 0x1008, 0x2000, 0x3000, "bad-queue-config"),            # descriptor table misaligned
    (8, 0x1000, 0x2001, 0x3000, "bad-queue-config"),            # avail ring misaligned
    (8, 0x1000, 0x2000, 0x3002, "bad-queue-config"),            # used ring misaligned
    (8, MiB, 0x2000, 0x3000, "ring-out-of-range"),              # descriptor table beyond RAM
    (8, 0x1000, MiB - 8, 0x3000, "ring-out-of-range"),          # avail ring runs off the end
    (8, 0x1000, 0x2000, 1 << 40, "ring-out-of-range"),
])
def test_bad_ring_layout_is_refused_at_construction(size, desc, avail, used, reason) -> None:
    mem = make_guest_memory()
    with pytest.raises(VirtqueueError) as err:
        Virtqueue(mem, size, desc, avail, used)
    assert err.value.reason == reason


def test_write_larger_than_the_writable_buffers() -> None:
    rig = Rig()
    rig.dq.add([b"req"], [4])
    chain = rig.vq.pop()
    with pytest.raises(VirtqueueError) as err:
        chain.write(rig.mem, b"12345")
    assert err.value.reason == "writable-too-small"
    rig.dq.add([b"only readable"], [])
    chain = rig.vq.pop()
    with pytest.raises(VirtqueueError) as err:
        chain.write(rig.mem, b"x")
    assert err.value.reason == "write-to-read-only"


def test_buffer_memory_that_vanishes_after_pop_is_a_chain_error() -> None:
    rig = Rig(regions=((0, MiB), (2 * MiB, MiB)))
    chain = DescriptorChain(0, readable=[(2 * MiB, 8)], writable=[(2 * MiB + 8, 8)])
    rig.mem.slots.remove(rig.mem.slots.lookup(2 * MiB))  # e.g. a virtio-mem block unplugged
    with pytest.raises(VirtqueueError, match="gpa-out-of-range"):
        chain.read_all(rig.mem)
    with pytest.raises(VirtqueueError, match="gpa-out-of-range"):
        chain.write(rig.mem, b"x")


def test_push_checks_written_against_the_chain() -> None:
    rig = Rig()
    rig.dq.add([b"a"], [2])
    chain = rig.vq.pop()
    with pytest.raises(ValueError):
        rig.vq.push(chain, 3)
    assert rig.dq.used_idx == 0


def test_disabled_queue_neither_pops_nor_pushes() -> None:
    rig = Rig()
    rig.dq.add([b"a"], [1])
    chain = rig.vq.pop()
    rig.dq.add([b"b"], [1])
    rig.vq.disable()
    assert rig.vq.pop() is None
    rig.vq.push(chain, 1)
    assert rig.dq.used_idx == 0 and rig.vq.dropped == 1
    placeholder = Virtqueue(rig.mem, 0, 0, 0, 0)
    assert not placeholder.enabled and placeholder.pop() is None


def test_needs_interrupt_respects_no_interrupt_flag() -> None:
    rig = Rig()
    assert not rig.vq.needs_interrupt()  # nothing pushed yet
    rig.dq.add([b"a"], [1])
    rig.echo_all()
    assert rig.vq.needs_interrupt()
    assert not rig.vq.needs_interrupt()  # nothing new since
    rig.dq.disable_interrupts()
    rig.dq.add([b"b"], [1])
    rig.echo_all()
    assert not rig.vq.needs_interrupt()
    rig.dq.enable_interrupts()
    rig.dq.add([b"c"], [1])
    rig.echo_all()
    assert rig.vq.needs_interrupt()


def test_event_idx_interrupts_only_when_used_event_is_crossed() -> None:
    rig = Rig(event_idx=True)
    rig.dq.add([b"a"], [1])
    rig.echo_all()
    assert rig.vq.needs_interrupt()          # used_event 0: the first buffer interrupts
    rig.dq.add([b"b"], [1])
    rig.echo_all()
    assert not rig.vq.needs_interrupt()      # the driver has not caught up: used_event still 0
    assert len(rig.dq.get_used()) == 2       # the driver consumes and moves used_event to 2
    rig.dq.add([b"c"], [1])
    rig.echo_all()
    assert rig.vq.needs_interrupt()
    rig.dq.set_used_event(10)                # "not before the 11th"
    for x in b"de":
        rig.dq.add([bytes([x])], [1])
        rig.echo_all()
        assert not rig.vq.needs_interrupt()


def test_event_idx_avail_event_lets_the_driver_skip_kicks() -> None:
    rig = Rig(event_idx=True)
    rig.dq.add([b"a"], [1])
    assert rig.dq.kick()                     # avail_event 0: the first buffer is announced
    rig.dq.add([b"b"], [1])
    assert not rig.dq.kick()                 # the device has not caught up: no second kick
    assert rig.echo_all() == 2
    assert rig.dq.avail_event == 2           # now "tell me about the next one"
    rig.dq.add([b"c"], [1])
    assert rig.dq.kick()
    assert rig.kicks == [0, 0]


def test_vring_need_event_matches_the_spec_formula() -> None:
    assert vring_need_event(0, 1, 0)
    assert not vring_need_event(0, 2, 1)
    assert vring_need_event(5, 7, 3)         # 5 lies in (3, 7]
    assert not vring_need_event(8, 7, 3)
    assert vring_need_event(0xFFFF, 1, 0xFFFE)  # across the wrap


def test_max_chain_bytes_is_capped_by_the_used_len_field() -> None:
    mem = make_guest_memory()
    vq = Virtqueue(mem, 8, 0x1000, 0x2000, 0x3000, max_chain_bytes=1 << 40)
    assert vq.max_chain_bytes == MAX_CHAIN_BYTES == 0xFFFF_FFFF
