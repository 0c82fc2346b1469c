"""VMBus rings through real ring buffers in fake guest memory: wraparound both ways, full
rings, pending_send_sz both ways, interrupt_mask both ways, scattered pages, packets written
while the host drains, memory that goes away, indices the guest corrupts."""

from __future__ import annotations

import struct

from hypothesis import given, settings, strategies as st

from tests.vmbus_client import (
    FEATURE_BITS,
    INTERRUPT_MASK,
    PAGE,
    PENDING_SEND_SZ,
    PKT_COMP,
    READ_INDEX,
    TRAILER,
    WRITE_INDEX,
    FakeGuestMemory,
    Rig,
)

SMALL = dict(send_pages=2, recv_pages=2)      # one data page per ring: 4096 bytes, wraps often
RING = 4096


def pad(n: int) -> int:
    return (n + 7) & ~7


def packet_total(payload_len: int) -> int:
    return 16 + pad(payload_len) + TRAILER


def payload_for(i: int, n: int) -> bytes:
    return bytes((i * 7 + k) & 0xFF for k in range(n))


def mute(ch):
    """Let the guest write several packets before the host looks (as if the host were busy)."""
    ch.kick = lambda: 0


def unmute(ch):
    del ch.kick


# --- guest -> host ------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(batches=st.lists(st.lists(st.integers(0, 1500), min_size=1, max_size=6), min_size=1, max_size=12))
def test_guest_to_host_wraparound_delivers_every_packet_whole_and_in_order(batches):
    rig = Rig()
    ch = rig.open_first(**SMALL)
    expected = []
    i = 0
    for batch in batches:
        mute(ch)
        used = 0
        for n in batch:
            fits = RING - used > packet_total(n)
            assert ch.send(payload_for(i, n), trans_id=i) == fits
            if fits:
                used += packet_total(n)
                expected.append((payload_for(i, n) + bytes(pad(n) - n), i))
            i += 1
        unmute(ch)
        ch.kick()
        assert ch.outbound.field(READ_INDEX) == ch.outbound.field(WRITE_INDEX)
    assert [(p, t) for _, p, t in rig.device.packets] == expected
    assert rig.bus.stats()["packets_in"] == len(expected)
    rig.check()


def test_guest_packets_with_other_types_are_counted_not_delivered():
    rig = Rig()
    ch = rig.open_first()
    assert ch.send(b"completion", pkt_type=PKT_COMP)
    assert ch.send(b"data")
    assert [p for _, p, _ in rig.device.packets] == [b"data\0\0\0\0"]
    assert rig.bus.stats()["packets_ignored"] == 1


class SpyMemory(FakeGuestMemory):
    """Records writes to one u32, and may run a hook after each write."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.watch: int | None = None
        self.seen: list[int] = []
        self.hook = None

    def write(self, gpa: int, data: bytes) -> None:
        super().write(gpa, data)
        if gpa == self.watch:
            self.seen.append(struct.unpack("<I", data)[0])
        if self.hook is not None:
            self.hook(gpa, data)


def spy_rig() -> Rig:
    return Rig(mem_class=SpyMemory)


def test_host_masks_guest_signals_while_draining():
    rig = spy_rig()
    ch = rig.open_first()
    rig.mem.watch = (ch.outbound.pages[0] << 12) + INTERRUPT_MASK
    rig.mem.seen.clear()
    ch.send(b"x")
    assert rig.mem.seen == [1, 0]
    assert ch.outbound.field(INTERRUPT_MASK) == 0


def test_packet_written_while_the_host_drains_is_not_lost():
    """The guest writes (without signalling: the mask is set) while the host drains; the
    host's look after clearing the mask must find it."""
    rig = spy_rig()
    ch = rig.open_first()
    read_index_gpa = (ch.outbound.pages[0] << 12) + READ_INDEX
    injected = []

    def guest_on_other_vcpu(gpa, data):
        if gpa == read_index_gpa and not injected:
            injected.append(1)
            assert ch.outbound.field(INTERRUPT_MASK) == 1
            kicks_before = ch.signals_sent
            assert ch.send(b"racing")               # mask is set: hv_signal_on_write stays quiet
            assert ch.signals_sent == kicks_before

    rig.mem.hook = guest_on_other_vcpu
    assert ch.send(b"first")
    assert [p for _, p, _ in rig.device.packets] == [b"first\0\0\0", b"racing\0\0"]


def test_host_signals_guest_when_its_pending_send_size_fits_again():
    rig = Rig()
    ch = rig.open_first(**SMALL)
    mute(ch)
    n = 0
    while ch.send(bytes(200)):
        n += 1
    unmute(ch)
    ch.set_pending_send_sz(packet_total(200))      # set_channel_pending_send_size, then wait
    rig.synic.take_events()
    ch.kick()
    assert len(rig.device.packets) == n
    assert rig.synic.take_events() == [(0, 2, ch.relid)]     # room again: the guest is woken


def test_no_signal_after_reading_when_nobody_waits_or_features_are_off():
    rig = Rig()
    ch = rig.open_first(**SMALL)
    ch.send(b"x")                                   # pending_send_sz 0
    assert rig.synic.take_events() == []
    mute(ch)
    while ch.send(bytes(200)):
        pass
    unmute(ch)
    ch.set_pending_send_sz(packet_total(200))
    ch.outbound.set_field(FEATURE_BITS, 0)         # the guest did not opt in
    ch.kick()
    assert rig.synic.take_events() == []


def test_no_signal_when_the_read_does_not_free_enough():
    rig = Rig()
    ch = rig.open_first(**SMALL)
    mute(ch)
    while ch.send(bytes(200)):
        pass
    unmute(ch)
    ch.set_pending_send_sz(RING)                    # more than an empty ring can offer
    ch.kick()
    assert ch.outbound.field(READ_INDEX) == ch.outbound.field(WRITE_INDEX)
    assert rig.synic.take_events() == []


def test_no_signal_when_the_wait_was_already_over_before_this_read():
    rig = Rig()
    ch = rig.open_first(**SMALL)
    ch.set_pending_send_sz(64)                      # plenty of room all along
    ch.send(bytes(100))
    assert rig.synic.take_events() == []


# --- host -> guest ------------------------------------------------------------------------------

ops = st.lists(st.one_of(st.tuples(st.just("send"), st.integers(0, 1400)),
                         st.tuples(st.just("recv"), st.integers(1, 4)),
                         st.tuples(st.just("mask"), st.booleans())), min_size=1, max_size=60)


@settings(max_examples=80, deadline=None)
@given(ops=ops)
def test_host_to_guest_wraparound_full_ring_and_signals(ops):
    rig = Rig()
    ch = rig.open_first(**SMALL)
    channel = rig.device.channel
    rig.synic.take_events()
    queued: list[tuple[int, int]] = []               # (trans_id, payload length) not yet read
    used = 0
    masked = False
    for i, (op, arg) in enumerate(ops):
        if op == "send":
            empty_before = not queued
            fits = RING - used > packet_total(arg)
            assert channel.send(payload_for(i, arg), trans_id=i) == fits
            events = rig.synic.take_events()
            if fits:
                queued.append((i, arg))
                used += packet_total(arg)
                assert events == ([(0, 2, ch.relid)] if empty_before and not masked else [])
                assert ch.inbound.field(PENDING_SEND_SZ) == 0
            else:
                assert events == []
                assert ch.inbound.field(PENDING_SEND_SZ) == packet_total(arg)
        elif op == "recv":
            got = ch.recv(limit=arg)
            for p in got:
                t, n = queued.pop(0)
                assert (p.type, p.trans_id, p.payload) == (6, t, payload_for(t, n) + bytes(pad(n) - n))
                used -= packet_total(n)
        else:
            masked = arg
            if arg:
                ch.begin_read()
            else:
                ch.end_read()
    assert [p.trans_id for p in ch.recv()] == [t for t, _ in queued]
    rig.check()


def test_full_ring_asks_the_guest_to_signal_and_then_tells_the_device():
    rig = Rig()
    ch = rig.open_first(**SMALL)
    channel = rig.device.channel
    sent = 0
    while channel.send(bytes(500), trans_id=sent):
        sent += 1
    assert sent == (RING - 1) // packet_total(500)
    assert rig.bus.stats()["ring_full"] == 1
    assert ch.inbound.field(PENDING_SEND_SZ) == packet_total(500)
    kicks = ch.signals_sent
    got = ch.recv(limit=1)                          # frees 524 bytes: enough, crosses pending
    assert len(got) == 1 and ch.signals_sent == kicks + 1
    assert rig.device.writable_calls == 1
    assert ch.inbound.field(PENDING_SEND_SZ) == 0
    assert channel.send(bytes(500))
    rig.check()


def test_a_packet_that_would_fill_the_ring_exactly_is_refused():
    """Full and empty must stay distinguishable: read_index == write_index means empty."""
    rig = Rig()
    ch = rig.open_first(**SMALL)
    channel = rig.device.channel
    assert not channel.send(bytes(RING - 24))       # 16 + 4072 + 8 == 4096: would look empty
    assert ch.inbound.field(WRITE_INDEX) == 0
    assert channel.send(bytes(RING - 32))           # 4088: fits, one gap of 8 left
    assert ch.inbound.field(WRITE_INDEX) == RING - 8
    assert [len(p.payload) for p in ch.recv()] == [RING - 32]


def test_host_writes_follow_the_gpadl_page_order():
    rig = Rig()
    ch = rig.open_first(scattered=True, send_pages=3, recv_pages=3)
    assert ch.inbound.pages != sorted(ch.inbound.pages)
    payload = b"\xAB" * (PAGE - 16 - 8)             # fills the first data page exactly
    assert rig.device.channel.send(payload)
    data_page1 = ch.inbound.pages[1] << 12
    assert struct.unpack_from("<HHH", rig.mem.buf, data_page1) == (6, 2, PAGE // 8 - 1)
    assert rig.mem.buf[data_page1 + 16:data_page1 + PAGE - 8] == payload
    assert rig.device.channel.send(b"next")         # lands on the second data page
    data_page2 = ch.inbound.pages[2] << 12
    assert struct.unpack_from("<H", rig.mem.buf, data_page2)[0] == 6
    assert [len(p.payload) for p in ch.recv()] == [len(payload), 8]


# --- trouble ------------------------------------------------------------------------------------

def test_ring_memory_unplugged_after_open_fails_the_channel_only():
    rig = Rig()
    ch = rig.open_first()
    rig.mem.unback(ch.outbound.pages[1])
    ch.send(b"x")
    assert rig.device.closed_count == 1
    assert rig.bus.stats()["errors"]["ring-guest-memory"] == 1
    assert rig.bus.devices()[0]["state"] == "failed"
    assert not rig.device.channel.send(b"y")
    ch.close()
    rig.mem.holes.clear()
    ch2 = rig.client.open(ch.offer)
    assert ch2.send(b"z") and rig.device.packets[-1][1] == b"z" + bytes(7)
    rig.check()


def test_guest_write_index_out_of_line_fails_the_channel():
    rig = Rig()
    ch = rig.open_first()
    ch.outbound.set_field(WRITE_INDEX, 12)          # not 8-byte aligned
    ch.kick()
    assert rig.bus.stats()["errors"]["ring-bad-write-index"] == 1
    assert rig.device.closed_count == 1 and rig.device.packets == []


def test_guest_read_index_out_of_range_fails_the_channel_on_send():
    rig = Rig()
    ch = rig.open_first()
    ch.inbound.set_field(READ_INDEX, 4 * PAGE)      # data area is 4 pages: one past the end
    assert not rig.device.channel.send(b"x")
    assert rig.bus.stats()["errors"]["ring-bad-read-index"] == 1
    assert rig.device.closed_count == 1


def test_guest_scribbling_the_hosts_indices_does_not_steer_the_host():
    rig = Rig()
    ch = rig.open_first(**SMALL)
    channel = rig.device.channel
    assert channel.send(b"one")
    ch.inbound.set_field(WRITE_INDEX, 2048)         # the host owns this one: ignored
    assert channel.send(b"two")
    assert ch.inbound.field(WRITE_INDEX) == 2 * packet_total(3)
    ch.outbound.set_field(READ_INDEX, 1024)         # and this one
    assert ch.send(b"three")
    ch.kick()
    assert [p for _, p, _ in rig.device.packets] == [b"three\0\0\0"]
