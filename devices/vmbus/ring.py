"""VMBus ring buffers, host side, in guest memory described by a GPADL's pages.

A ring is N >= 2 pages: the first holds struct hv_ring_buffer (include/linux/hyperv.h):

    u32 write_index; u32 read_index;     byte offsets into the data area
    u32 interrupt_mask;                  set by the reader: "don't signal me, I am draining"
    u32 pending_send_sz;                 set by a blocked writer: "signal me when this fits"
    u32 reserved1[12];
    u32 feature_bits;                    bit 0 feat_pending_send_sz
    ...                                  (padding to the page)

and the other N-1 pages are the data area, in GPADL order (they need not be contiguous in
guest-physical memory), used circularly. A ring is full when only one packet-sized gap would
be left, so read_index == write_index always means empty (hv_ringbuffer_write).

`RingReader` is the guest's outbound ring, which the host consumes; `RingWriter` is the
guest's inbound ring, which the host fills. Each keeps the index it owns privately and only
publishes it, so a guest scribbling over the host's index cannot steer the host. The indices
the guest owns are checked (in range, 8-byte aligned) on every read. Problems raise or
return `RingError` (a `reason` key for counting); guest memory that is not backed raises
vmm.memory.GuestMemoryError, which callers treat the same way.

Signalling follows drivers/hv/ring_buffer.c, seen from the other side:
* host writes (hv_signal_on_write): signal the guest only if the ring was empty before this
  packet and the guest has not set interrupt_mask on its inbound ring;
* host reads (hv_pkt_iter_close): if the guest set feat_pending_send_sz and pending_send_sz
  on its outbound ring, signal it when the free space goes from <= pending_send_sz to more;
* while draining the host sets interrupt_mask on the guest's outbound ring, clears it when
  done and looks again, so a packet written meanwhile (without a signal) is not missed;
* a host write that does not fit sets pending_send_sz on the inbound ring, so the guest
  signals when it has made room (the host also sets feat_pending_send_sz there).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from devices.hyperv.interfaces import GuestMemoryAccess
from devices.vmbus.constants import (
    HV_HYP_PAGE_SHIFT,
    HV_HYP_PAGE_SIZE,
    RING_FEAT_PENDING_SEND_SZ,
    RING_FEATURE_BITS_OFFSET,
    RING_INTERRUPT_MASK_OFFSET,
    RING_PENDING_SEND_SZ_OFFSET,
    RING_READ_INDEX_OFFSET,
    RING_WRITE_INDEX_OFFSET,
    VMBUS_PKT_TRAILER,
)
from devices.vmbus.packets import DESCRIPTOR_SIZE, Packet, decode_descriptor
from vmm.memory import GuestMemoryError

_U32 = struct.Struct("<I")
MIN_RING_PAGES = 2


class RingError(Exception):
    """A ring the guest corrupted; `reason` is a short key for counting."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class _Ring:
    def __init__(self, mem: GuestMemoryAccess, pages: Sequence[int]) -> None:
        if len(pages) < MIN_RING_PAGES:
            raise RingError("ring-too-small", f"{len(pages)} pages")
        self._mem = mem
        self._header_gpa = pages[0] << HV_HYP_PAGE_SHIFT
        self._data_pages = [p << HV_HYP_PAGE_SHIFT for p in pages[1:]]
        self.data_size = len(self._data_pages) * HV_HYP_PAGE_SIZE

    # -- the header page
    def _get(self, offset: int) -> int:
        return _U32.unpack(self._mem.read(self._header_gpa + offset, 4))[0]

    def _put(self, offset: int, value: int) -> None:
        self._mem.write(self._header_gpa + offset, _U32.pack(value))

    def _guest_index(self, offset: int, name: str) -> int:
        value = self._get(offset)
        if value >= self.data_size or value % 8:
            raise RingError(f"ring-bad-{name}", f"{value:#x} (data area {self.data_size:#x})")
        return value

    # -- the data area
    def _spans(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        """(gpa, length) pieces of `length` bytes from data offset `offset`, wrapping once."""
        while length:
            page, in_page = divmod(offset, HV_HYP_PAGE_SIZE)
            n = min(length, HV_HYP_PAGE_SIZE - in_page)
            yield self._data_pages[page] + in_page, n
            offset = (offset + n) % self.data_size
            length -= n

    def _read(self, offset: int, length: int) -> bytes:
        return b"".join(self._mem.read(gpa, n) for gpa, n in self._spans(offset, length))

    def _write(self, offset: int, data: bytes) -> None:
        pos = 0
        for gpa, n in self._spans(offset, len(data)):
            self._mem.write(gpa, data[pos:pos + n])
            pos += n

    def free_bytes(self, write_index: int, read_index: int) -> int:
        """Bytes a writer may use (hv_get_bytes_to_write): the whole area when empty."""
        return self.data_size - (write_index - read_index) % self.data_size


@dataclass
class DrainResult:
    packets: list[Packet] = field(default_factory=list)
    bytes_read: int = 0
    signal_guest: bool = False     # the guest is waiting for room and now has it
    more: bool = False             # the guest wrote while we drained: drain again
    error: RingError | None = None


class RingReader(_Ring):
    """The guest's outbound ring: the guest writes packets, the host reads them."""

    def __init__(self, mem: GuestMemoryAccess, pages: Sequence[int]) -> None:
        super().__init__(mem, pages)
        self.read_index = self._guest_index(RING_READ_INDEX_OFFSET, "read-index")
        self._put(RING_INTERRUPT_MASK_OFFSET, 0)

    def drain(self) -> DrainResult:
        """Read every complete packet up to the guest's write index, publish the new read
        index, and say whether to signal the guest. A bad packet stops the drain with
        `error` set; the packets before it are returned and consumed."""
        result = DrainResult()
        try:
            self._put(RING_INTERRUPT_MASK_OFFSET, 1)
            write = self._guest_index(RING_WRITE_INDEX_OFFSET, "write-index")
            while self.read_index != write:
                packet, size = self._read_packet(write)
                result.packets.append(packet)
                result.bytes_read += size
                self.read_index = (self.read_index + size) % self.data_size
            self._put(RING_READ_INDEX_OFFSET, self.read_index)
            self._put(RING_INTERRUPT_MASK_OFFSET, 0)
            result.more = self._get(RING_WRITE_INDEX_OFFSET) != self.read_index
            result.signal_guest = result.bytes_read > 0 and self._writer_unblocked(result.bytes_read)
        except RingError as e:
            result.error = e
        except GuestMemoryError as e:
            result.error = RingError("ring-guest-memory", str(e))
        if result.error is not None and result.bytes_read:
            try:        # the good packets before the bad one are consumed
                self._put(RING_READ_INDEX_OFFSET, self.read_index)
            except GuestMemoryError:
                pass
        return result

    def _read_packet(self, write: int) -> tuple[Packet, int]:
        avail = (write - self.read_index) % self.data_size
        if avail < DESCRIPTOR_SIZE + VMBUS_PKT_TRAILER:
            raise RingError("ring-truncated-packet", f"{avail} bytes before the write index")
        desc = decode_descriptor(self._read(self.read_index, DESCRIPTOR_SIZE))
        length, offset = desc.packet_len, desc.data_offset
        if length < DESCRIPTOR_SIZE or offset < DESCRIPTOR_SIZE or offset > length:
            raise RingError("ring-bad-packet-header", f"offset8 {desc.offset8} len8 {desc.len8}")
        if length + VMBUS_PKT_TRAILER > avail:
            raise RingError("ring-packet-overrun", f"packet of {length} bytes, {avail} available")
        payload = self._read((self.read_index + offset) % self.data_size, length - offset)
        return Packet(desc.type, desc.flags, desc.trans_id, payload), length + VMBUS_PKT_TRAILER

    def _writer_unblocked(self, bytes_read: int) -> bool:
        """hv_pkt_iter_close's test: did this read take the free space across pending_send_sz?"""
        if not self._get(RING_FEATURE_BITS_OFFSET) & RING_FEAT_PENDING_SEND_SZ:
            return False
        pending = self._get(RING_PENDING_SEND_SZ_OFFSET)
        if not pending:
            return False
        write = self._get(RING_WRITE_INDEX_OFFSET)
        if write >= self.data_size:
            return False
        free = self.free_bytes(write, self.read_index)
        if free - bytes_read > pending:      # there was enough room before: nobody waits
            return False
        return free > pending


@dataclass(frozen=True)
class WriteResult:
    written: bool
    signal_guest: bool = False


class RingWriter(_Ring):
    """The guest's inbound ring: the host writes packets, the guest reads them."""

    def __init__(self, mem: GuestMemoryAccess, pages: Sequence[int]) -> None:
        super().__init__(mem, pages)
        self.write_index = self._guest_index(RING_WRITE_INDEX_OFFSET, "write-index")
        self.pending = 0            # the pending_send_sz we published, 0 if not waiting
        features = self._get(RING_FEATURE_BITS_OFFSET)
        self._put(RING_FEATURE_BITS_OFFSET, features | RING_FEAT_PENDING_SEND_SZ)

    def free(self) -> int:
        return self.free_bytes(self.write_index, self._guest_index(RING_READ_INDEX_OFFSET, "read-index"))

    def write(self, packet: bytes) -> WriteResult:
        """Append one framed packet and its trailer if they fit, never overwriting unread
        data. When they do not, publish pending_send_sz and return written=False."""
        total = len(packet) + VMBUS_PKT_TRAILER
        if self.free() <= total:
            self.pending = total
            self._put(RING_PENDING_SEND_SZ_OFFSET, total)
            # the guest may have made room before it could see pending_send_sz: look again
            if self.free() <= total:
                return WriteResult(False)
        old = self.write_index
        self._write(old, packet)
        self._write((old + len(packet)) % self.data_size, (old << 32).to_bytes(8, "little"))
        self.write_index = (old + total) % self.data_size
        self._put(RING_WRITE_INDEX_OFFSET, self.write_index)
        if self.pending:
            self.pending = 0
            self._put(RING_PENDING_SEND_SZ_OFFSET, 0)
        if self._get(RING_INTERRUPT_MASK_OFFSET):
            return WriteResult(True, False)
        # signal only on the empty -> non-empty transition (hv_signal_on_write)
        return WriteResult(True, self._get(RING_READ_INDEX_OFFSET) == old)

    def room_for_pending(self) -> bool:
        """True if the host is waiting for room and the guest has made enough; the wait is
        then over (pending_send_sz is cleared)."""
        if not self.pending or self.free() <= self.pending:
            return False
        self.pending = 0
        self._put(RING_PENDING_SEND_SZ_OFFSET, 0)
        return True
