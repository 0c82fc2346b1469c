"""The DM protocol layouts (drivers/hv/hv_balloon.c) and their parser's refusals."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.hyperv.balloon_protocol import (
    DM_BALLOON_RESPONSE,
    DM_CAPABILITIES_REPORT,
    DM_HOT_ADD_SIZE,
    DM_HOT_ADD_WITH_REGION_SIZE,
    DM_INFO_MESSAGE,
    DM_MAX_RANGES_PER_MESSAGE,
    DM_MEM_HOT_ADD_REQUEST,
    DM_STATUS_REPORT,
    DM_UNBALLOON_REQUEST,
    DM_VERSION_REQUEST,
    DYNMEM_PROTOCOL_VERSION_WIN7,
    DYNMEM_PROTOCOL_VERSION_WIN8,
    DYNMEM_PROTOCOL_VERSION_WIN10,
    INFO_TYPE_MAX_PAGE_CNT,
    BalloonRequest,
    BalloonResponse,
    CapabilitiesReport,
    CapabilitiesResponse,
    DmProtocolError,
    HotAddRequest,
    HotAddResponse,
    InfoMessage,
    PageRange,
    StatusReport,
    UnballoonRequest,
    UnballoonResponse,
    VersionRequest,
    VersionResponse,
    parse,
)


def test_version_numbers_are_linuxs() -> None:
    # DYNMEM_MAKE_VERSION(major, minor) = major << 16 | minor
    assert DYNMEM_PROTOCOL_VERSION_WIN7 == 0x0000_0003    # 0.3
    assert DYNMEM_PROTOCOL_VERSION_WIN8 == 0x0001_0000    # 1.0
    assert DYNMEM_PROTOCOL_VERSION_WIN10 == 0x0002_0000   # 2.0


def test_header_and_version_request_bytes() -> None:
    raw = VersionRequest(0x11223344, DYNMEM_PROTOCOL_VERSION_WIN8, is_last_attempt=True).pack()
    # type 1, size 16, trans_id; minor_version u16, major_version u16; is_last_attempt bit 0
    assert raw == bytes.fromhex("0100 1000 44332211 0000 0100 01000000".replace(" ", ""))


def test_page_range_is_40_bit_start_and_24_bit_count() -> None:
    r = PageRange(0x12_3456_789A, 0xABCDEF)
    assert r.pack_u64() == 0xABCDEF_12_3456_789A
    assert PageRange.from_u64(0xABCDEF_12_3456_789A) == r
    with pytest.raises(ValueError):
        PageRange(1 << 40, 1).pack_u64()
    with pytest.raises(ValueError):
        PageRange(0, 1 << 24).pack_u64()


def test_capabilities_bit_fields() -> None:
    raw = CapabilitiesReport(5, balloon=True, hot_add=True, hot_add_alignment=7, min_page_cnt=0,
                             max_page_number=(1 << 64) - 1).pack()
    assert len(raw) == 32
    caps, min_pages, max_page = struct.unpack_from("<QQQ", raw, 8)
    assert caps == 1 | 2 | (7 << 2) and min_pages == 0 and max_page == (1 << 64) - 1
    msg = parse(struct.pack("<HHI", DM_CAPABILITIES_REPORT, 32, 9) + struct.pack("<QQQ", (15 << 2) | 1 | (1 << 9), 3, 4))
    assert isinstance(msg, CapabilitiesReport)
    assert msg.balloon and not msg.hot_add and msg.hot_add_alignment == 15 and msg.hot_add_alignment_bytes == 32 << 30
    assert (msg.min_page_cnt, msg.max_page_number, msg.caps) == (3, 4, (15 << 2) | 1 | (1 << 9))


def test_sizes_of_every_message() -> None:
    sizes = {VersionRequest(1, 1): 16, VersionResponse(1, True): 16, CapabilitiesReport(1, True, True, 7): 32,
             CapabilitiesResponse(1, True): 16, StatusReport(1, 2, 3): 48, BalloonRequest(1, 5): 16,
             BalloonResponse(1, True, (PageRange(1, 1),) * 3): 16 + 24, UnballoonRequest(1, False, (PageRange(1, 1),)): 24,
             UnballoonResponse(1): 8, HotAddRequest(1, PageRange(1, 1)): 16,
             HotAddRequest(1, PageRange(1, 1), PageRange(1, 1)): 24, HotAddResponse(1, 1, 1): 16,
             InfoMessage.max_page_count(1, 5): 32}
    for msg, size in sizes.items():
        raw = msg.pack()
        assert len(raw) == size and struct.unpack_from("<H", raw, 2)[0] == size, msg


def test_balloon_response_bits() -> None:
    raw = BalloonResponse(3, True, (PageRange(0x100, 512), PageRange(0x400, 1))).pack()
    reserved, bits = struct.unpack_from("<II", raw, 8)
    assert reserved == 0 and bits == 1 | (2 << 1)  # more_pages:1, range_count:31
    assert struct.unpack_from("<QQ", raw, 16) == (0x100 | 512 << 40, 0x400 | 1 << 40)


def test_unballoon_request_bits_and_its_limit() -> None:
    raw = UnballoonRequest(3, True, (PageRange(7, 9),)).pack()
    assert struct.unpack_from("<II", raw, 8) == (1, 1)  # more_pages:1 + reservedz, range_count
    assert DM_MAX_RANGES_PER_MESSAGE == 510
    assert len(UnballoonRequest(1, False, (PageRange(1, 1),) * 510).pack()) == 4096
    with pytest.raises(ValueError):
        UnballoonRequest(1, False, (PageRange(1, 1),) * 511).pack()


def test_status_report_fields() -> None:
    raw = struct.pack("<HHI", DM_STATUS_REPORT, 48, 1) + struct.pack("<QQQQII", 10, 20, 30, 40, 50, 60)
    assert parse(raw) == StatusReport(1, 10, 20, 30, 40, 50, 60)


def test_hot_add_request_with_and_without_region() -> None:
    plain = parse(struct.pack("<HHIQ", DM_MEM_HOT_ADD_REQUEST, DM_HOT_ADD_SIZE, 1, 5 | 6 << 40))
    assert plain == HotAddRequest(1, PageRange(5, 6), None)
    with_region = parse(struct.pack("<HHIQQ", DM_MEM_HOT_ADD_REQUEST, DM_HOT_ADD_WITH_REGION_SIZE, 1,
                                    5 | 6 << 40, 0 | 64 << 40))
    assert with_region == HotAddRequest(1, PageRange(5, 6), PageRange(0, 64))
    with pytest.raises(DmProtocolError) as e:  # longer than 16 but too short for the region
        parse(struct.pack("<HHIQI", DM_MEM_HOT_ADD_REQUEST, 20, 1, 0, 0))
    assert e.value.kind == "short-message"


def test_info_message_max_page_count() -> None:
    msg = parse(InfoMessage.max_page_count(4, 123456).pack())
    assert isinstance(msg, InfoMessage) and msg.items() == [(INFO_TYPE_MAX_PAGE_CNT, struct.pack("<Q", 123456))]
    with pytest.raises(DmProtocolError) as e:
        parse(struct.pack("<HHIII", DM_INFO_MESSAGE, 16, 1, 0, 8))
    assert e.value.kind == "bad-info"


@pytest.mark.parametrize("raw,kind", [
    (b"", "short-header"),
    (b"\x01\x00\x10\x00\x00\x00", "short-header"),
    (struct.pack("<HHI", DM_VERSION_REQUEST, 16, 0) + b"\0" * 4, "bad-size"),       # size beyond the packet
    (struct.pack("<HHI", DM_VERSION_REQUEST, 4, 0) + b"\0" * 8, "bad-size"),        # size below the header
    (struct.pack("<HHI", 13, 8, 0), "unknown-type"),
    (struct.pack("<HHI", 0xFFFF, 8, 0), "unknown-type"),
    (struct.pack("<HHI", DM_VERSION_REQUEST, 8, 0) + b"\0" * 8, "short-message"),   # header says 8 of 16
    (struct.pack("<HHI", DM_STATUS_REPORT, 40, 0) + b"\0" * 40, "short-message"),
    (struct.pack("<HHIII", DM_BALLOON_RESPONSE, 16, 0, 0, 1 << 1), "bad-range-count"),          # 1 range, 0 bytes
    (struct.pack("<HHIIIQ", DM_BALLOON_RESPONSE, 24, 0, 0, 2 << 1, 0) + b"\0" * 8, "bad-range-count"),
    (struct.pack("<HHIIIQ", DM_BALLOON_RESPONSE, 24, 0, 0, 0, 0), "bad-range-count"),          # 0 ranges, 8 extra
    (struct.pack("<HHIII", DM_UNBALLOON_REQUEST, 16, 0, 0, 0xFFFFFFFF), "bad-range-count"),
])
def test_parser_refusals(raw: bytes, kind: str) -> None:
    with pytest.raises(DmProtocolError) as e:
        parse(raw)
    assert e.value.kind == kind


def test_padding_after_the_declared_size_is_ignored() -> None:
    raw = UnballoonResponse(9).pack() + b"\xaa" * 8  # VMBus pads packets to 8 bytes
    assert parse(raw) == UnballoonResponse(9)


ranges = st.lists(st.builds(PageRange, st.integers(0, (1 << 40) - 1), st.integers(0, (1 << 24) - 1)), max_size=20)
messages = st.one_of(
    st.builds(VersionRequest, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.booleans()),
    st.builds(VersionResponse, st.integers(0, 2**32 - 1), st.booleans()),
    st.builds(CapabilitiesReport, st.integers(0, 2**32 - 1), st.booleans(), st.booleans(), st.integers(0, 15),
              st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
    st.builds(StatusReport, st.integers(0, 2**32 - 1), *[st.integers(0, 2**64 - 1)] * 4, *[st.integers(0, 2**32 - 1)] * 2),
    st.builds(BalloonRequest, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    st.builds(BalloonResponse, st.integers(0, 2**32 - 1), st.booleans(), ranges.map(tuple)),
    st.builds(UnballoonRequest, st.integers(0, 2**32 - 1), st.booleans(), ranges.map(tuple)),
    st.builds(UnballoonResponse, st.integers(0, 2**32 - 1)),
    st.builds(HotAddRequest, st.integers(0, 2**32 - 1), ranges.filter(bool).map(lambda r: r[0]),
              st.none() | ranges.filter(bool).map(lambda r: r[0])),
    st.builds(HotAddResponse, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    st.builds(InfoMessage, st.integers(0, 2**32 - 1), st.binary(max_size=40)),
)


@settings(max_examples=400)
@given(messages)
def test_every_message_round_trips(msg) -> None:
    assert parse(msg.pack()) == msg


@settings(max_examples=500)
@given(st.binary(max_size=80))
def test_arbitrary_bytes_parse_or_raise_the_named_error(raw: bytes) -> None:
    try:
        msg = parse(raw)
    except DmProtocolError as e:
        assert e.kind in {"short-header", "bad-size", "unknown-type", "short-message", "bad-range-count", "bad-info"}
    else:
        assert len(raw) >= 8 and len(msg.pack()) <= len(raw)
