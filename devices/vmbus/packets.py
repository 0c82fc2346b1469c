"""VMBus packet framing inside a ring: struct vmpacket_descriptor and its payload.

    struct vmpacket_descriptor { u16 type; u16 offset8; u16 len8; u16 flags; u64 trans_id; }

offset8 and len8 count 8-byte units from the start of the descriptor: the payload is bytes
[offset8*8, len8*8), padded to 8 bytes, so a receiver sees the padded length (Linux's
hv_pkt_datalen does the same). In the ring every packet is followed by the 8-byte trailer
(VMBUS_PKT_TRAILER), which the writer fills with its old write index in the upper 32 bits.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from devices.vmbus.constants import VM_PKT_DATA_INBAND, VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED

VMPACKET_DESCRIPTOR = struct.Struct("<HHHHQ")
DESCRIPTOR_SIZE = VMPACKET_DESCRIPTOR.size        # 16
MAX_PACKET_LEN = 0xFFFF * 8                       # len8 is a u16
MAX_INBAND_PAYLOAD = MAX_PACKET_LEN - DESCRIPTOR_SIZE


@dataclass(frozen=True)
class Descriptor:
    type: int
    offset8: int
    len8: int
    flags: int
    trans_id: int

    @property
    def packet_len(self) -> int:
        return self.len8 * 8

    @property
    def data_offset(self) -> int:
        return self.offset8 * 8


@dataclass(frozen=True)
class Packet:
    """A packet the host read from the guest: its descriptor fields and payload bytes."""

    type: int
    flags: int
    trans_id: int
    payload: bytes

    @property
    def completion_requested(self) -> bool:
        return bool(self.flags & VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED)


def decode_descriptor(raw: bytes) -> Descriptor:
    return Descriptor(*VMPACKET_DESCRIPTOR.unpack_from(raw))


def padded_len(n: int) -> int:
    return (n + 7) & ~7


def encode_packet(pkt_type: int, payload: bytes, trans_id: int = 0, flags: int = 0) -> bytes:
    """A descriptor (offset8 = 2, right after it) and the payload padded to 8 bytes."""
    total = DESCRIPTOR_SIZE + padded_len(len(payload))
    if total > MAX_PACKET_LEN:
        raise ValueError(f"payload of {len(payload)} bytes does not fit a VMBus packet")
    if not 0 <= trans_id < 1 << 64:
        raise ValueError(f"trans_id {trans_id} is not a u64")
    header = VMPACKET_DESCRIPTOR.pack(pkt_type, DESCRIPTOR_SIZE // 8, total // 8, flags, trans_id)
    return header + payload + bytes(total - DESCRIPTOR_SIZE - len(payload))


def encode_inband(payload: bytes, trans_id: int = 0, completion_requested: bool = False) -> bytes:
    flags = VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED if completion_requested else 0
    return encode_packet(VM_PKT_DATA_INBAND, payload, trans_id, flags)
