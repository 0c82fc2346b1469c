"""A hostile guest, by hypothesis: random and half-valid channel messages, GPADLs with lying
counts and lengths, corrupted ring headers and packet headers. Nothing may raise out of the
bus, the host may write only inside the rings it was given, every refusal is counted, and a
fresh guest must find a working bus afterwards."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings, strategies as st

from tests.vmbus_client import (
    CONN_ID_1,
    CONN_ID_4,
    FEATURE_BITS,
    INTERRUPT_MASK,
    LINUX_FIRST_GPADL,
    PAGE,
    PENDING_SEND_SZ,
    READ_INDEX,
    WRITE_INDEX,
    FakeGuestMemory,
    RecordingDevice,
    Rig,
    gpadl_messages,
    header,
    initiate_contact,
    open_channel_msg,
)

RING_REASONS = {"ring-bad-write-index", "ring-bad-read-index", "ring-truncated-packet",
                "ring-bad-packet-header", "ring-packet-overrun", "ring-guest-memory"}
u32 = st.integers(0, 0xFFFFFFFF)
small_relid = st.integers(0, 3)
handles = st.sampled_from([LINUX_FIRST_GPADL, LINUX_FIRST_GPADL + 1, 0, 1, 0xFFFFFFFF])


class WriteLog(FakeGuestMemory):
    """Fake memory that logs the host's writes (the guest model uses poke, not write)."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.log: list[tuple[int, int]] = []

    def write(self, gpa: int, data: bytes) -> None:
        super().write(gpa, data)
        self.log.append((gpa, len(data)))


def assert_writes_inside(mem: WriteLog, pages: list[int]) -> None:
    allowed = set(pages)
    for gpa, n in mem.log:
        assert {p for p in range(gpa >> 12, ((gpa + n - 1) >> 12) + 1)} <= allowed, f"host wrote {gpa:#x}+{n}"


def fresh_guest_works(rig: Rig) -> None:
    """A new guest (kexec) connects, opens the first device and exchanges packets."""
    client = rig.new_client()
    client.connect()
    offers = client.request_offers()
    assert [o.child_relid for o in offers] == list(range(1, len(rig.devices) + 1))
    for d in rig.devices:
        assert d.opened_count == d.closed_count, "a channel was left open across the reconnect"
    ch = client.open(offers[0])
    assert ch.send(b"are you there", trans_id=5)
    assert rig.devices[0].packets[-1][1:] == (b"are you there\0\0\0", 5)
    assert rig.devices[0].channel.send(b"yes", trans_id=6)
    assert [(p.trans_id, p.payload) for p in ch.recv()] == [(6, b"yes\0\0\0\0\0")]
    rig.check()


# --- random and half-valid messages -------------------------------------------------------------

def _structured():
    return st.one_of(
        st.builds(lambda v, vp, sint: initiate_contact(v, target_vcpu=vp, msg_sint=sint),
                  st.sampled_from([0x50003, 0x50000, 0x40001, 0x20004, 0x10001, 0xD]) | u32,
                  st.integers(0, 2), st.integers(0, 20)),
        st.just(header(3)),                                                    # REQUESTOFFERS
        st.builds(lambda r, h, bl, rc, data: header(8) + struct.pack("<IIHH", r, h, bl, rc) + data,
                  small_relid, handles, st.integers(0, 0xFFFF), st.integers(0, 4), st.binary(max_size=120)),
        st.builds(lambda n, h, data: header(9) + struct.pack("<II", n, h) + data,
                  u32, handles, st.binary(max_size=120)),
        st.builds(lambda r, h: header(11) + struct.pack("<II", r, h), small_relid, handles),
        st.builds(lambda r, o, h, vp, off: open_channel_msg(r, o, h, vp, off),
                  small_relid, u32, handles, st.integers(0, 3), st.integers(0, 12) | u32),
        st.builds(lambda r: header(7) + struct.pack("<I", r), small_relid),
        st.builds(lambda r, vp: header(22) + struct.pack("<II", r, vp), small_relid, st.integers(0, 3)),
        st.builds(lambda r: header(13) + struct.pack("<I", r), small_relid),
        st.just(header(16)),                                                   # UNLOAD
        st.just(header(21) + bytes(32)),                                       # TL_CONNECT_REQUEST
    )


def _truncated(msg: bytes, cut: int) -> bytes:
    return msg[:cut]


raw_messages = st.one_of(
    st.binary(max_size=260),
    st.builds(lambda t, tail: struct.pack("<II", t, 0) + tail, st.integers(0, 30) | u32, st.binary(max_size=232)),
    _structured(),
    st.builds(_truncated, _structured(), st.integers(0, 60)),
)

actions = st.lists(st.one_of(
    st.tuples(st.just("post"), st.sampled_from([CONN_ID_1, CONN_ID_4]),
              st.sampled_from([1] * 8 + [0, 2, 0x80000010]), raw_messages),
    st.tuples(st.just("connect"), st.sampled_from([0x50003, 0x40000, 0x20004])),     # contact + offers
    st.tuples(st.just("gpadl"), small_relid, handles, st.integers(1, 70)),           # real pages
    st.tuples(st.just("gpadl-open"), st.integers(1, 2), handles, st.integers(1, 12), st.integers(0, 12)),
    st.tuples(st.just("open"), small_relid, handles, st.integers(0, 8), st.integers(0, 2)),
    st.tuples(st.just("valid-setup"), st.integers(0, 1)),      # a real guest's open, in between
    st.tuples(st.just("kick"), st.integers(1, 2)),
    st.tuples(st.just("host-send"), st.integers(0, 1)),
    st.tuples(st.just("reset")),
), min_size=1, max_size=30)


def run_action(rig: Rig, action) -> None:
    kind = action[0]
    if kind == "post":
        _, conn, mtype, payload = action
        status = rig.registry.post(conn, payload, mtype)
        assert isinstance(status, int) and 0 <= status < 0x10000
    elif kind == "connect":
        conn = CONN_ID_4 if action[1] >= 0x50000 else CONN_ID_1
        rig.registry.post(conn, initiate_contact(action[1]))
        rig.registry.post(conn, header(3))
    elif kind == "gpadl":
        _, relid, handle, n = action
        for m in gpadl_messages(relid, handle, [200 + i for i in range(n)]):
            rig.registry.post(CONN_ID_4, m)
            rig.registry.post(CONN_ID_1, m)     # whichever the bus listens to now; twice is hostile too
    elif kind == "gpadl-open":
        _, relid, handle, n, offset = action
        for m in gpadl_messages(relid, handle, [300 + 16 * relid + i for i in range(n)]):
            rig.registry.post(CONN_ID_4, m)
        rig.registry.post(CONN_ID_4, open_channel_msg(relid, 7, handle, 0, offset))
    elif kind == "open":
        _, relid, handle, offset, vp = action
        rig.registry.post(CONN_ID_4, open_channel_msg(relid, relid, handle, vp, offset))
    elif kind == "valid-setup":
        client = rig.new_client()
        client.connect()
        offers = client.request_offers()
        client.open(offers[action[1]])
    elif kind == "kick":
        rig.registry.signal(0x100 + action[1])
    elif kind == "host-send":
        ch = rig.devices[action[1]].channel
        if ch is not None:
            assert isinstance(ch.send(b"host data"), bool)
    else:
        rig.bus.reset()
    rig.synic.take_messages()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=actions)
def test_random_messages_never_raise_and_the_bus_stays_usable(actions):
    rig = Rig(devices=[RecordingDevice("a"), RecordingDevice("b")])
    for action in actions:
        run_action(rig, action)
        for i, d in enumerate(rig.devices):
            state = rig.bus.devices()[i]["state"]
            assert d.opened_count - d.closed_count == (1 if state == "open" else 0)
        rig.check()
    rig.bus.stats()
    fresh_guest_works(rig)


# --- GPADLs with lying counts and lengths -------------------------------------------------------

@st.composite
def gpadl_plans(draw):
    """Ranges, then the header fields and message split. A quarter of the plans are honest;
    the others lie a little somewhere (counts, lengths, offsets, pfns, message sizes)."""
    honest = draw(st.integers(0, 3)) == 0
    lie = (lambda options: 0) if honest else (lambda options: draw(st.sampled_from(options)))
    ranges = []
    for _ in range(draw(st.integers(1, 3))):
        offset = draw(st.integers(0, 4095)) if draw(st.booleans()) else 0
        count = draw(st.integers(1, 40000)) + lie([0] * 6 + [-1, -40000])
        count = max(count, 0)
        offset += lie([0] * 8 + [4096 - offset])
        npfn = max(1, -(-(offset + count) // PAGE)) + lie([0] * 6 + [-1, 1])
        pfns = draw(st.lists(st.integers(0, 1200), min_size=max(npfn, 0), max_size=max(npfn, 0)))
        if pfns and lie([0] * 8 + [1]):
            pfns[draw(st.integers(0, len(pfns) - 1))] = draw(st.sampled_from([1 << 40, (1 << 64) - 1]))
        ranges.append((count, offset, pfns))
    data = b"".join(struct.pack("<II", c, o) + struct.pack(f"<{len(p)}Q", *p) for c, o, p in ranges)
    rangecount = len(ranges) + lie([0] * 6 + [-1, 1])
    buflen = len(data) + lie([0] * 6 + [-8, 8, -3, 5])
    # a header chunk and body chunks, multiples of 8 unless lying
    chunks = []
    rest = data
    first = draw(st.integers(0, min(len(rest), 220) // 8)) * 8 + lie([0] * 8 + [3])
    chunks.append(rest[:first])
    rest = rest[first:]
    while rest and len(chunks) <= 40:
        n = draw(st.integers(1, min(len(rest), 224) // 8 or 1)) * 8 + lie([0] * 8 + [-8, 5])
        chunks.append(rest[:max(n, 0)])
        rest = rest[max(n, 0):]
    return ranges, rangecount, buflen & 0xFFFF, chunks, data


def expected_gpadl(rangecount: int, buflen: int, chunks: list[bytes]):
    """The oracle, from the wire rules (not from the host's code): what a host that reads the
    header then the bodies in order must conclude. ("created", ranges) | ("refused",) |
    ("incomplete",). Chunks after range_buflen is reached belong to no GPADL."""
    if rangecount == 0 or buflen % 8 or buflen < 16 * rangecount:
        return ("refused",)
    got = b""
    for i, c in enumerate(chunks):
        if len(c) % 8 or (i > 0 and not c) or len(got) + len(c) > buflen:
            return ("refused",)
        got += c
        if len(got) == buflen:
            break
    else:
        return ("incomplete",)
    ranges, pos = [], 0
    for _ in range(rangecount):
        if pos + 8 > len(got):
            return ("refused",)
        count, offset = struct.unpack_from("<II", got, pos)
        if count == 0 or offset >= PAGE:
            return ("refused",)
        n = -(-(offset + count) // PAGE)
        if pos + 8 + 8 * n > len(got):
            return ("refused",)
        pfns = list(struct.unpack_from(f"<{n}Q", got, pos + 8))
        if any(p >= 1 << 40 for p in pfns):
            return ("refused",)
        ranges.append((count, offset, pfns))
        pos += 8 + 8 * n
    return ("created", ranges) if pos == len(got) else ("refused",)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=gpadl_plans())
def test_gpadl_with_lying_counts_is_refused_or_built_exactly(plan):
    ranges, rangecount, buflen, chunks, data = plan
    rig = Rig()
    rig.client.connect()
    rig.client.request_offers()
    handle = 0xE1E10
    msgs = [header(8) + struct.pack("<IIHH", 1, handle, buflen, rangecount) + chunks[0]]
    msgs += [header(9) + struct.pack("<II", 0, handle) + c for c in chunks[1:]]
    for m in msgs:
        rig.client.post(m)
    replies = [m for m in rig.synic.take_messages()]
    created = [struct.unpack_from("<III", m.payload, 8) for m in replies if m.msgtype == 10]
    assert all(m.msgtype == 10 for m in replies) and len(created) <= 1
    outcome = expected_gpadl(rangecount, buflen, chunks)
    if outcome[0] == "created":
        assert created == [(1, handle, 0)]
        got = rig.bus._gpadls[handle]
        assert [(r.byte_count, r.byte_offset, list(r.pfns)) for r in got.ranges] == outcome[1]
        assert rig.bus.stats()["gpadl_pages"] == sum(len(p) for _, _, p in outcome[1])
    elif outcome[0] == "refused":
        assert len(created) == 1 and created[0][2] != 0
        assert rig.bus.stats()["gpadls_refused"] == 1 and handle not in rig.bus._gpadls
    else:
        assert created == [] and rig.bus.stats()["gpadls_pending"] == 1
    rig.client.teardown_gpadl(1, handle)            # complete, half-built or refused: always answered
    stats = rig.bus.stats()
    assert (stats["gpadls"], stats["gpadls_pending"], stats["gpadl_pages"]) == (0, 0, 0)
    rig.check()


# --- corrupted ring headers ---------------------------------------------------------------------

header_fields = st.fixed_dictionaries({}, optional={
    WRITE_INDEX: u32 | st.integers(0, 4096), READ_INDEX: u32 | st.integers(0, 4096),
    INTERRUPT_MASK: u32, PENDING_SEND_SZ: u32 | st.integers(0, 5000), FEATURE_BITS: u32})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(out_fields=header_fields, in_fields=header_fields, junk=st.binary(max_size=300),
       sends=st.lists(st.integers(0, 3000), max_size=4))
def test_corrupted_ring_headers(out_fields, in_fields, junk, sends):
    rig = Rig(mem_class=WriteLog)
    ch = rig.open_first(send_pages=2, recv_pages=2)
    rig.mem.log.clear()
    for off, value in out_fields.items():
        ch.outbound.set_field(off, value)
    for off, value in in_fields.items():
        ch.inbound.set_field(off, value)
    ch.outbound.write_data(0, junk)
    assert ch.kick() == 0
    channel = rig.device.channel
    for n in sends:
        assert isinstance(channel.send(bytes(n)), bool)
    assert ch.kick() == 0
    assert_writes_inside(rig.mem, ch.pages)
    failed = rig.bus.devices()[0]["state"] == "failed"
    errors = rig.bus.stats()["errors"]
    assert failed == (rig.bus.stats()["channels_failed"] == 1)
    if failed:
        assert rig.device.closed_count == 1 and set(errors) <= RING_REASONS
        assert not channel.send(b"after")
    rig.check()
    ch.close()
    fresh_guest_works(rig)


# --- corrupted packet headers -------------------------------------------------------------------

def oracle(data: bytes, write_index: int):
    """What a correct host reads from a data area whose read index is 0:
    (packets [(type, payload, trans_id)], error reason or None)."""
    size = len(data)
    ring = data + data
    out, r = [], 0
    while r != write_index:
        avail = (write_index - r) % size
        if avail < 24:
            return out, "ring-truncated-packet"
        ptype, off8, len8, _flags, tid = struct.unpack_from("<HHHHQ", ring, r)
        if len8 * 8 < 16 or off8 * 8 < 16 or off8 > len8:
            return out, "ring-bad-packet-header"
        if len8 * 8 + 8 > avail:
            return out, "ring-packet-overrun"
        out.append((ptype, ring[r + off8 * 8:r + len8 * 8], tid))
        r = (r + len8 * 8 + 8) % size
    return out, None


descriptors = st.tuples(st.sampled_from([6, 6, 6, 0xB, 0, 0xFFFF]), st.integers(0, 8) | st.integers(0, 0xFFFF),
                        st.integers(0, 40) | st.integers(0, 0xFFFF), st.integers(0, 3), st.integers(0, 2**64 - 1))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(descs=st.lists(st.tuples(descriptors, st.binary(max_size=200)), min_size=1, max_size=4),
       start=st.integers(0, 511).map(lambda i: i * 8),
       write_choice=st.one_of(st.just("honest"), u32, st.integers(0, 511).map(lambda i: i * 8)))
def test_corrupted_packet_headers(descs, start, write_choice):
    rig = Rig(mem_class=WriteLog)
    ch = rig.open_first(send_pages=2, recv_pages=2)
    size = ch.outbound.size
    # an honest guest first moves both indices to `start`, so packets may wrap
    ch.outbound.set_field(WRITE_INDEX, start)
    rig.bus._slots[1].channel.reader.read_index = start          # as if the host had read up to there
    ch.outbound.set_field(READ_INDEX, start)
    pos = start
    for (ptype, off8, len8, flags, tid), body in descs:
        blob = struct.pack("<HHHHQ", ptype, off8, len8, flags, tid) + body
        blob += bytes(-len(blob) % 8) + bytes(8)
        ch.outbound.write_data(pos, blob[:size - 8])
        pos = (pos + min(len(blob), size - 8)) % size
    write_index = pos if write_choice == "honest" else write_choice
    ch.outbound.set_field(WRITE_INDEX, write_index)
    data = ch.outbound.read_data(0, size)
    rotated = data[start:] + data[:start]
    if write_index >= size or write_index % 8:
        expect, reason = [], "ring-bad-write-index"
    else:
        expect, reason = oracle(rotated, (write_index - start) % size)
    rig.mem.log.clear()
    ch.kick()
    assert_writes_inside(rig.mem, ch.pages)
    delivered = [(p, t) for _, p, t in rig.device.packets]
    assert delivered == [(p, t) for ptype, p, t in expect if ptype == 6]
    errors = rig.bus.stats()["errors"]
    if reason is None:
        assert errors == {} and rig.device.closed_count == 0
    else:
        assert errors == {reason: 1} and rig.device.closed_count == 1
    rig.check()
    ch.close()
    fresh_guest_works(rig)
