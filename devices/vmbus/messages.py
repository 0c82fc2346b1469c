"""VMBus channel messages on the wire: decoding what the guest posts, encoding what the host
sends back. Layouts are Linux's packed structs in include/linux/hyperv.h (all little-endian);
every message starts with struct vmbus_channel_message_header {u32 msgtype; u32 padding;}.

A guest message shorter than its struct raises `MessageError` (reason "short-<type>"); bytes
after the struct are ignored, except in the two GPADL messages, whose tails are their data.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from devices.vmbus.constants import (
    CHANNELMSG_ALLOFFERS_DELIVERED,
    CHANNELMSG_CLOSECHANNEL,
    CHANNELMSG_GPADL_CREATED,
    CHANNELMSG_GPADL_HEADER,
    CHANNELMSG_GPADL_TEARDOWN,
    CHANNELMSG_GPADL_TORNDOWN,
    CHANNELMSG_MODIFYCHANNEL,
    CHANNELMSG_MODIFYCHANNEL_RESPONSE,
    CHANNELMSG_OFFERCHANNEL,
    CHANNELMSG_OPENCHANNEL,
    CHANNELMSG_OPENCHANNEL_RESULT,
    CHANNELMSG_RELID_RELEASED,
    CHANNELMSG_UNLOAD_RESPONSE,
    CHANNELMSG_VERSION_RESPONSE,
    MAX_USER_DEFINED_BYTES,
)


class MessageError(ValueError):
    """A malformed guest message; `reason` is a short key for counting."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


HEADER = struct.Struct("<II")                          # msgtype, padding
_INITIATE_CONTACT = struct.Struct("<IIQQQ")            # after the header
_OPEN_CHANNEL = struct.Struct(f"<IIIII{MAX_USER_DEFINED_BYTES}s")
_U32 = struct.Struct("<I")
_U32_U32 = struct.Struct("<II")
_GPADL_HEADER = struct.Struct("<IIHH")                 # child_relid, gpadl, range_buflen, rangecount
_GPADL_BODY = struct.Struct("<II")                     # msgnumber, gpadl

# struct vmbus_channel_offer_channel, after the header: vmbus_channel_offer (if_type, if_instance,
# reserved1, reserved2, chn_flags, mmio_megabytes, u.std.user_def[120], sub_channel_index,
# reserved3), then child_relid, monitorid, {monitor_allocated:1, reserved:7},
# {is_dedicated_interrupt:1, reserved1:15}, connection_id. GCC allocates bit fields from the
# least significant bit, so each flag is bit 0 of its byte / u16.
_OFFER_CHANNEL = struct.Struct(f"<16s16sQQHH{MAX_USER_DEFINED_BYTES}sHHIBBHI")

GPADL_HEADER_SIZE = HEADER.size + _GPADL_HEADER.size   # 20: the gpa_range data follows
GPADL_BODY_SIZE = HEADER.size + _GPADL_BODY.size       # 16: the pfns follow
INITIATE_CONTACT_SIZE = HEADER.size + _INITIATE_CONTACT.size     # 40
OPEN_CHANNEL_SIZE = HEADER.size + _OPEN_CHANNEL.size             # 148
OFFER_CHANNEL_SIZE = HEADER.size + _OFFER_CHANNEL.size           # 196


def message_type(payload: bytes) -> int:
    """The msgtype of a guest message (MessageError if shorter than the header)."""
    if len(payload) < HEADER.size:
        raise MessageError("short-header", f"{len(payload)} bytes")
    return HEADER.unpack_from(payload)[0]


# Messages about one channel whose body starts with its child_relid (u32).
_RELID_FIRST = frozenset({
    CHANNELMSG_OPENCHANNEL, CHANNELMSG_OPENCHANNEL_RESULT, CHANNELMSG_CLOSECHANNEL,
    CHANNELMSG_GPADL_HEADER, CHANNELMSG_GPADL_CREATED, CHANNELMSG_GPADL_TEARDOWN,
    CHANNELMSG_RELID_RELEASED, CHANNELMSG_MODIFYCHANNEL, CHANNELMSG_MODIFYCHANNEL_RESPONSE})
# In an offer, child_relid follows the vmbus_channel_offer part.
_OFFER_RELID_AT = HEADER.size + struct.calcsize(f"<16s16sQQHH{MAX_USER_DEFINED_BYTES}sHH")


def channel_relid(payload: bytes) -> int | None:
    """The channel a message is about (for traces), or None for bus-wide ones or a short message."""
    if len(payload) < HEADER.size:
        return None
    msgtype = HEADER.unpack_from(payload)[0]
    at = HEADER.size if msgtype in _RELID_FIRST else _OFFER_RELID_AT if msgtype == CHANNELMSG_OFFERCHANNEL else None
    if at is None or len(payload) < at + _U32.size:
        return None
    return _U32.unpack_from(payload, at)[0]


def _body(payload: bytes, size: int, name: str) -> memoryview:
    if len(payload) < HEADER.size + size:
        raise MessageError(f"short-{name}", f"{len(payload)} bytes, need {HEADER.size + size}")
    return memoryview(payload)[HEADER.size:]


# --- guest -> host ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class InitiateContact:
    version: int
    target_vcpu: int
    interrupt_page: int      # before 5.0; from 5.0 on the same bytes are msg_sint, msg_vtl
    monitor_page1: int
    monitor_page2: int

    @property
    def msg_sint(self) -> int:
        return self.interrupt_page & 0xFF

    @property
    def msg_vtl(self) -> int:
        return (self.interrupt_page >> 8) & 0xFF


def parse_initiate_contact(payload: bytes) -> InitiateContact:
    body = _body(payload, _INITIATE_CONTACT.size, "initiate-contact")
    return InitiateContact(*_INITIATE_CONTACT.unpack_from(body))


@dataclass(frozen=True)
class OpenChannel:
    child_relid: int
    openid: int
    ringbuffer_gpadlhandle: int
    target_vp: int
    downstream_ringbuffer_pageoffset: int
    userdata: bytes


def parse_open_channel(payload: bytes) -> OpenChannel:
    body = _body(payload, _OPEN_CHANNEL.size, "open-channel")
    return OpenChannel(*_OPEN_CHANNEL.unpack_from(body))


def parse_close_channel(payload: bytes) -> int:
    """child_relid of CHANNELMSG_CLOSECHANNEL."""
    return _U32.unpack_from(_body(payload, _U32.size, "close-channel"))[0]


def parse_relid_released(payload: bytes) -> int:
    """child_relid of CHANNELMSG_RELID_RELEASED."""
    return _U32.unpack_from(_body(payload, _U32.size, "relid-released"))[0]


@dataclass(frozen=True)
class GpadlHeader:
    child_relid: int
    gpadl: int
    range_buflen: int
    rangecount: int
    range_data: bytes        # the first bytes of the gpa_range array (ranges and their pfns)


def parse_gpadl_header(payload: bytes) -> GpadlHeader:
    body = _body(payload, _GPADL_HEADER.size, "gpadl-header")
    relid, gpadl, buflen, count = _GPADL_HEADER.unpack_from(body)
    return GpadlHeader(relid, gpadl, buflen, count, bytes(payload[GPADL_HEADER_SIZE:]))


@dataclass(frozen=True)
class GpadlBody:
    msgnumber: int
    gpadl: int
    pfn_data: bytes          # more of the gpa_range array


def parse_gpadl_body(payload: bytes) -> GpadlBody:
    body = _body(payload, _GPADL_BODY.size, "gpadl-body")
    msgnumber, gpadl = _GPADL_BODY.unpack_from(body)
    return GpadlBody(msgnumber, gpadl, bytes(payload[GPADL_BODY_SIZE:]))


def parse_gpadl_teardown(payload: bytes) -> tuple[int, int]:
    """(child_relid, gpadl) of CHANNELMSG_GPADL_TEARDOWN."""
    return _U32_U32.unpack_from(_body(payload, _U32_U32.size, "gpadl-teardown"))


def parse_modify_channel(payload: bytes) -> tuple[int, int]:
    """(child_relid, target_vp) of CHANNELMSG_MODIFYCHANNEL."""
    return _U32_U32.unpack_from(_body(payload, _U32_U32.size, "modify-channel"))


# --- host -> guest ---------------------------------------------------------------------------------

def _header(msgtype: int) -> bytes:
    return HEADER.pack(msgtype, 0)


def version_response(version_supported: bool, msg_conn_id: int = 0, connection_state: int = 0) -> bytes:
    """struct vmbus_channel_version_response (16 bytes)."""
    return _header(CHANNELMSG_VERSION_RESPONSE) + struct.pack(
        "<BBHI", 1 if version_supported else 0, connection_state, 0, msg_conn_id)


def offer_channel(*, if_type: uuid.UUID, if_instance: uuid.UUID, child_relid: int, connection_id: int,
                  chn_flags: int = 0, mmio_megabytes: int = 0, user_defined: bytes = b"",
                  sub_channel_index: int = 0, monitorid: int = 0, monitor_allocated: bool = False,
                  is_dedicated_interrupt: bool = True) -> bytes:
    """struct vmbus_channel_offer_channel (196 bytes). GUIDs go out in guid_t order, which is
    the mixed-endian `UUID.bytes_le` (GUID_INIT stores the first three fields little-endian)."""
    if len(user_defined) > MAX_USER_DEFINED_BYTES:
        raise ValueError(f"user-defined offer data is {len(user_defined)} bytes, max {MAX_USER_DEFINED_BYTES}")
    return _header(CHANNELMSG_OFFERCHANNEL) + _OFFER_CHANNEL.pack(
        if_type.bytes_le, if_instance.bytes_le, 0, 0, chn_flags, mmio_megabytes,
        user_defined.ljust(MAX_USER_DEFINED_BYTES, b"\0"), sub_channel_index, 0,
        child_relid, monitorid, 1 if monitor_allocated else 0,
        1 if is_dedicated_interrupt else 0, connection_id)


def alloffers_delivered() -> bytes:
    return _header(CHANNELMSG_ALLOFFERS_DELIVERED)


def gpadl_created(child_relid: int, gpadl: int, creation_status: int) -> bytes:
    """struct vmbus_channel_gpadl_created; creation_status 0 is success."""
    return _header(CHANNELMSG_GPADL_CREATED) + struct.pack("<III", child_relid, gpadl, creation_status)


def gpadl_torndown(gpadl: int) -> bytes:
    return _header(CHANNELMSG_GPADL_TORNDOWN) + _U32.pack(gpadl)


def open_result(child_relid: int, openid: int, status: int) -> bytes:
    """struct vmbus_channel_open_result; status 0 is success."""
    return _header(CHANNELMSG_OPENCHANNEL_RESULT) + struct.pack("<III", child_relid, openid, status)


def modifychannel_response(child_relid: int, status: int) -> bytes:
    return _header(CHANNELMSG_MODIFYCHANNEL_RESPONSE) + _U32_U32.pack(child_relid, status)


def unload_response() -> bytes:
    return _header(CHANNELMSG_UNLOAD_RESPONSE)
