"""The Hyper-V Dynamic Memory (DM) protocol: message layouts and their (de)serialisation.

Every layout, constant and bit field follows the Linux guest driver, drivers/hv/hv_balloon.c
(all structs `__packed`, little endian). A DM message is the payload of one VMBus in-band
packet and starts with `struct dm_header`:

    dm_header               u16 type, u16 size (whole message, header included), u32 trans_id

Guest -> host                               Host -> guest
    DM_VERSION_REQUEST       16 bytes           DM_VERSION_RESPONSE       16 bytes
    DM_CAPABILITIES_REPORT   32 bytes           DM_CAPABILITIES_RESPONSE  16 bytes
    DM_STATUS_REPORT         48 bytes           DM_BALLOON_REQUEST        16 bytes
    DM_BALLOON_RESPONSE      16 + 8 n           DM_UNBALLOON_REQUEST      16 + 8 n
    DM_UNBALLOON_RESPONSE     8 bytes           DM_MEM_HOT_ADD_REQUEST    16, or 24 with a region
    DM_MEM_HOT_ADD_RESPONSE  16 bytes           DM_INFO_MESSAGE           16 + info

`union dm_mem_page_range` is one u64: start_page in bits 0..39, page_cnt in bits 40..63.
Pages are Hyper-V pages (HV_HYP_PAGE_SIZE, 4 KiB) whatever the guest's page size.

Every message type has a frozen dataclass with `pack()`; `parse()` turns a payload into one
of them. Both directions are implemented so that tests can play the guest driver. `parse`
checks the header size against the payload (the payload may be longer: VMBus pads packets to
8 bytes), the fixed part of each message against the header size, and range counts against
what the header says the message holds; any violation raises `DmProtocolError`, whose `kind`
names what was wrong so the device can count refusals by kind.

Limits the host must respect (the guest driver's, not the protocol's): the guest receives
into one HV_HYP_PAGE_SIZE buffer and never consumes a larger packet (hv_ringbuffer_read()
answers -ENOBUFS), so a host message is at most DM_MESSAGE_MAX_SIZE bytes; a DM_UNBALLOON_REQUEST
therefore carries at most DM_MAX_RANGES_PER_MESSAGE ranges. The guest fills its balloon
responses up to the same size.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import NamedTuple, Union

HV_HYP_PAGE_SHIFT = 12
HV_HYP_PAGE_SIZE = 1 << HV_HYP_PAGE_SHIFT


def DYNMEM_MAKE_VERSION(major: int, minor: int) -> int:
    return (major << 16) | minor


def DYNMEM_MAJOR_VERSION(version: int) -> int:
    return (version & 0xFFFFFFFF) >> 16


def DYNMEM_MINOR_VERSION(version: int) -> int:
    return version & 0xFFFF


DYNMEM_PROTOCOL_VERSION_1 = DYNMEM_MAKE_VERSION(0, 3)   # 0x00003
DYNMEM_PROTOCOL_VERSION_2 = DYNMEM_MAKE_VERSION(1, 0)   # 0x10000
DYNMEM_PROTOCOL_VERSION_3 = DYNMEM_MAKE_VERSION(2, 0)   # 0x20000
DYNMEM_PROTOCOL_VERSION_WIN7 = DYNMEM_PROTOCOL_VERSION_1
DYNMEM_PROTOCOL_VERSION_WIN8 = DYNMEM_PROTOCOL_VERSION_2
DYNMEM_PROTOCOL_VERSION_WIN10 = DYNMEM_PROTOCOL_VERSION_3
DYNMEM_PROTOCOL_VERSION_CURRENT = DYNMEM_PROTOCOL_VERSION_WIN10

# enum dm_message_type
DM_ERROR = 0
DM_VERSION_REQUEST = 1
DM_VERSION_RESPONSE = 2
DM_CAPABILITIES_REPORT = 3
DM_CAPABILITIES_RESPONSE = 4
DM_STATUS_REPORT = 5
DM_BALLOON_REQUEST = 6
DM_BALLOON_RESPONSE = 7
DM_UNBALLOON_REQUEST = 8
DM_UNBALLOON_RESPONSE = 9
DM_MEM_HOT_ADD_REQUEST = 10
DM_MEM_HOT_ADD_RESPONSE = 11
DM_VERSION_03_MAX = 11
DM_INFO_MESSAGE = 12          # version 1.0 (WIN8) and later
DM_VERSION_1_MAX = 12

MESSAGE_NAMES = {
    DM_ERROR: "DM_ERROR",
    DM_VERSION_REQUEST: "DM_VERSION_REQUEST",
    DM_VERSION_RESPONSE: "DM_VERSION_RESPONSE",
    DM_CAPABILITIES_REPORT: "DM_CAPABILITIES_REPORT",
    DM_CAPABILITIES_RESPONSE: "DM_CAPABILITIES_RESPONSE",
    DM_STATUS_REPORT: "DM_STATUS_REPORT",
    DM_BALLOON_REQUEST: "DM_BALLOON_REQUEST",
    DM_BALLOON_RESPONSE: "DM_BALLOON_RESPONSE",
    DM_UNBALLOON_REQUEST: "DM_UNBALLOON_REQUEST",
    DM_UNBALLOON_RESPONSE: "DM_UNBALLOON_RESPONSE",
    DM_MEM_HOT_ADD_REQUEST: "DM_MEM_HOT_ADD_REQUEST",
    DM_MEM_HOT_ADD_RESPONSE: "DM_MEM_HOT_ADD_RESPONSE",
    DM_INFO_MESSAGE: "DM_INFO_MESSAGE",
}

# enum dm_info_type
INFO_TYPE_MAX_PAGE_CNT = 0

# union dm_mem_page_range bit fields
PAGE_RANGE_START_BITS = 40
PAGE_RANGE_COUNT_BITS = 24
PAGE_RANGE_MAX_START = (1 << PAGE_RANGE_START_BITS) - 1
PAGE_RANGE_MAX_COUNT = (1 << PAGE_RANGE_COUNT_BITS) - 1

# union dm_caps bit fields
CAPS_BALLOON = 1 << 0
CAPS_HOT_ADD = 1 << 1
CAPS_HOT_ADD_ALIGNMENT_SHIFT = 2
CAPS_HOT_ADD_ALIGNMENT_MASK = 0xF   # 4 bits: alignment is 2**n MiB

HEADER = struct.Struct("<HHI")                       # struct dm_header
DM_HEADER_SIZE = HEADER.size                         # 8
_VERSION_REQUEST = struct.Struct("<II")              # union dm_version, is_last_attempt:1 + reservedz:31
_IS_ACCEPTED = struct.Struct("<Q")                   # is_accepted:1 + reservedz:63
_CAPABILITIES = struct.Struct("<QQQ")                # caps, min_page_cnt, max_page_number
_STATUS = struct.Struct("<QQQQII")
_BALLOON = struct.Struct("<II")                      # num_pages, reservedz
_BALLOON_RESPONSE = struct.Struct("<II")             # reservedz, more_pages:1 + range_count:31
_UNBALLOON_REQUEST = struct.Struct("<II")            # more_pages:1 + reservedz:31, range_count
_HOT_ADD_RESPONSE = struct.Struct("<II")             # page_count, result
_INFO = struct.Struct("<II")                         # reserved, info_size
_INFO_HEADER = struct.Struct("<II")                  # struct dm_info_header: type, data_size
_RANGE = struct.Struct("<Q")

DM_VERSION_REQUEST_SIZE = DM_HEADER_SIZE + _VERSION_REQUEST.size        # 16
DM_VERSION_RESPONSE_SIZE = DM_HEADER_SIZE + _IS_ACCEPTED.size           # 16
DM_CAPABILITIES_SIZE = DM_HEADER_SIZE + _CAPABILITIES.size              # 32
DM_CAPABILITIES_RESPONSE_SIZE = DM_HEADER_SIZE + _IS_ACCEPTED.size      # 16
DM_STATUS_SIZE = DM_HEADER_SIZE + _STATUS.size                          # 48
DM_BALLOON_SIZE = DM_HEADER_SIZE + _BALLOON.size                        # 16
DM_BALLOON_RESPONSE_SIZE = DM_HEADER_SIZE + _BALLOON_RESPONSE.size      # 16, then 8 per range
DM_UNBALLOON_REQUEST_SIZE = DM_HEADER_SIZE + _UNBALLOON_REQUEST.size    # 16, then 8 per range
DM_UNBALLOON_RESPONSE_SIZE = DM_HEADER_SIZE                             # 8
DM_HOT_ADD_SIZE = DM_HEADER_SIZE + _RANGE.size                          # 16
DM_HOT_ADD_WITH_REGION_SIZE = DM_HOT_ADD_SIZE + _RANGE.size             # 24
DM_HOT_ADD_RESPONSE_SIZE = DM_HEADER_SIZE + _HOT_ADD_RESPONSE.size      # 16
DM_INFO_SIZE = DM_HEADER_SIZE + _INFO.size                              # 16, then info_size bytes
DM_PAGE_RANGE_SIZE = _RANGE.size                                        # 8

# The guest's receive buffer (recv_buffer[HV_HYP_PAGE_SIZE]) bounds every host message.
DM_MESSAGE_MAX_SIZE = HV_HYP_PAGE_SIZE
DM_MAX_RANGES_PER_MESSAGE = (DM_MESSAGE_MAX_SIZE - DM_UNBALLOON_REQUEST_SIZE) // DM_PAGE_RANGE_SIZE  # 510
_U16, _U32, _U64 = 0xFFFF, 0xFFFFFFFF, (1 << 64) - 1


class DmProtocolError(ValueError):
    """A malformed DM message. `kind` is a short stable name for counting refusals:

    short-header     fewer than 8 bytes, no dm_header
    bad-size         dm_header.size below the header or beyond the packet
    unknown-type     a type number the protocol does not define
    short-message    dm_header.size below the fixed part of the message type
    bad-range-count  range_count does not match the size of the message
    bad-info         DM_INFO_MESSAGE whose info_size does not fit the message
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class PageRange(NamedTuple):
    """union dm_mem_page_range: `count` 4 KiB pages from page frame `start`."""

    start: int
    count: int

    def pack_u64(self) -> int:
        if not (0 <= self.start <= PAGE_RANGE_MAX_START and 0 <= self.count <= PAGE_RANGE_MAX_COUNT):
            raise ValueError(f"page range {self.start:#x}+{self.count:#x} does not fit 40+24 bits")
        return self.start | (self.count << PAGE_RANGE_START_BITS)

    @classmethod
    def from_u64(cls, value: int) -> PageRange:
        return cls(value & PAGE_RANGE_MAX_START, value >> PAGE_RANGE_START_BITS)


def _header(msg_type: int, size: int, trans_id: int) -> bytes:
    if size > _U16:
        raise ValueError(f"DM message of {size} bytes does not fit dm_header.size")
    return HEADER.pack(msg_type, size, trans_id & _U32)


def _pack_ranges(ranges: tuple[PageRange, ...]) -> bytes:
    return b"".join(_RANGE.pack(PageRange(*r).pack_u64()) for r in ranges)


def _unpack_ranges(body: bytes, offset: int, count: int) -> tuple[PageRange, ...]:
    return tuple(PageRange.from_u64(v) for (v,) in _RANGE.iter_unpack(body[offset:offset + count * DM_PAGE_RANGE_SIZE]))


# ------------------------------------------------------------------ messages, guest -> host
@dataclass(frozen=True)
class VersionRequest:
    """struct dm_version_request: the guest proposes a version, highest first."""

    trans_id: int
    version: int
    is_last_attempt: bool = False
    msg_type = DM_VERSION_REQUEST

    @property
    def major(self) -> int:
        return DYNMEM_MAJOR_VERSION(self.version)

    @property
    def minor(self) -> int:
        return DYNMEM_MINOR_VERSION(self.version)

    def pack(self) -> bytes:
        return (_header(DM_VERSION_REQUEST, DM_VERSION_REQUEST_SIZE, self.trans_id)
                + _VERSION_REQUEST.pack(self.version & _U32, int(bool(self.is_last_attempt))))


@dataclass(frozen=True)
class CapabilitiesReport:
    """struct dm_capabilities: what the guest can do. `hot_add_alignment` n means 2**n MiB."""

    trans_id: int
    balloon: bool
    hot_add: bool
    hot_add_alignment: int
    min_page_cnt: int = 0
    max_page_number: int = _U64
    caps: int | None = field(default=None, compare=False)  # the raw union dm_caps as received
    msg_type = DM_CAPABILITIES_REPORT

    @property
    def hot_add_alignment_bytes(self) -> int:
        return (1 << self.hot_add_alignment) << 20

    def caps_value(self) -> int:
        if self.caps is not None:
            return self.caps
        if not 0 <= self.hot_add_alignment <= CAPS_HOT_ADD_ALIGNMENT_MASK:
            raise ValueError(f"hot_add_alignment {self.hot_add_alignment} does not fit 4 bits")
        return ((CAPS_BALLOON if self.balloon else 0) | (CAPS_HOT_ADD if self.hot_add else 0)
                | (self.hot_add_alignment << CAPS_HOT_ADD_ALIGNMENT_SHIFT))

    def pack(self) -> bytes:
        return (_header(DM_CAPABILITIES_REPORT, DM_CAPABILITIES_SIZE, self.trans_id)
                + _CAPABILITIES.pack(self.caps_value() & _U64, self.min_page_cnt & _U64, self.max_page_number & _U64))


@dataclass(frozen=True)
class StatusReport:
    """struct dm_status: memory pressure, in 4 KiB pages; Linux sends it about once a second."""

    trans_id: int
    num_avail: int
    num_committed: int
    page_file_size: int = 0
    zero_free: int = 0
    page_file_writes: int = 0
    io_diff: int = 0
    msg_type = DM_STATUS_REPORT

    def pack(self) -> bytes:
        return (_header(DM_STATUS_REPORT, DM_STATUS_SIZE, self.trans_id)
                + _STATUS.pack(self.num_avail & _U64, self.num_committed & _U64, self.page_file_size & _U64,
                               self.zero_free & _U64, self.page_file_writes & _U32, self.io_diff & _U32))


@dataclass(frozen=True)
class BalloonResponse:
    """struct dm_balloon_response: pages the guest gave up; `more_pages` until the last one."""

    trans_id: int
    more_pages: bool
    ranges: tuple[PageRange, ...] = ()
    reservedz: int = 0
    msg_type = DM_BALLOON_RESPONSE

    def pack(self) -> bytes:
        size = DM_BALLOON_RESPONSE_SIZE + DM_PAGE_RANGE_SIZE * len(self.ranges)
        bits = int(bool(self.more_pages)) | (len(self.ranges) << 1)
        return (_header(DM_BALLOON_RESPONSE, size, self.trans_id) + _BALLOON_RESPONSE.pack(self.reservedz & _U32, bits & _U32)
                + _pack_ranges(self.ranges))


@dataclass(frozen=True)
class UnballoonResponse:
    """struct dm_unballoon_response: sent once, after the request with more_pages == 0."""

    trans_id: int
    msg_type = DM_UNBALLOON_RESPONSE

    def pack(self) -> bytes:
        return _header(DM_UNBALLOON_RESPONSE, DM_UNBALLOON_RESPONSE_SIZE, self.trans_id)


@dataclass(frozen=True)
class HotAddResponse:
    """struct dm_hot_add_response: `page_count` pages added; `result` 1 success, 0 failure."""

    trans_id: int
    page_count: int
    result: int
    msg_type = DM_MEM_HOT_ADD_RESPONSE

    def pack(self) -> bytes:
        return (_header(DM_MEM_HOT_ADD_RESPONSE, DM_HOT_ADD_RESPONSE_SIZE, self.trans_id)
                + _HOT_ADD_RESPONSE.pack(self.page_count & _U32, self.result & _U32))


# ------------------------------------------------------------------ messages, host -> guest
@dataclass(frozen=True)
class VersionResponse:
    """struct dm_version_response."""

    trans_id: int
    is_accepted: bool
    msg_type = DM_VERSION_RESPONSE

    def pack(self) -> bytes:
        return _header(DM_VERSION_RESPONSE, DM_VERSION_RESPONSE_SIZE, self.trans_id) + _IS_ACCEPTED.pack(int(bool(self.is_accepted)))


@dataclass(frozen=True)
class CapabilitiesResponse:
    """struct dm_capabilities_resp_msg (Linux reads only is_accepted)."""

    trans_id: int
    is_accepted: bool
    msg_type = DM_CAPABILITIES_RESPONSE

    def pack(self) -> bytes:
        return (_header(DM_CAPABILITIES_RESPONSE, DM_CAPABILITIES_RESPONSE_SIZE, self.trans_id)
                + _IS_ACCEPTED.pack(int(bool(self.is_accepted))))


@dataclass(frozen=True)
class BalloonRequest:
    """struct dm_balloon: ask the guest to give up `num_pages` pages."""

    trans_id: int
    num_pages: int
    reservedz: int = 0
    msg_type = DM_BALLOON_REQUEST

    def pack(self) -> bytes:
        if not 0 <= self.num_pages <= _U32:
            raise ValueError(f"num_pages {self.num_pages} does not fit u32")
        return _header(DM_BALLOON_REQUEST, DM_BALLOON_SIZE, self.trans_id) + _BALLOON.pack(self.num_pages, self.reservedz & _U32)


@dataclass(frozen=True)
class UnballoonRequest:
    """struct dm_unballoon_request: give ballooned pages back; `more_pages` until the last one."""

    trans_id: int
    more_pages: bool
    ranges: tuple[PageRange, ...] = ()
    msg_type = DM_UNBALLOON_REQUEST

    def pack(self) -> bytes:
        if len(self.ranges) > DM_MAX_RANGES_PER_MESSAGE:
            raise ValueError(f"{len(self.ranges)} ranges exceed the guest's {DM_MESSAGE_MAX_SIZE}-byte receive buffer")
        size = DM_UNBALLOON_REQUEST_SIZE + DM_PAGE_RANGE_SIZE * len(self.ranges)
        return (_header(DM_UNBALLOON_REQUEST, size, self.trans_id)
                + _UNBALLOON_REQUEST.pack(int(bool(self.more_pages)), len(self.ranges)) + _pack_ranges(self.ranges))


@dataclass(frozen=True)
class HotAddRequest:
    """struct dm_hot_add: add `range`. With `region` (a second dm_mem_page_range after it, a
    24-byte message) the host also names the hot-add region the guest should add first;
    Linux then sets host_specified_ha_region and creates a region [region.start,
    region.start + region.count) for this request. Without it (16 bytes) Linux derives the
    region from `range`, aligned to its memory-block size."""

    trans_id: int
    range: PageRange
    region: PageRange | None = None
    msg_type = DM_MEM_HOT_ADD_REQUEST

    def pack(self) -> bytes:
        size = DM_HOT_ADD_SIZE if self.region is None else DM_HOT_ADD_WITH_REGION_SIZE
        out = _header(DM_MEM_HOT_ADD_REQUEST, size, self.trans_id) + _RANGE.pack(PageRange(*self.range).pack_u64())
        if self.region is not None:
            out += _RANGE.pack(PageRange(*self.region).pack_u64())
        return out


@dataclass(frozen=True)
class InfoMessage:
    """struct dm_info_msg: `info` is a list of dm_info_header + data (WIN8 and later)."""

    trans_id: int
    info: bytes
    reserved: int = 0
    msg_type = DM_INFO_MESSAGE

    @classmethod
    def max_page_count(cls, trans_id: int, pages: int) -> InfoMessage:
        """INFO_TYPE_MAX_PAGE_CNT: the most pages the guest may ever have (boot + hot-add)."""
        return cls(trans_id, _INFO_HEADER.pack(INFO_TYPE_MAX_PAGE_CNT, 8) + struct.pack("<Q", pages & _U64))

    def items(self) -> list[tuple[int, bytes]]:
        """(dm_info_type, data) of each entry."""
        out, off = [], 0
        while off + _INFO_HEADER.size <= len(self.info):
            kind, size = _INFO_HEADER.unpack_from(self.info, off)
            off += _INFO_HEADER.size
            out.append((kind, self.info[off:off + size]))
            off += size
        return out

    def pack(self) -> bytes:
        size = DM_INFO_SIZE + len(self.info)
        return _header(DM_INFO_MESSAGE, size, self.trans_id) + _INFO.pack(self.reserved & _U32, len(self.info)) + self.info


@dataclass(frozen=True)
class ErrorMessage:
    """DM_ERROR: defined by the protocol, never sent by Linux; carries nothing we read."""

    trans_id: int
    msg_type = DM_ERROR

    def pack(self) -> bytes:
        return _header(DM_ERROR, DM_HEADER_SIZE, self.trans_id)


DmMessage = Union[VersionRequest, CapabilitiesReport, StatusReport, BalloonResponse, UnballoonResponse,
                  HotAddResponse, VersionResponse, CapabilitiesResponse, BalloonRequest, UnballoonRequest,
                  HotAddRequest, InfoMessage, ErrorMessage]

# The fixed size of each message type (header included): dm_header.size may not be smaller.
MIN_SIZES = {
    DM_ERROR: DM_HEADER_SIZE,
    DM_VERSION_REQUEST: DM_VERSION_REQUEST_SIZE,
    DM_VERSION_RESPONSE: DM_VERSION_RESPONSE_SIZE,
    DM_CAPABILITIES_REPORT: DM_CAPABILITIES_SIZE,
    DM_CAPABILITIES_RESPONSE: DM_CAPABILITIES_RESPONSE_SIZE,
    DM_STATUS_REPORT: DM_STATUS_SIZE,
    DM_BALLOON_REQUEST: DM_BALLOON_SIZE,
    DM_BALLOON_RESPONSE: DM_BALLOON_RESPONSE_SIZE,
    DM_UNBALLOON_REQUEST: DM_UNBALLOON_REQUEST_SIZE,
    DM_UNBALLOON_RESPONSE: DM_UNBALLOON_RESPONSE_SIZE,
    DM_MEM_HOT_ADD_REQUEST: DM_HOT_ADD_SIZE,
    DM_MEM_HOT_ADD_RESPONSE: DM_HOT_ADD_RESPONSE_SIZE,
    DM_INFO_MESSAGE: DM_INFO_SIZE,
}


def message_name(msg_type: int) -> str:
    return MESSAGE_NAMES.get(msg_type, f"DM_TYPE_{msg_type}")


def parse_header(payload: bytes) -> tuple[int, int, int]:
    """(type, size, trans_id), with size checked against the payload."""
    if len(payload) < DM_HEADER_SIZE:
        raise DmProtocolError("short-header", f"DM packet of {len(payload)} bytes has no dm_header")
    msg_type, size, trans_id = HEADER.unpack_from(payload)
    if size < DM_HEADER_SIZE or size > len(payload):
        raise DmProtocolError("bad-size", f"{message_name(msg_type)}: dm_header.size {size} does not fit "
                                          f"the {len(payload)}-byte packet")
    return msg_type, size, trans_id


def parse(payload: bytes) -> DmMessage:
    """Decode one DM message (either direction). Bytes past dm_header.size are ignored."""
    payload = bytes(payload)
    msg_type, size, trans_id = parse_header(payload)
    if msg_type not in MIN_SIZES:
        raise DmProtocolError("unknown-type", f"unknown DM message type {msg_type}")
    if size < MIN_SIZES[msg_type]:
        raise DmProtocolError("short-message", f"{message_name(msg_type)} of {size} bytes, "
                                               f"at least {MIN_SIZES[msg_type]} expected")
    body = payload[:size]
    off = DM_HEADER_SIZE
    if msg_type == DM_VERSION_REQUEST:
        version, bits = _VERSION_REQUEST.unpack_from(body, off)
        return VersionRequest(trans_id, version, bool(bits & 1))
    if msg_type == DM_VERSION_RESPONSE:
        (bits,) = _IS_ACCEPTED.unpack_from(body, off)
        return VersionResponse(trans_id, bool(bits & 1))
    if msg_type == DM_CAPABILITIES_REPORT:
        caps, min_pages, max_page = _CAPABILITIES.unpack_from(body, off)
        return CapabilitiesReport(trans_id, bool(caps & CAPS_BALLOON), bool(caps & CAPS_HOT_ADD),
                                  (caps >> CAPS_HOT_ADD_ALIGNMENT_SHIFT) & CAPS_HOT_ADD_ALIGNMENT_MASK,
                                  min_pages, max_page, caps)
    if msg_type == DM_CAPABILITIES_RESPONSE:
        (bits,) = _IS_ACCEPTED.unpack_from(body, off)
        return CapabilitiesResponse(trans_id, bool(bits & 1))
    if msg_type == DM_STATUS_REPORT:
        return StatusReport(trans_id, *_STATUS.unpack_from(body, off))
    if msg_type == DM_BALLOON_REQUEST:
        num_pages, reserved = _BALLOON.unpack_from(body, off)
        return BalloonRequest(trans_id, num_pages, reserved)
    if msg_type == DM_BALLOON_RESPONSE:
        reserved, bits = _BALLOON_RESPONSE.unpack_from(body, off)
        count = bits >> 1
        _check_ranges(msg_type, size, DM_BALLOON_RESPONSE_SIZE, count)
        return BalloonResponse(trans_id, bool(bits & 1), _unpack_ranges(body, DM_BALLOON_RESPONSE_SIZE, count), reserved)
    if msg_type == DM_UNBALLOON_REQUEST:
        bits, count = _UNBALLOON_REQUEST.unpack_from(body, off)
        _check_ranges(msg_type, size, DM_UNBALLOON_REQUEST_SIZE, count)
        return UnballoonRequest(trans_id, bool(bits & 1), _unpack_ranges(body, DM_UNBALLOON_REQUEST_SIZE, count))
    if msg_type == DM_UNBALLOON_RESPONSE:
        return UnballoonResponse(trans_id)
    if msg_type == DM_MEM_HOT_ADD_REQUEST:
        # As Linux: exactly 16 bytes is a plain request, anything longer carries the region.
        (rng,) = _RANGE.unpack_from(body, off)
        region = None
        if size != DM_HOT_ADD_SIZE:
            if size < DM_HOT_ADD_WITH_REGION_SIZE:
                raise DmProtocolError("short-message", f"DM_MEM_HOT_ADD_REQUEST of {size} bytes: a region needs "
                                                       f"{DM_HOT_ADD_WITH_REGION_SIZE}")
            region = PageRange.from_u64(_RANGE.unpack_from(body, DM_HOT_ADD_SIZE)[0])
        return HotAddRequest(trans_id, PageRange.from_u64(rng), region)
    if msg_type == DM_MEM_HOT_ADD_RESPONSE:
        page_count, result = _HOT_ADD_RESPONSE.unpack_from(body, off)
        return HotAddResponse(trans_id, page_count, result)
    if msg_type == DM_INFO_MESSAGE:
        reserved, info_size = _INFO.unpack_from(body, off)
        if DM_INFO_SIZE + info_size != size:
            raise DmProtocolError("bad-info", f"DM_INFO_MESSAGE info_size {info_size} does not match its {size} bytes")
        return InfoMessage(trans_id, body[DM_INFO_SIZE:], reserved)
    return ErrorMessage(trans_id)


def _check_ranges(msg_type: int, size: int, fixed: int, count: int) -> None:
    # Exact: Linux computes dm_header.size from range_count, so any difference is corruption.
    if fixed + count * DM_PAGE_RANGE_SIZE != size:
        raise DmProtocolError("bad-range-count", f"{message_name(msg_type)}: range_count {count} does not match "
                                                 f"dm_header.size {size} ({(size - fixed) // DM_PAGE_RANGE_SIZE} ranges fit)")
