"""Split virtqueue, device side: chains through real rings in (bytearray-backed) guest memory,
every validation error, indirect tables, interrupt suppression and event index."""

from __future__ import annotations

import struct
from typing import Callable

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from devices.virtio.queue import (
    MAX_CHAIN_BYTES,
    VRING_DESC_F_INDIRECT,
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


# --- pop_pair: the request/response fast path --------------------------------------------------
@pytest.mark.parametrize("indirect", [False, True])
def test_pop_pair_takes_a_request_response_chain_in_place(ring_access: str, indirect: bool) -> None:
    rig = Rig(event_idx=True)
    head = rig.dq.add([b"request"], [4], indirect=indirect)
    pair = rig.vq.pop_pair()
    if ring_access != "cached ring views":  # rings outside boot RAM: only pop() serves them
        assert pair is None and rig.vq.last_avail_idx == 0
        assert rig.vq.pop().head == head
        return
    got_head, request, response = pair
    assert got_head == head and bytes(request) == b"request" and len(response) == 4
    assert rig.vq.last_avail_idx == 1 and rig.dq.avail_event == 1 and rig.vq.popped == 1
    response[:] = b"done"  # the views are the guest's buffers themselves
    rig.vq.push_used(head, 4)
    [used] = rig.dq.get_used()
    assert (used.head, used.length, used.data) == (head, 4, b"done")
    assert rig.vq.pop_pair() is None and rig.vq.pop() is None


def _indirect_table(rig: Rig, bufs: list[tuple[int, int, int, int]]) -> None:
    """Publish one indirect descriptor whose table holds `bufs` as (addr, len, flags, next)."""
    at = rig.alloc.alloc(16 * len(bufs))
    for i, (addr, n, flags, nxt) in enumerate(bufs):
        rig.dq.write_desc(i, addr, n, flags, nxt, table=at)
    rig.dq.write_desc(0, at, 16 * len(bufs), VRING_DESC_F_INDIRECT)
    rig.dq.publish(0)


def _far_pair(rig: Rig) -> None:
    far = GuestAllocator(2 * MiB, 3 * MiB)  # the rig's second memslot: not the rings' one
    rig.dq.write_desc(1, far.alloc(8), 8, VRING_DESC_F_WRITE)
    rig.dq.write_desc(0, far.alloc(8), 8, VRING_DESC_F_NEXT, 1)
    rig.dq.publish(0)


OTHER_SHAPES: dict[str, Callable[[Rig], object]] = {
    "one readable": lambda rig: rig.dq.add([b"x"], []),
    "one writable": lambda rig: rig.dq.add([], [8], indirect=False),
    "two readable": lambda rig: rig.dq.add([b"a", b"b"], [], indirect=False),
    "three buffers": lambda rig: rig.dq.add([b"a"], [4, 4], indirect=False),
    "three buffers, indirect": lambda rig: rig.dq.add([b"a", b"b"], [4], indirect=True),
    "writable then writable": lambda rig: _indirect_table(rig, [
        (rig.alloc.alloc(8), 8, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1), (rig.alloc.alloc(8), 8, VRING_DESC_F_WRITE, 0)]),
    "indirect entry 0 chains to itself": lambda rig: _indirect_table(rig, [
        (rig.alloc.alloc(8), 8, VRING_DESC_F_NEXT, 0), (rig.alloc.alloc(8), 8, VRING_DESC_F_WRITE, 0)]),
    "buffers in the other memslot": _far_pair,
}


@pytest.mark.parametrize("shape", sorted(OTHER_SHAPES))
def test_pop_pair_leaves_every_other_shape_to_pop(shape: str) -> None:
    rig = Rig(regions=((0, MiB), (2 * MiB, MiB)))
    OTHER_SHAPES[shape](rig)
    assert rig.vq.pop_pair() is None
    assert rig.vq.last_avail_idx == 0 and rig.vq.popped == 0 and rig.vq.broken is None
    try:
        assert rig.vq.pop() is not None  # pop() takes it, or refuses it as malformed
    except VirtqueueError:
        assert rig.vq.broken


@pytest.mark.parametrize("name", sorted(MALFORMED_CHAINS))
def test_pop_pair_never_takes_a_malformed_chain(name: str) -> None:
    reason, build = MALFORMED_CHAINS[name]
    rig = Rig()
    build(rig.dq)
    assert rig.vq.pop_pair() is None and rig.vq.last_avail_idx == 0
    with pytest.raises(VirtqueueError) as err:
        rig.vq.pop()
    assert err.value.reason == reason


def test_pop_pair_on_a_disabled_queue() -> None:
    rig = Rig()
    rig.dq.add([b"a"], [1])
    rig.vq.disable()
    assert rig.vq.pop_pair() is None


_ADDRS = [0, 0x1000, 0x1FF0, MiB - 8, MiB - 32, MiB, 2 * MiB, 1 << 63]
_ANY_ADDR = st.sampled_from(_ADDRS) | st.integers(0x1000, MiB - 64) | st.integers(0, (1 << 64) - 1)
_DESC_FIELDS = st.tuples(_ANY_ADDR, st.integers(0, 64), st.integers(0, 7), st.integers(0, 9))


@st.composite
def _rings(draw) -> tuple[list, list, int, int, int, int]:
    """Eight descriptors, a two-entry indirect table, where the table is, the head and the
    avail index: random, or a request/response pair (direct or indirect) with one field spoiled."""
    descs = draw(st.lists(_DESC_FIELDS, min_size=8, max_size=8))
    table = draw(st.lists(_DESC_FIELDS, min_size=2, max_size=2))
    table_at = draw(st.sampled_from([0x1000, 0x1FF0, MiB - 32]))
    head, avail_idx = draw(st.integers(0, 7)), 1
    if draw(st.booleans()):
        req, resp = draw(st.integers(0x2000, MiB - 64)), draw(st.integers(0x2000, MiB - 64))
        if draw(st.booleans()):
            descs[head] = (table_at, 32, VRING_DESC_F_INDIRECT, 0)
            table = [(req, 24, VRING_DESC_F_NEXT, 1), (resp, 10, VRING_DESC_F_WRITE, 0)]
            spoilable = [(descs, head), (table, 0), (table, 1)]
        else:
            nxt = draw(st.integers(0, 7).filter(lambda i: i != head))
            descs[head], descs[nxt] = (req, 24, VRING_DESC_F_NEXT, nxt), (resp, 10, VRING_DESC_F_WRITE, 0)
            spoilable = [(descs, head), (descs, nxt)]
        where, field = draw(st.sampled_from(spoilable + [None])), draw(st.integers(0, 3))
        if where is not None:
            entries, i = where
            value = draw(_DESC_FIELDS)[field]
            entries[i] = entries[i][:field] + (value,) + entries[i][field + 1:]
    else:
        head, avail_idx = draw(st.integers(0, 9)), draw(st.sampled_from([1, 0, 9]) | st.integers(0, 0xFFFF))
    return descs, table, table_at, head, avail_idx


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ring=_rings())
def test_pop_pair_agrees_with_pop_on_any_ring(ring_access: str, ring) -> None:
    """Whatever the driver wrote, pop_pair either leaves the ring alone or takes exactly the
    chain pop() would take: same head, same bytes, same response buffer. It never raises."""
    descs, table, table_at, head, avail_idx = ring
    rig = Rig(event_idx=True)
    for i, (addr, n, flags, nxt) in enumerate(table):
        rig.dq.write_desc(i, addr, n, flags, nxt, table=table_at)
    for i, (addr, n, flags, nxt) in enumerate(descs):
        rig.dq.write_desc(i, addr, n, flags, nxt)
    rig.dq.publish(head)
    rig.dq.set_avail_idx(avail_idx)
    before = rig.mem.read(0, MiB)
    pair = rig.vq.pop_pair()
    event("left to pop()" if pair is None else "taken by pop_pair()")
    if pair is None:
        assert rig.vq.last_avail_idx == 0 and rig.mem.read(0, MiB) == before
        return
    assert ring_access == "cached ring views"  # only boot RAM has the fast path
    got_head, request, response = pair
    twin = Rig(event_idx=True)
    twin.mem.write(0, before)
    chain = twin.vq.pop()
    assert chain is not None and chain.head == got_head
    assert chain.read_all(twin.mem) == bytes(request) and chain.writable_len == len(response)
    response[:] = b"Z" * len(response)
    [(at, n)] = chain.writable
    assert rig.mem.read(at, n) == b"Z" * n
