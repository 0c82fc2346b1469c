"""GPADLs (guest physical address descriptor lists): assembling one from CHANNELMSG_GPADL_HEADER
and its CHANNELMSG_GPADL_BODY follow-ups, validating it, and the page list a ring uses.

On the wire (include/linux/hyperv.h) the header carries child_relid, the gpadl handle,
range_buflen (u16: bytes of range data in all messages together), rangecount, then the start
of an array of variable-length `struct gpa_range {u32 byte_count; u32 byte_offset; u64
pfn_array[];}`; each range has one pfn per page that [byte_offset, byte_offset + byte_count)
touches. Bodies (u32 msgnumber, u32 gpadl, u64 pfn[]) carry the rest of the array in order.
Linux (create_gpadl_header) sends one range, byte_offset 0, and leaves msgnumber 0, so
msgnumber is not checked; arrival order is the order.

Everything is untrusted: a `GpadlError` (with a `reason` key) is raised for range data that is
not a whole number of u64s, more data than range_buflen announced, a range count or length
that does not add up, an empty range, an offset past the first page, a pfn beyond a 52-bit
physical address, or more pages than `max_pages`.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass

from devices.vmbus.constants import HV_HYP_PAGE_SHIFT, HV_HYP_PAGE_SIZE

_GPA_RANGE = struct.Struct("<II")          # byte_count, byte_offset
GPA_RANGE_SIZE = _GPA_RANGE.size
PFN_SIZE = 8
MAX_PFN = (1 << (52 - HV_HYP_PAGE_SHIFT)) - 1   # x86-64's widest guest-physical address
MAX_RANGE_BUFLEN = 0xFFFF                  # range_buflen is a u16
assert array("Q").itemsize == PFN_SIZE     # pfn lists are kept as array('Q')


class GpadlError(ValueError):
    """A malformed GPADL; `reason` is a short key for counting."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class GpaRange:
    byte_count: int
    byte_offset: int
    pfns: array        # array('Q')


@dataclass
class Gpadl:
    """A complete GPADL. `in_use_by` is the relid of the open channel whose rings live in it."""

    handle: int
    child_relid: int
    ranges: tuple[GpaRange, ...]
    in_use_by: int | None = None

    @property
    def page_count(self) -> int:
        return sum(len(r.pfns) for r in self.ranges)

    def ring_pages(self) -> list[int] | None:
        """The pfns in order, if every range covers whole pages (what a ring buffer needs);
        None otherwise."""
        pages: list[int] = []
        for r in self.ranges:
            if r.byte_offset != 0 or r.byte_count != len(r.pfns) * HV_HYP_PAGE_SIZE:
                return None
            pages.extend(r.pfns)
        return pages


def pages_spanned(byte_offset: int, byte_count: int) -> int:
    """How many pages [byte_offset, byte_offset + byte_count) touches."""
    return (byte_offset + byte_count + HV_HYP_PAGE_SIZE - 1) >> HV_HYP_PAGE_SHIFT


def parse_ranges(data: bytes, rangecount: int, max_pages: int) -> tuple[GpaRange, ...]:
    """Split a complete range array into its ranges; the array must be used up exactly."""
    ranges = []
    pos = 0
    pages = 0
    for i in range(rangecount):
        if pos + GPA_RANGE_SIZE > len(data):
            raise GpadlError("gpadl-range-truncated", f"range {i} header at {pos} of {len(data)}")
        byte_count, byte_offset = _GPA_RANGE.unpack_from(data, pos)
        pos += GPA_RANGE_SIZE
        if byte_count == 0:
            raise GpadlError("gpadl-empty-range", f"range {i}")
        if byte_offset >= HV_HYP_PAGE_SIZE:
            raise GpadlError("gpadl-bad-offset", f"range {i} byte_offset {byte_offset:#x}")
        n = pages_spanned(byte_offset, byte_count)
        pages += n
        if pages > max_pages:
            raise GpadlError("gpadl-too-many-pages", f"more than {max_pages}")
        end = pos + n * PFN_SIZE
        if end > len(data):
            raise GpadlError("gpadl-range-truncated", f"range {i} needs {n} pfns")
        pfns = array("Q")
        pfns.frombytes(data[pos:end])
        if max(pfns) > MAX_PFN:
            raise GpadlError("gpadl-bad-pfn", f"range {i} pfn {max(pfns):#x}")
        ranges.append(GpaRange(byte_count, byte_offset, pfns))
        pos = end
    if pos != len(data):
        raise GpadlError("gpadl-length-mismatch", f"ranges use {pos} of {len(data)} bytes")
    return tuple(ranges)


class GpadlBuilder:
    """A GPADL whose header has arrived and whose bodies may still be coming."""

    def __init__(self, child_relid: int, handle: int, range_buflen: int, rangecount: int,
                 first_data: bytes, max_pages: int) -> None:
        self.child_relid = child_relid
        self.handle = handle
        self.rangecount = rangecount
        self.range_buflen = range_buflen
        self.max_pages = max_pages
        if rangecount == 0:
            raise GpadlError("gpadl-no-ranges")
        if range_buflen % PFN_SIZE:
            raise GpadlError("gpadl-bad-buflen", f"range_buflen {range_buflen} is not a multiple of 8")
        # each range has at least its 8-byte header and one pfn
        if range_buflen < rangecount * (GPA_RANGE_SIZE + PFN_SIZE):
            raise GpadlError("gpadl-bad-buflen", f"range_buflen {range_buflen} for {rangecount} ranges")
        if self.page_count > max_pages:
            raise GpadlError("gpadl-too-many-pages", f"range_buflen {range_buflen}")
        self._data = bytearray()
        self._append(first_data, "header")

    @property
    def page_count(self) -> int:
        """Pages the finished GPADL will have (range_buflen minus the range headers, in pfns)."""
        return (self.range_buflen - self.rangecount * GPA_RANGE_SIZE) // PFN_SIZE

    @property
    def complete(self) -> bool:
        return len(self._data) == self.range_buflen

    @property
    def received(self) -> int:
        return len(self._data)

    def _append(self, data: bytes, what: str) -> None:
        if len(data) % PFN_SIZE:
            raise GpadlError("gpadl-ragged-message", f"{what} carries {len(data)} bytes of range data")
        if len(self._data) + len(data) > self.range_buflen:
            raise GpadlError("gpadl-overflow",
                             f"{what} brings {len(self._data) + len(data)} of {self.range_buflen} bytes")
        self._data += data

    def add_body(self, pfn_data: bytes) -> None:
        """Append one GPADL_BODY's data; an empty body is refused (it cannot make progress)."""
        if not pfn_data:
            raise GpadlError("gpadl-empty-body")
        self._append(pfn_data, "body")

    def build(self) -> Gpadl:
        if not self.complete:
            raise GpadlError("gpadl-incomplete", f"{len(self._data)} of {self.range_buflen} bytes")
        ranges = parse_ranges(bytes(self._data), self.rangecount, self.max_pages)
        return Gpadl(self.handle, self.child_relid, ranges)
