"""A VMBus *client* model for host tests: the guest side of VMBus, in Python.

It plays Linux's hv_vmbus (drivers/hv/connection.c, channel_mgmt.c, channel.c, ring_buffer.c)
against a host bus through three fakes: `FakeGuestMemory` (a bytearray; out-of-range access
raises vmm.memory.GuestMemoryError), `FakeSynic` (records what the host posts and signals)
and `FakeRegistry` (routes HvPostMessage / HvSignalEvent by connection id, as the partition
layer does). The wire formats here are written from Linux's headers independently of
devices/vmbus, so a layout mistake on either side shows up as a failed test.

Typical use::

    rig = Rig()                                   # memory, SynIC, registry, VmBus, one device
    rig.client.connect()                          # newest-first version negotiation
    [offer] = rig.client.request_offers()         # OFFERCHANNEL..., ALLOFFERS_DELIVERED
    ch = rig.client.open(offer)                   # GPADL header + bodies, OPENCHANNEL
    ch.send(b"hello")                             # into the outbound ring, signals the host
    rig.device.packets                            # [(channel, payload, trans_id)]
    rig.device.channel.send(b"hi")                # host -> guest
    ch.recv()                                     # [GuestPacket(...)] from the inbound ring
    ch.close(); rig.client.unload()

Raw access for hostile tests: `GuestRing.set_field`, `GuestRing.write_data`,
`VmbusClient.post` (any bytes), `GuestChannel.kick` (signal without writing).
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field
from typing import Callable

from vmm.memory import GuestMemoryError

PAGE = 4096
MiB = 1 << 20

# --- numbers from include/linux/hyperv.h, drivers/hv/hyperv_vmbus.h ---------------------------------
MSG_OFFERCHANNEL, MSG_REQUESTOFFERS, MSG_ALLOFFERS_DELIVERED = 1, 3, 4
MSG_OPENCHANNEL, MSG_OPENCHANNEL_RESULT, MSG_CLOSECHANNEL = 5, 6, 7
MSG_GPADL_HEADER, MSG_GPADL_BODY, MSG_GPADL_CREATED = 8, 9, 10
MSG_GPADL_TEARDOWN, MSG_GPADL_TORNDOWN, MSG_RELID_RELEASED = 11, 12, 13
MSG_INITIATE_CONTACT, MSG_VERSION_RESPONSE, MSG_UNLOAD, MSG_UNLOAD_RESPONSE = 14, 15, 16, 17
MSG_TL_CONNECT_REQUEST, MSG_MODIFYCHANNEL, MSG_MODIFYCHANNEL_RESPONSE = 21, 22, 24
CONN_ID_1, CONN_ID_4, VMBUS_SINT = 1, 4, 2
HV_STATUS_SUCCESS, HV_STATUS_INVALID_CONNECTION_ID = 0, 0x12
V5_3, V5_2, V5_1, V5_0, V4_1, V4_0, V3_0, V2_4 = 0x50003, 0x50002, 0x50001, 0x50000, 0x40001, 0x40000, 0x30000, 0x20004
WIN7, WS2008 = 0x10001, 0xD
LINUX_VERSIONS = (V5_3, V5_2, V5_1, V5_0, V4_1, V4_0, V3_0, V2_4)   # vmbus_versions[], newest first
PKT_DATA_INBAND, PKT_COMP = 6, 0xB
FLAG_COMPLETION_REQUESTED = 1
TRAILER = 8
HV_DM_GUID = uuid.UUID("525074dc-8985-46e2-8057-a307dc18a502")

# ring header field offsets (struct hv_ring_buffer)
WRITE_INDEX, READ_INDEX, INTERRUPT_MASK, PENDING_SEND_SZ, FEATURE_BITS = 0, 4, 8, 12, 64

LINUX_FIRST_GPADL = 0xE1E10          # vmbus_connection.next_gpadl_handle's start
HEADER_PFNS = (240 - 20 - 8) // 8    # create_gpadl_header: 26 pfns fit the header
BODY_PFNS = (240 - 16) // 8          # 28 per body


# --- fakes ------------------------------------------------------------------------------------------

class FakeGuestMemory:
    """Guest RAM at GPA [base, base + size) in a bytearray."""

    def __init__(self, size: int = 4 * MiB, base: int = 0) -> None:
        self.base = base
        self.buf = bytearray(size)
        self.holes: set[int] = set()        # page numbers made unbacked (as if unplugged)
        self.reads = 0
        self.writes = 0

    def unback(self, pfn: int) -> None:
        self.holes.add(pfn)

    def _off(self, gpa: int, size: int) -> int:
        off = gpa - self.base
        if gpa < 0 or size < 0 or off < 0 or off + size > len(self.buf):
            raise GuestMemoryError(f"guest-physical range {gpa:#x}+{size:#x} is not backed")
        if self.holes and any(p in self.holes for p in range(gpa >> 12, ((gpa + max(size, 1) - 1) >> 12) + 1)):
            raise GuestMemoryError(f"guest-physical range {gpa:#x}+{size:#x} is unplugged")
        return off

    def read(self, gpa: int, size: int) -> bytes:
        off = self._off(gpa, size)
        self.reads += 1
        return bytes(self.buf[off:off + size])

    def write(self, gpa: int, data: bytes) -> None:
        off = self._off(gpa, len(data))
        self.writes += 1
        self.buf[off:off + len(data)] = data

    # the guest's own accesses: its mappings stay valid when the host's view loses a page
    def peek(self, gpa: int, size: int) -> bytes:
        off = gpa - self.base
        return bytes(self.buf[off:off + size])

    def poke(self, gpa: int, data: bytes) -> None:
        off = gpa - self.base
        self.buf[off:off + len(data)] = data

    def u32(self, gpa: int) -> int:
        return struct.unpack("<I", self.peek(gpa, 4))[0]

    def set_u32(self, gpa: int, value: int) -> None:
        self.poke(gpa, struct.pack("<I", value & 0xFFFFFFFF))


class PageAllocator:
    """Hands out guest pages; `scattered=True` returns every other page, in descending order."""

    def __init__(self, mem: FakeGuestMemory, first_page: int = 16) -> None:
        self.next = (mem.base >> 12) + first_page
        self.end = (mem.base + len(mem.buf)) >> 12

    def alloc(self, n: int, scattered: bool = False) -> list[int]:
        step = 2 if scattered else 1
        if self.next + n * step > self.end:
            raise MemoryError("fake guest memory exhausted")
        pages = [self.next + i * step for i in range(n)]
        self.next += n * step
        if scattered:
            pages.reverse()
        return pages


@dataclass
class PostedMessage:
    vp: int
    sint: int
    message_type: int
    payload: bytes

    @property
    def msgtype(self) -> int:
        return struct.unpack_from("<I", self.payload)[0]


class FakeSynic:
    """Records messages and event flags the host sends; VPs in `vps` exist."""

    def __init__(self, vps: tuple[int, ...] = (0, 1)) -> None:
        self.vps = set(vps)
        self.messages: list[PostedMessage] = []
        self.events: list[tuple[int, int, int]] = []
        self.violations: list[str] = []     # host misuse; the bus swallows exceptions, so record

    def post_message(self, vp: int, sint: int, message_type: int, payload: bytes) -> bool:
        if message_type == 0 or message_type & 0x80000000:
            self.violations.append(f"SynIC message type {message_type:#x}")
        if not 8 <= len(payload) <= 240:
            self.violations.append(f"message payload of {len(payload)} bytes")
        if vp not in self.vps or not 0 <= sint < 16:
            return False
        self.messages.append(PostedMessage(vp, sint, message_type, bytes(payload)))
        return True

    def signal_event(self, vp: int, sint: int, flag: int) -> bool:
        if not 0 < flag < 2048:
            self.violations.append(f"event flag {flag}")
        if vp not in self.vps or not 0 <= sint < 16:
            return False
        self.events.append((vp, sint, flag))
        return True

    def take_messages(self) -> list[PostedMessage]:
        out, self.messages = self.messages, []
        return out

    def take_events(self) -> list[tuple[int, int, int]]:
        out, self.events = self.events, []
        return out


class FakeRegistry:
    """Connection id -> handler, as the partition's HvPostMessage / HvSignalEvent see them."""

    def __init__(self) -> None:
        self.messages: dict[int, Callable[[int, bytes], int]] = {}
        self.events: dict[int, Callable[[], int]] = {}
        self.violations: list[str] = []

    def register_message(self, connection_id: int, handler: Callable[[int, bytes], int]) -> None:
        if connection_id in self.messages:
            self.violations.append(f"message connection {connection_id} registered twice")
        self.messages[connection_id] = handler

    def register_event(self, connection_id: int, handler: Callable[[], int]) -> None:
        if connection_id in self.events:
            self.violations.append(f"event connection {connection_id} registered twice")
        self.events[connection_id] = handler

    def unregister_event(self, connection_id: int) -> None:
        if connection_id not in self.events:
            self.violations.append(f"event connection {connection_id} was not registered")
        self.events.pop(connection_id, None)

    def post(self, connection_id: int, payload: bytes, message_type: int = 1) -> int:
        handler = self.messages.get(connection_id)
        if handler is None:
            return HV_STATUS_INVALID_CONNECTION_ID
        status = handler(message_type, payload)
        assert isinstance(status, int)
        return status

    def signal(self, connection_id: int) -> int:
        handler = self.events.get(connection_id)
        if handler is None:
            return HV_STATUS_INVALID_CONNECTION_ID
        status = handler()
        assert isinstance(status, int)
        return status


# --- wire formats (guest view) ----------------------------------------------------------------------

def header(msgtype: int) -> bytes:
    return struct.pack("<II", msgtype, 0)


def initiate_contact(version: int, target_vcpu: int = 0, interrupt_page: int = 0,
                     monitor1: int = 0, monitor2: int = 0, msg_sint: int = VMBUS_SINT) -> bytes:
    """vmbus_try_connection_id: from 5.0 the interrupt_page union holds msg_sint, msg_vtl."""
    if version >= V5_0:
        union = struct.pack("<BB6x", msg_sint, 0)
    else:
        union = struct.pack("<Q", interrupt_page)
    return header(MSG_INITIATE_CONTACT) + struct.pack("<II", version, target_vcpu) + union + struct.pack("<QQ", monitor1, monitor2)


@dataclass
class Offer:
    if_type: uuid.UUID
    if_instance: uuid.UUID
    chn_flags: int
    mmio_megabytes: int
    user_def: bytes
    sub_channel_index: int
    child_relid: int
    monitorid: int
    monitor_allocated: int
    is_dedicated_interrupt: int
    connection_id: int
    raw: bytes


def parse_offer(payload: bytes) -> Offer:
    """struct vmbus_channel_offer_channel, field by field at Linux's packed offsets."""
    assert len(payload) >= 196, f"offer of {len(payload)} bytes (Linux's min_payload_len is 196)"
    u16 = lambda off: struct.unpack_from("<H", payload, off)[0]
    u32 = lambda off: struct.unpack_from("<I", payload, off)[0]
    return Offer(
        if_type=uuid.UUID(bytes_le=payload[8:24]),
        if_instance=uuid.UUID(bytes_le=payload[24:40]),
        chn_flags=u16(56), mmio_megabytes=u16(58), user_def=payload[60:180],
        sub_channel_index=u16(180), child_relid=u32(184), monitorid=payload[188],
        monitor_allocated=payload[189] & 1, is_dedicated_interrupt=u16(190) & 1,
        connection_id=u32(192), raw=payload)


def gpadl_messages(relid: int, handle: int, pfns: list[int], byte_count: int | None = None,
                   byte_offset: int = 0) -> list[bytes]:
    """create_gpadl_header's split: one range; 26 pfns in the header, 28 per body."""
    n = len(pfns)
    byte_count = n * PAGE if byte_count is None else byte_count
    first = pfns[:HEADER_PFNS]
    msgs = [header(MSG_GPADL_HEADER) + struct.pack("<IIHH", relid, handle, 8 + 8 * n, 1)
            + struct.pack("<II", byte_count, byte_offset) + struct.pack(f"<{len(first)}Q", *first)]
    rest = pfns[HEADER_PFNS:]
    while rest:
        chunk, rest = rest[:BODY_PFNS], rest[BODY_PFNS:]
        msgs.append(header(MSG_GPADL_BODY) + struct.pack("<II", 0, handle) + struct.pack(f"<{len(chunk)}Q", *chunk))
    return msgs


def open_channel_msg(relid: int, openid: int, gpadl: int, target_vp: int, downstream_offset: int,
                     userdata: bytes = b"") -> bytes:
    return header(MSG_OPENCHANNEL) + struct.pack("<IIIII", relid, openid, gpadl, target_vp, downstream_offset) \
        + userdata.ljust(120, b"\0")


def packet_bytes(payload: bytes, trans_id: int = 0, flags: int = 0, pkt_type: int = PKT_DATA_INBAND) -> bytes:
    """A vmpacket_descriptor (offset8 2) and the payload padded to 8 bytes (vmbus_sendpacket)."""
    padded = (len(payload) + 7) & ~7
    return struct.pack("<HHHHQ", pkt_type, 2, (16 + padded) // 8, flags, trans_id) + payload + bytes(padded - len(payload))


# --- the guest side of a ring (ring_buffer.c) ------------------------------------------------------

@dataclass
class GuestPacket:
    type: int
    flags: int
    trans_id: int
    payload: bytes


class GuestRing:
    """One ring as the guest maps it: header page, then the data pages, in GPADL order."""

    def __init__(self, mem: FakeGuestMemory, pages: list[int]) -> None:
        self.mem = mem
        self.pages = pages
        self.size = (len(pages) - 1) * PAGE
        self.priv_read_index = 0

    def init(self) -> None:
        """hv_ringbuffer_init: zero the header, set feat_pending_send_sz."""
        self.mem.poke(self.pages[0] << 12, bytes(PAGE))
        self.set_field(FEATURE_BITS, 1)

    def field(self, off: int) -> int:
        return self.mem.u32((self.pages[0] << 12) + off)

    def set_field(self, off: int, value: int) -> None:
        self.mem.set_u32((self.pages[0] << 12) + off, value)

    def _gpa(self, off: int) -> int:
        return (self.pages[1 + off // PAGE] << 12) + off % PAGE

    def _pieces(self, off: int, n: int):
        """(gpa, length) pieces, split at page ends and at the end of the data area."""
        off %= self.size
        while n > 0:
            take = min(n, PAGE - off % PAGE, self.size - off)
            yield self._gpa(off), take
            off = (off + take) % self.size
            n -= take

    def read_data(self, off: int, n: int) -> bytes:
        return b"".join(self.mem.peek(gpa, k) for gpa, k in self._pieces(off, n))

    def write_data(self, off: int, data: bytes) -> None:
        pos = 0
        for gpa, k in self._pieces(off, len(data)):
            self.mem.poke(gpa, data[pos:pos + k])
            pos += k

    def bytes_to_write(self) -> int:
        w, r = self.field(WRITE_INDEX), self.field(READ_INDEX)
        return self.size - (w - r) if w >= r else r - w


# --- the client ------------------------------------------------------------------------------------

class ProtocolError(AssertionError):
    """The host answered something Linux would not accept."""


class VmbusClient:
    """The Linux guest's VMBus driver, one step per method."""

    def __init__(self, mem: FakeGuestMemory, synic: FakeSynic, registry: FakeRegistry,
                 alloc: PageAllocator, vp: int = 0) -> None:
        self.mem = mem
        self.synic = synic
        self.registry = registry
        self.alloc = alloc
        self.vp = vp
        self.msg_conn_id = CONN_ID_1
        self.version: int | None = None
        self.next_gpadl = LINUX_FIRST_GPADL
        self.tried: list[int] = []

    # messages
    def post(self, payload: bytes, connection_id: int | None = None, message_type: int = 1) -> int:
        return self.registry.post(self.msg_conn_id if connection_id is None else connection_id, payload, message_type)

    def expect(self, msgtype: int) -> bytes:
        msgs = self.synic.take_messages()
        if len(msgs) != 1:
            raise ProtocolError(f"expected one message of type {msgtype}, got {[m.msgtype for m in msgs]}")
        m = msgs[0]
        if m.msgtype != msgtype or m.message_type == 0:
            raise ProtocolError(f"expected message type {msgtype}, got {m.msgtype} (SynIC type {m.message_type})")
        if m.vp != self.vp or m.sint != VMBUS_SINT:
            raise ProtocolError(f"message went to vp {m.vp} sint {m.sint}")
        return m.payload

    # connection
    def try_version(self, version: int) -> bool:
        """vmbus_try_connection_id: INITIATE_CONTACT to id 4 from 5.0, else to id 1."""
        self.tried.append(version)
        conn = CONN_ID_4 if version >= V5_0 else CONN_ID_1
        status = self.post(initiate_contact(version, self.vp, interrupt_page=0x5000,
                                            monitor1=0x6000, monitor2=0x7000), connection_id=conn)
        if status != HV_STATUS_SUCCESS:
            raise ProtocolError(f"INITIATE_CONTACT -> status {status:#x}")
        reply = self.expect(MSG_VERSION_RESPONSE)
        if len(reply) < 16:
            raise ProtocolError(f"VERSION_RESPONSE of {len(reply)} bytes")
        supported, _state, _pad, msg_conn_id = struct.unpack_from("<BBHI", reply, 8)
        if not supported:
            return False
        self.version = version
        self.msg_conn_id = msg_conn_id if version >= V5_0 else CONN_ID_1
        return True

    def connect(self, versions: tuple[int, ...] = LINUX_VERSIONS) -> int:
        """vmbus_connect: newest first until the host accepts one."""
        for v in versions:
            if self.try_version(v):
                return v
        raise ProtocolError("no version accepted")

    def request_offers(self) -> list[Offer]:
        assert self.post(header(MSG_REQUESTOFFERS)) == HV_STATUS_SUCCESS
        msgs = self.synic.take_messages()
        if not msgs or msgs[-1].msgtype != MSG_ALLOFFERS_DELIVERED:
            raise ProtocolError(f"offers not terminated by ALLOFFERS_DELIVERED: {[m.msgtype for m in msgs]}")
        offers = []
        for m in msgs[:-1]:
            if m.msgtype != MSG_OFFERCHANNEL:
                raise ProtocolError(f"unexpected message {m.msgtype} among offers")
            offers.append(parse_offer(m.payload))
        return offers

    def unload(self) -> None:
        assert self.post(header(MSG_UNLOAD)) == HV_STATUS_SUCCESS
        self.expect(MSG_UNLOAD_RESPONSE)
        self.version = None
        self.msg_conn_id = CONN_ID_1

    # GPADLs
    def create_gpadl(self, relid: int, pfns: list[int], **kw) -> tuple[int, int]:
        """(handle, creation_status) after GPADL_HEADER and its bodies."""
        handle = self.next_gpadl
        self.next_gpadl += 1
        for m in gpadl_messages(relid, handle, pfns, **kw):
            assert self.post(m) == HV_STATUS_SUCCESS
        reply = self.expect(MSG_GPADL_CREATED)
        r_relid, r_handle, status = struct.unpack_from("<III", reply, 8)
        if (r_relid, r_handle) != (relid, handle):
            raise ProtocolError(f"GPADL_CREATED for {r_relid}/{r_handle:#x}, wanted {relid}/{handle:#x}")
        return handle, status

    def teardown_gpadl(self, relid: int, handle: int) -> None:
        assert self.post(header(MSG_GPADL_TEARDOWN) + struct.pack("<II", relid, handle)) == HV_STATUS_SUCCESS
        reply = self.expect(MSG_GPADL_TORNDOWN)
        if struct.unpack_from("<I", reply, 8)[0] != handle:
            raise ProtocolError("GPADL_TORNDOWN for another handle")

    # channels
    def open(self, offer: Offer, send_pages: int = 5, recv_pages: int = 5, target_vp: int | None = None,
             scattered: bool = False) -> "GuestChannel":
        """vmbus_open: ring pages, GPADL, hv_ringbuffer_init both rings, OPENCHANNEL."""
        pages = self.alloc.alloc(send_pages + recv_pages, scattered=scattered)
        ch = GuestChannel(self, offer, pages, send_pages)
        ch.outbound.init()
        ch.inbound.init()
        handle, status = self.create_gpadl(offer.child_relid, pages)
        if status:
            raise ProtocolError(f"GPADL refused: {status:#x}")
        ch.gpadl = handle
        status = self.open_raw(offer.child_relid, handle, send_pages,
                               self.vp if target_vp is None else target_vp)
        if status:
            raise ProtocolError(f"OPENCHANNEL refused: {status:#x}")
        return ch

    def open_raw(self, relid: int, gpadl: int, downstream_offset: int, target_vp: int = 0,
                 openid: int | None = None) -> int:
        """OPENCHANNEL as given; the OPENCHANNEL_RESULT status."""
        openid = relid if openid is None else openid
        assert self.post(open_channel_msg(relid, openid, gpadl, target_vp, downstream_offset)) == HV_STATUS_SUCCESS
        reply = self.expect(MSG_OPENCHANNEL_RESULT)
        r_relid, r_openid, status = struct.unpack_from("<III", reply, 8)
        if (r_relid, r_openid) != (relid, openid):
            raise ProtocolError("OPENCHANNEL_RESULT for another open")
        return status


class GuestChannel:
    """An open channel, guest side: hv_ringbuffer_write / hv_pkt_iter_* on the two rings."""

    def __init__(self, client: VmbusClient, offer: Offer, pages: list[int], send_pages: int) -> None:
        self.client = client
        self.offer = offer
        self.relid = offer.child_relid
        self.pages = pages
        self.gpadl = 0
        self.outbound = GuestRing(client.mem, pages[:send_pages])
        self.inbound = GuestRing(client.mem, pages[send_pages:])
        self.signals_sent = 0

    def kick(self) -> int:
        """vmbus_setevent: HvSignalEvent on the offer's connection id."""
        self.signals_sent += 1
        return self.client.registry.signal(self.offer.connection_id)

    def send(self, payload: bytes, trans_id: int = 0, flags: int = 0, pkt_type: int = PKT_DATA_INBAND) -> bool:
        """hv_ringbuffer_write and hv_signal_on_write; False when the ring is full (-EAGAIN)."""
        pkt = packet_bytes(payload, trans_id, flags, pkt_type)
        ring = self.outbound
        total = len(pkt) + TRAILER
        old_write = ring.field(WRITE_INDEX)
        if ring.bytes_to_write() <= total:
            return False
        ring.write_data(old_write, pkt)
        ring.write_data((old_write + len(pkt)) % ring.size, struct.pack("<Q", old_write << 32))
        ring.set_field(WRITE_INDEX, (old_write + total) % ring.size)
        if ring.field(INTERRUPT_MASK):
            return True
        if old_write == ring.field(READ_INDEX):
            assert self.kick() == HV_STATUS_SUCCESS
        return True

    def recv(self, limit: int | None = None) -> list[GuestPacket]:
        """hv_pkt_iter_first/next then hv_pkt_iter_close (with its pending_send_sz signal)."""
        ring = self.inbound
        start = ring.field(READ_INDEX)
        ring.priv_read_index = start
        out = []
        while limit is None or len(out) < limit:
            w = ring.field(WRITE_INDEX)
            avail = (w - ring.priv_read_index) % ring.size
            if avail < 16:
                assert avail == 0, f"host left {avail} stray bytes in the ring"
                break
            t, off8, len8, flags, tid = struct.unpack("<HHHHQ", ring.read_data(ring.priv_read_index, 16))
            assert 16 <= off8 * 8 <= len8 * 8 and len8 * 8 + TRAILER <= avail, "host wrote a malformed packet"
            payload = ring.read_data((ring.priv_read_index + off8 * 8) % ring.size, (len8 - off8) * 8)
            trailer = struct.unpack("<Q", ring.read_data((ring.priv_read_index + len8 * 8) % ring.size, 8))[0]
            assert trailer == ring.priv_read_index << 32, "trailer is not the packet's start index << 32"
            out.append(GuestPacket(t, flags, tid, payload))
            ring.priv_read_index = (ring.priv_read_index + len8 * 8 + TRAILER) % ring.size
        self._iter_close(start)
        return out

    def _iter_close(self, start: int) -> None:
        ring = self.inbound
        ring.set_field(READ_INDEX, ring.priv_read_index)
        if not ring.field(FEATURE_BITS) & 1:
            return
        pending = ring.field(PENDING_SEND_SZ)
        if not pending:
            return
        curr_write_sz = ring.bytes_to_write()
        bytes_read = (ring.priv_read_index - start) % ring.size
        if curr_write_sz - bytes_read > pending:
            return
        if curr_write_sz <= pending:
            return
        assert self.kick() == HV_STATUS_SUCCESS

    def begin_read(self) -> None:
        self.inbound.set_field(INTERRUPT_MASK, 1)

    def end_read(self) -> int:
        self.inbound.set_field(INTERRUPT_MASK, 0)
        return (self.inbound.field(WRITE_INDEX) - self.inbound.field(READ_INDEX)) % self.inbound.size

    def set_pending_send_sz(self, size: int) -> None:
        """set_channel_pending_send_size (hv_sock)."""
        self.outbound.set_field(PENDING_SEND_SZ, size)

    def close(self, teardown: bool = True) -> None:
        """vmbus_close_internal: CLOSECHANNEL, then tear the ring GPADL down."""
        assert self.client.post(header(MSG_CLOSECHANNEL) + struct.pack("<I", self.relid)) == HV_STATUS_SUCCESS
        assert self.client.synic.take_messages() == [], "CLOSECHANNEL has no answer"
        if teardown:
            self.client.teardown_gpadl(self.relid, self.gpadl)


# --- a device and a complete rig -------------------------------------------------------------------

class RecordingDevice:
    """A VmbusDevice that records its callbacks; `echo` sends every payload back reversed."""

    def __init__(self, name: str = "dev0", class_id: uuid.UUID = HV_DM_GUID,
                 instance_id: uuid.UUID | None = None, echo: bool = False) -> None:
        self.name = name
        self.class_id = class_id
        self.instance_id = instance_id or uuid.uuid5(uuid.NAMESPACE_OID, name)
        self.echo = echo
        self.channel = None
        self.opened_count = 0
        self.closed_count = 0
        self.packets: list[tuple[object, bytes, int]] = []
        self.echo_results: list[bool] = []
        self.writable_calls = 0
        self.events: list[str] = []

    def opened(self, channel) -> None:
        self.channel = channel
        self.opened_count += 1
        self.events.append("opened")

    def packet(self, channel, payload: bytes, trans_id: int) -> None:
        self.packets.append((channel, payload, trans_id))
        self.events.append("packet")
        if self.echo:
            self.echo_results.append(channel.send(payload[::-1], trans_id))

    def closed(self) -> None:
        self.closed_count += 1
        self.events.append("closed")

    def writable(self, channel) -> None:
        self.writable_calls += 1


@dataclass
class Rig:
    """Fake guest memory, SynIC and registry, a VmBus with `devices`, and a client."""

    devices: list[RecordingDevice] = field(default_factory=lambda: [RecordingDevice()])
    mem_size: int = 4 * MiB
    bus_kwargs: dict = field(default_factory=dict)
    mem_class: type = FakeGuestMemory

    def __post_init__(self) -> None:
        from devices.vmbus import VmBus

        self.mem = self.mem_class(self.mem_size)
        self.synic = FakeSynic()
        self.registry = FakeRegistry()
        self.bus = VmBus(self.synic, self.registry, self.mem, **self.bus_kwargs)
        for d in self.devices:
            self.bus.add_device(d)
        self.alloc = PageAllocator(self.mem)
        self.client = self.new_client()

    @property
    def device(self) -> RecordingDevice:
        return self.devices[0]

    def new_client(self) -> VmbusClient:
        self.synic.take_messages()
        self.synic.take_events()
        return VmbusClient(self.mem, self.synic, self.registry, self.alloc)

    def check(self) -> None:
        """No host misuse of the fakes, no swallowed exception, no internal error."""
        assert self.synic.violations == []
        assert self.registry.violations == []
        assert self.bus._deferred.failures == 0
        stats = self.bus.stats()
        assert "internal-error" not in stats["errors"], stats["errors"]
        assert stats["device_errors"] == 0

    def open_first(self, **kw) -> GuestChannel:
        self.client.connect()
        offers = self.client.request_offers()
        return self.client.open(offers[0], **kw)
