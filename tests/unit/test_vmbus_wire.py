"""VMBus wire formats and building blocks on their own: message layouts at Linux's packed
offsets, version policy, packet framing, GPADL assembly and validation, deferred calls."""

from __future__ import annotations

import struct
import threading
import uuid

import pytest

from devices.vmbus import messages as m
from devices.vmbus.deferred import DeferredCalls
from devices.vmbus.gpadl import GpadlBuilder, GpadlError, parse_ranges
from devices.vmbus.messages import MessageError
from devices.vmbus.packets import encode_inband, encode_packet
from devices.vmbus.versions import SUPPORTED_VERSIONS, is_supported, version_name
from tests.vmbus_client import (
    HV_DM_GUID,
    LINUX_VERSIONS,
    V5_0,
    V4_0,
    WIN7,
    WS2008,
    initiate_contact,
    parse_offer,
)

INSTANCE = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")


# --- messages -----------------------------------------------------------------------------------

def test_offer_channel_layout_matches_linux_packed_struct():
    raw = m.offer_channel(if_type=HV_DM_GUID, if_instance=INSTANCE, child_relid=3, connection_id=0x103,
                          chn_flags=0x4, mmio_megabytes=7, user_defined=b"ud", sub_channel_index=0)
    assert len(raw) == 196                      # Linux's min_payload_len for OFFERCHANNEL
    assert struct.unpack_from("<I", raw, 0)[0] == 1
    # guid_t byte order: GUID_INIT stores the first three fields little-endian
    assert raw[8:24] == bytes.fromhex("dc74505285 89e246 8057a307dc18a502".replace(" ", ""))
    assert raw[24:40] == bytes.fromhex("33221100 5544 7766 8899aabbccddeeff".replace(" ", ""))
    assert struct.unpack_from("<HH", raw, 56) == (0x4, 7)
    assert raw[60:62] == b"ud" and raw[62:180] == bytes(118)
    assert struct.unpack_from("<I", raw, 184)[0] == 3          # child_relid
    assert raw[188] == 0                                        # monitorid
    assert raw[189] == 0                                        # monitor_allocated:1 clear
    assert struct.unpack_from("<H", raw, 190)[0] == 1           # is_dedicated_interrupt:1 set
    assert struct.unpack_from("<I", raw, 192)[0] == 0x103       # connection_id
    offer = parse_offer(raw)
    assert (offer.if_type, offer.if_instance, offer.child_relid) == (HV_DM_GUID, INSTANCE, 3)


def test_offer_refuses_oversized_user_data():
    with pytest.raises(ValueError):
        m.offer_channel(if_type=HV_DM_GUID, if_instance=INSTANCE, child_relid=1, connection_id=1,
                        user_defined=bytes(121))


def test_version_response_layout():
    raw = m.version_response(True, msg_conn_id=4)
    assert len(raw) == 16
    assert struct.unpack("<IIBBHI", raw) == (15, 0, 1, 0, 0, 4)
    assert m.version_response(False)[8] == 0


def test_reply_layouts():
    assert struct.unpack("<IIIII", m.gpadl_created(2, 0xE1E10, 0)) == (10, 0, 2, 0xE1E10, 0)
    assert struct.unpack("<III", m.gpadl_torndown(0xE1E10)) == (12, 0, 0xE1E10)
    assert struct.unpack("<IIIII", m.open_result(2, 9, 1)) == (6, 0, 2, 9, 1)
    assert struct.unpack("<IIII", m.modifychannel_response(2, 0)) == (24, 0, 2, 0)
    assert m.unload_response() == struct.pack("<II", 17, 0)
    assert m.alloffers_delivered() == struct.pack("<II", 4, 0)


def test_parse_initiate_contact_both_unions():
    c = m.parse_initiate_contact(initiate_contact(V5_0, target_vcpu=3, msg_sint=2, monitor1=0x1000, monitor2=0x2000))
    assert (c.version, c.target_vcpu, c.msg_sint, c.msg_vtl) == (V5_0, 3, 2, 0)
    assert (c.monitor_page1, c.monitor_page2) == (0x1000, 0x2000)
    c = m.parse_initiate_contact(initiate_contact(V4_0, interrupt_page=0xABC000))
    assert c.interrupt_page == 0xABC000


@pytest.mark.parametrize("parse,size", [
    (m.parse_initiate_contact, 40), (m.parse_open_channel, 148), (m.parse_close_channel, 12),
    (m.parse_gpadl_header, 20), (m.parse_gpadl_body, 16), (m.parse_gpadl_teardown, 16),
    (m.parse_modify_channel, 16), (m.parse_relid_released, 12),
])
def test_short_messages_raise_message_error(parse, size):
    parse(bytes(size))
    with pytest.raises(MessageError):
        parse(bytes(size - 1))


def test_message_type_needs_a_header():
    assert m.message_type(struct.pack("<II", 14, 0)) == 14
    with pytest.raises(MessageError):
        m.message_type(b"\x0e\0\0")


# --- versions -----------------------------------------------------------------------------------

def test_every_version_linux_asks_for_is_accepted():
    assert set(LINUX_VERSIONS) == SUPPORTED_VERSIONS
    assert all(is_supported(v) for v in LINUX_VERSIONS)


@pytest.mark.parametrize("version", [WIN7, WS2008, 0x60000, 0x50004, 0, 0xFFFFFFFF])
def test_other_versions_are_refused(version):
    assert not is_supported(version)


def test_version_name():
    assert version_name(0x50003) == "5.3" and version_name(0xD) == "0.13"


# --- packets ------------------------------------------------------------------------------------

def test_inband_packet_framing():
    raw = encode_inband(b"abcdefghi", trans_id=0x1122334455667788, completion_requested=True)
    assert struct.unpack_from("<HHHHQ", raw) == (6, 2, 2 + 2, 1, 0x1122334455667788)
    assert raw[16:] == b"abcdefghi" + bytes(7)
    assert len(encode_inband(b"")) == 16


def test_packet_limits():
    encode_packet(6, bytes(0xFFFF * 8 - 16))
    with pytest.raises(ValueError):
        encode_packet(6, bytes(0xFFFF * 8 - 15))
    with pytest.raises(ValueError):
        encode_packet(6, b"", trans_id=1 << 64)


# --- GPADLs -------------------------------------------------------------------------------------

def rng(byte_count: int, byte_offset: int, pfns: list[int]) -> bytes:
    return struct.pack("<II", byte_count, byte_offset) + struct.pack(f"<{len(pfns)}Q", *pfns)


def test_single_range_gpadl_in_header_and_bodies():
    data = rng(3 * 4096, 0, [10, 11, 12])
    b = GpadlBuilder(1, 0xE1E10, len(data), 1, data[:16], max_pages=100)
    assert not b.complete and b.page_count == 3
    b.add_body(data[16:24])
    b.add_body(data[24:])
    g = b.build()
    assert g.ring_pages() == [10, 11, 12] and g.page_count == 3


def test_multi_range_gpadl_and_partial_pages():
    data = rng(100, 4000, [5, 6]) + rng(4096, 0, [9])
    g = GpadlBuilder(1, 7, len(data), 2, data, max_pages=10).build()
    assert [list(r.pfns) for r in g.ranges] == [[5, 6], [9]]
    assert g.ring_pages() is None           # a ring needs whole pages


@pytest.mark.parametrize("rangecount,buflen,first,reason", [
    (0, 16, b"", "gpadl-no-ranges"),
    (1, 20, b"", "gpadl-bad-buflen"),
    (2, 24, b"", "gpadl-bad-buflen"),
    (1, 16 + 8 * 200, b"", "gpadl-too-many-pages"),
    (1, 16, bytes(24), "gpadl-overflow"),
    (1, 16, bytes(12), "gpadl-ragged-message"),
])
def test_gpadl_header_refusals(rangecount, buflen, first, reason):
    with pytest.raises(GpadlError) as e:
        GpadlBuilder(1, 1, buflen, rangecount, first, max_pages=100)
    assert e.value.reason == reason


@pytest.mark.parametrize("data,count,reason", [
    (rng(0, 0, [1]), 1, "gpadl-empty-range"),
    (rng(10, 4096, [1]), 1, "gpadl-bad-offset"),
    (rng(4097, 0, [1]), 1, "gpadl-range-truncated"),       # needs 2 pfns, has 1
    (rng(4096, 0, [1, 2]), 1, "gpadl-length-mismatch"),    # needs 1 pfn, has 2
    (rng(4096, 0, [1 << 40]), 1, "gpadl-bad-pfn"),
    (rng(4096, 0, [1]), 2, "gpadl-range-truncated"),
])
def test_gpadl_range_refusals(data, count, reason):
    with pytest.raises(GpadlError) as e:
        parse_ranges(data, count, max_pages=100)
    assert e.value.reason == reason


def test_gpadl_body_refusals():
    data = rng(2 * 4096, 0, [1, 2])
    b = GpadlBuilder(1, 1, len(data), 1, data[:16], max_pages=10)
    with pytest.raises(GpadlError, match="gpadl-empty-body"):
        b.add_body(b"")
    with pytest.raises(GpadlError, match="gpadl-overflow"):
        b.add_body(bytes(16))
    with pytest.raises(GpadlError, match="gpadl-incomplete"):
        b.build()


# --- deferred calls -----------------------------------------------------------------------------

def test_deferred_calls_run_in_order_and_survive_failures():
    d = DeferredCalls()
    seen = []
    d.add(seen.append, 1)
    d.add(lambda: 1 / 0)
    d.add(seen.append, 2)
    d.run()
    assert seen == [1, 2] and d.failures == 1 and len(d) == 0


def test_deferred_call_may_queue_and_run_more():
    d = DeferredCalls()
    seen = []

    def first():
        seen.append("a")
        d.add(seen.append, "c")
        d.run()                 # re-entrant: runs "b" then "c", in order
        seen.append("after")

    d.add(first)
    d.add(seen.append, "b")
    d.run()
    assert seen == ["a", "b", "c", "after"]


def test_deferred_run_does_not_wait_for_another_runner():
    d = DeferredCalls()
    started, release = threading.Event(), threading.Event()
    seen = []

    def slow():
        started.set()
        release.wait(5)

    d.add(slow)
    t = threading.Thread(target=d.run)
    t.start()
    started.wait(5)
    d.add(seen.append, "x")
    d.run()                     # returns at once: the other thread owns the queue
    assert seen == []
    release.set()
    t.join(5)
    assert seen == ["x"]        # ...and ran the call queued meanwhile
