"""A small AML (ACPI Machine Language) encoder.

Builds the byte stream of a DSDT body from composable objects, each with
``encode() -> bytes``.  Encodings follow the ACPI 6.x specification, section
20 ("ACPI Machine Language Specification"), and section 6.4 for the resource
descriptors that make up a ``_CRS`` buffer.  Only what pyvmm's DSDT needs is
here: names, integers, strings, buffers, packages, Name/Scope/Device/Method,
Return, EISAID, and the Memory32Fixed, QWordMemory, Extended Interrupt, IO
and End Tag resource descriptors.

Integers are encoded for a DSDT of revision 2 or later (64-bit integers), so
``Ones`` is 0xFFFF_FFFF_FFFF_FFFF.
"""

from __future__ import annotations

import re
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Union

# --- Opcodes and prefixes (ACPI 6.x, 20.3 "AML Byte Stream Byte Values") ---
ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
VAR_PACKAGE_OP = 0x13
METHOD_OP = 0x14
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # follows EXT_OP_PREFIX
ROOT_CHAR = 0x5C  # '\'
PARENT_PREFIX_CHAR = 0x5E  # '^'
NULL_NAME = 0x00
RETURN_OP = 0xA4
NOTIFY_OP = 0x86
ONES_OP = 0xFF

# --- PkgLength (20.2.4): 1 byte up to 63, else a lead byte plus 1-3 bytes ---
PKG_LENGTH_MAX = (1 << 28) - 1
# Largest value that fits in a PkgLength of 1, 2, 3 and 4 bytes.
_PKG_LENGTH_LIMITS = (0x3F, (1 << 12) - 1, (1 << 20) - 1, PKG_LENGTH_MAX)

# --- Integer widths ---
UINT64_MAX = (1 << 64) - 1
ONES_VALUE = UINT64_MAX  # Ones in a revision-2 (64-bit integer) table
_WIDTH_PREFIX = {1: BYTE_PREFIX, 2: WORD_PREFIX, 4: DWORD_PREFIX, 8: QWORD_PREFIX}
_WIDTH_FORMAT = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}

NAME_SEG_LEN = 4
MAX_PACKAGE_ELEMENTS = 255  # beyond this a VarPackage is needed
MAX_METHOD_ARGS = 7
MAX_SYNC_LEVEL = 15

_LEAD_NAME_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME_CHARS = _LEAD_NAME_CHARS | set("0123456789")
_EISA_ID_RE = re.compile(r"^[A-Z]{3}[0-9A-F]{4}$")

# --- Resource descriptors (6.4) ---
SMALL_IO_TAG = 0x47  # small item 0x08, length 7
SMALL_END_TAG = 0x79  # small item 0x0F, length 1
LARGE_MEMORY32_FIXED = 0x86
LARGE_EXTENDED_IRQ = 0x89
LARGE_QWORD_ADDRESS = 0x8A
MEMORY32_FIXED_BODY_LEN = 9
QWORD_ADDRESS_BODY_LEN = 43
IO_DECODE_16 = 0x01
MEM_READ_WRITE = 0x01
ADDRESS_SPACE_MEMORY = 0x00
# General flags of an address space descriptor.
ADDR_FLAG_CONSUMER = 0x01
ADDR_FLAG_SUBTRACTIVE_DECODE = 0x02
ADDR_FLAG_MIN_FIXED = 0x04
ADDR_FLAG_MAX_FIXED = 0x08
# _MEM field (bits 2:1) of a memory range's type-specific flags.
MEM_CACHEABILITY = {"noncacheable": 0, "cacheable": 1, "writecombining": 2, "prefetchable": 3}
# Extended Interrupt descriptor flags.
IRQ_FLAG_CONSUMER = 0x01
IRQ_FLAG_EDGE = 0x02
IRQ_FLAG_ACTIVE_LOW = 0x04
IRQ_FLAG_SHARED = 0x08
IRQ_FLAG_WAKE_CAPABLE = 0x10
MAX_EXTENDED_IRQS = 255


class AmlError(ValueError):
    """An object cannot be encoded as AML (bad name, out-of-range value, ...)."""


# ---------------------------------------------------------------------------
# PkgLength
# ---------------------------------------------------------------------------

def encode_pkg_length(value: int) -> bytes:
    """Encode ``value`` as a PkgLength field in the fewest bytes.

    ``value`` is the field's value as written, i.e. it already counts the
    PkgLength bytes themselves (use :func:`pkg_length_for` to wrap content).
    """
    if not 0 <= value <= PKG_LENGTH_MAX:
        raise AmlError(f"PkgLength {value} out of range 0..{PKG_LENGTH_MAX}")
    if value <= _PKG_LENGTH_LIMITS[0]:
        return bytes([value])
    for extra in (1, 2, 3):
        if value <= _PKG_LENGTH_LIMITS[extra]:
            break
    # Lead byte: bits 7-6 count the following bytes, bits 3-0 are the low
    # nibble; the following bytes carry the rest, least significant first.
    rest = value >> 4
    return bytes([(extra << 6) | (value & 0x0F)]) + rest.to_bytes(extra, "little")


def decode_pkg_length(data: bytes, offset: int = 0) -> tuple[int, int]:
    """Decode a PkgLength at ``data[offset]``; returns ``(value, bytes_used)``."""
    if offset >= len(data):
        raise AmlError("PkgLength past end of data")
    lead = data[offset]
    extra = lead >> 6
    if extra == 0:
        return lead & 0x3F, 1
    if lead & 0x30:
        raise AmlError(f"PkgLength lead byte {lead:#04x} has reserved bits 5-4 set")
    if offset + 1 + extra > len(data):
        raise AmlError("PkgLength truncated")
    rest = int.from_bytes(data[offset + 1:offset + 1 + extra], "little")
    return (lead & 0x0F) | (rest << 4), 1 + extra


def pkg_length_for(content_len: int) -> bytes:
    """The PkgLength that prefixes ``content_len`` bytes (it counts itself)."""
    if content_len < 0:
        raise AmlError("negative content length")
    for size, limit in enumerate(_PKG_LENGTH_LIMITS, start=1):
        if content_len + size <= limit:
            return encode_pkg_length(content_len + size)
    raise AmlError(f"object of {content_len} bytes is too large for a PkgLength")


# ---------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------

def name_seg(seg: str) -> bytes:
    """Encode one NameSeg; shorter names are padded with '_' as ASL does."""
    if not 1 <= len(seg) <= NAME_SEG_LEN:
        raise AmlError(f"name segment {seg!r} must be 1-4 characters")
    if seg[0] not in _LEAD_NAME_CHARS or any(c not in _NAME_CHARS for c in seg):
        raise AmlError(
            f"name segment {seg!r}: lead char must be A-Z or _, the rest A-Z, 0-9 or _")
    return seg.ljust(NAME_SEG_LEN, "_").encode("ascii")


def name_string(path: str) -> bytes:
    r"""Encode a NameString such as ``"_HID"``, ``"\_SB_.VR00"`` or ``"^^FOO"``.

    A leading backslash is the RootChar, each leading caret a ParentPrefixChar;
    segments are joined with '.'.  ``"\"`` alone is the root (RootChar +
    NullName).
    """
    if not isinstance(path, str):
        raise AmlError(f"name must be a str, not {type(path).__name__}")
    prefix = bytearray()
    rest = path
    if rest.startswith("\\"):
        prefix.append(ROOT_CHAR)
        rest = rest[1:]
    else:
        while rest.startswith("^"):
            prefix.append(PARENT_PREFIX_CHAR)
            rest = rest[1:]
    if rest == "":
        if not prefix:
            raise AmlError("empty name")
        return bytes(prefix) + bytes([NULL_NAME])
    segs = [name_seg(s) for s in rest.split(".")]
    if len(segs) == 1:
        body = segs[0]
    elif len(segs) == 2:
        body = bytes([DUAL_NAME_PREFIX]) + segs[0] + segs[1]
    elif len(segs) <= 255:
        body = bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)
    else:
        raise AmlError(f"name path {path!r} has more than 255 segments")
    return bytes(prefix) + body


# ---------------------------------------------------------------------------
# Objects
# ---------------------------------------------------------------------------

class AmlObject(ABC):
    """Anything that encodes to an AML byte sequence."""

    @abstractmethod
    def encode(self) -> bytes:
        """Return the AML encoding of this object."""

    def __bytes__(self) -> bytes:
        return self.encode()


# What callers may pass where an AML data object is expected: plain Python
# ints, strings, bytes and sequences are wrapped by :func:`to_aml`.
AmlLike = Union[AmlObject, int, str, bytes, Sequence["AmlLike"]]


def to_aml(value: AmlLike) -> AmlObject:
    """Wrap a Python value: int -> Integer, str -> String, bytes -> Buffer,
    list/tuple -> Package; AML objects pass through."""
    if isinstance(value, AmlObject):
        return value
    if isinstance(value, bool):
        raise AmlError("bool is ambiguous in AML; pass Integer(0/1) explicitly")
    if isinstance(value, int):
        return Integer(value)
    if isinstance(value, str):
        return String(value)
    if isinstance(value, (bytes, bytearray)):
        return Buffer(bytes(value))
    if isinstance(value, (list, tuple)):
        return Package(value)
    raise AmlError(f"cannot encode {type(value).__name__} as AML")


class Integer(AmlObject):
    """An integer constant.

    With ``width=None`` the shortest encoding is chosen: ZeroOp, OneOp, OnesOp
    (all 64 bits set), then Byte/Word/DWord/QWord prefix.  A ``width`` of 1, 2,
    4 or 8 forces that prefix (EISAID always uses a DWord, as iasl does).
    """

    def __init__(self, value: int, width: int | None = None) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise AmlError(f"integer value must be an int, not {type(value).__name__}")
        if not 0 <= value <= UINT64_MAX:
            raise AmlError(f"integer {value} out of range 0..2**64-1")
        if width is not None:
            if width not in _WIDTH_PREFIX:
                raise AmlError(f"integer width must be 1, 2, 4 or 8, not {width}")
            if value >= 1 << (8 * width):
                raise AmlError(f"integer {value:#x} does not fit in {width} byte(s)")
        self.value = value
        self.width = width

    def encode(self) -> bytes:
        width = self.width
        if width is None:
            if self.value == 0:
                return bytes([ZERO_OP])
            if self.value == 1:
                return bytes([ONE_OP])
            if self.value == ONES_VALUE:
                return bytes([ONES_OP])
            width = next(w for w in (1, 2, 4, 8) if self.value < 1 << (8 * w))
        return bytes([_WIDTH_PREFIX[width]]) + struct.pack(_WIDTH_FORMAT[width], self.value)


ZERO = Integer(0)
ONE = Integer(1)
ONES = Integer(ONES_VALUE)


def eisa_id(text: str) -> int:
    """Compress a 7-character EISA id such as ``"PNP0A06"`` to its 32-bit value.

    Three letters of 5 bits each ('A' = 1) and four hex digits; the bytes are
    laid out so that the little-endian dword reads vendor-high, vendor-low,
    product-high, product-low in memory (iasl's EISAID()).
    """
    if not isinstance(text, str) or not _EISA_ID_RE.match(text):
        raise AmlError(f"EISA id {text!r} must be 3 capital letters and 4 hex digits")
    vendor = 0
    for ch in text[:3]:
        vendor = (vendor << 5) | (ord(ch) - ord("@"))
    product = int(text[3:], 16)
    return int.from_bytes(vendor.to_bytes(2, "big") + product.to_bytes(2, "big"), "little")


def is_eisa_id(text: str) -> bool:
    """Whether ``text`` has the 7-character EISA id form (e.g. "PNP0501")."""
    return bool(_EISA_ID_RE.match(text))


class EisaId(Integer):
    """``EISAID("PNP0A06")``: the compressed id as a DWord integer."""

    def __init__(self, text: str) -> None:
        super().__init__(eisa_id(text), width=4)
        self.text = text


class String(AmlObject):
    """A string constant: StringPrefix, ASCII 0x01-0x7F, NUL."""

    def __init__(self, text: str) -> None:
        if not isinstance(text, str):
            raise AmlError(f"string must be a str, not {type(text).__name__}")
        if any(not 0x01 <= ord(c) <= 0x7F for c in text):
            raise AmlError(f"AML strings are ASCII 0x01-0x7F only: {text!r}")
        self.text = text

    def encode(self) -> bytes:
        return bytes([STRING_PREFIX]) + self.text.encode("ascii") + b"\x00"


class Buffer(AmlObject):
    """``Buffer(n) { bytes }`` with the size given as an integer constant."""

    def __init__(self, data: bytes) -> None:
        if not isinstance(data, (bytes, bytearray)):
            raise AmlError(f"buffer data must be bytes, not {type(data).__name__}")
        self.data = bytes(data)

    def encode(self) -> bytes:
        body = Integer(len(self.data)).encode() + self.data
        return bytes([BUFFER_OP]) + pkg_length_for(len(body)) + body


class Package(AmlObject):
    """``Package() { ... }``; more than 255 elements use VarPackageOp."""

    def __init__(self, elements: Iterable[AmlLike]) -> None:
        self.elements = [to_aml(e) for e in elements]

    def encode(self) -> bytes:
        items = b"".join(e.encode() for e in self.elements)
        count = len(self.elements)
        if count <= MAX_PACKAGE_ELEMENTS:
            op, num = PACKAGE_OP, bytes([count])
        else:
            op, num = VAR_PACKAGE_OP, Integer(count).encode()
        body = num + items
        return bytes([op]) + pkg_length_for(len(body)) + body


class Name(AmlObject):
    """``Name(NAME, value)`` (DefName)."""

    def __init__(self, name: str, value: AmlLike) -> None:
        self.name = name
        self.path = name_string(name)
        self.value = to_aml(value)

    def encode(self) -> bytes:
        return bytes([NAME_OP]) + self.path + self.value.encode()


class _Container(AmlObject):
    """An object holding a TermList: Scope, Device, Method."""

    def __init__(self, name: str, terms: Iterable[AmlObject] = ()) -> None:
        self.name = name
        self.path = name_string(name)
        self.terms: list[AmlObject] = list(terms)
        for term in self.terms:
            if not isinstance(term, AmlObject):
                raise AmlError(f"{type(self).__name__} {name}: terms must be AML objects, "
                               f"not {type(term).__name__}")

    def append(self, term: AmlObject) -> None:
        """Add one more term to the body."""
        if not isinstance(term, AmlObject):
            raise AmlError(f"terms must be AML objects, not {type(term).__name__}")
        self.terms.append(term)

    def _body(self) -> bytes:
        return b"".join(t.encode() for t in self.terms)


class Scope(_Container):
    """``Scope(NAME) { terms }`` (DefScope)."""

    def encode(self) -> bytes:
        body = self.path + self._body()
        return bytes([SCOPE_OP]) + pkg_length_for(len(body)) + body


class Device(_Container):
    """``Device(NAME) { terms }`` (DefDevice, an extended opcode)."""

    def encode(self) -> bytes:
        body = self.path + self._body()
        return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length_for(len(body)) + body


class Method(_Container):
    """``Method(NAME, args, Serialized?, sync) { terms }`` (DefMethod)."""

    def __init__(self, name: str, terms: Iterable[AmlObject] = (), args: int = 0,
                 serialized: bool = False, sync_level: int = 0) -> None:
        super().__init__(name, terms)
        if not 0 <= args <= MAX_METHOD_ARGS:
            raise AmlError(f"method {name}: argument count {args} not in 0..7")
        if not 0 <= sync_level <= MAX_SYNC_LEVEL:
            raise AmlError(f"method {name}: sync level {sync_level} not in 0..15")
        # MethodFlags: bits 2-0 ArgCount, bit 3 SerializeFlag, bits 7-4 SyncLevel.
        self.flags = args | (0x08 if serialized else 0) | (sync_level << 4)

    def encode(self) -> bytes:
        body = self.path + bytes([self.flags]) + self._body()
        return bytes([METHOD_OP]) + pkg_length_for(len(body)) + body


class Notify(AmlObject):
    """``Notify(\\PATH, value)`` (DefNotify): a device-specific event, e.g. 0x80 for a button press."""

    def __init__(self, target: str, value: int) -> None:
        self.target = name_string(target)
        self.value = to_aml(value)

    def encode(self) -> bytes:
        return bytes([NOTIFY_OP]) + self.target + self.value.encode()


class Return(AmlObject):
    """``Return(value)`` (DefReturn) with a constant operand."""

    def __init__(self, value: AmlLike) -> None:
        self.value = to_aml(value)

    def encode(self) -> bytes:
        return bytes([RETURN_OP]) + self.value.encode()


# ---------------------------------------------------------------------------
# Resource descriptors (for _CRS)
# ---------------------------------------------------------------------------

class ResourceDescriptor(ABC):
    """One descriptor inside a ResourceTemplate."""

    @abstractmethod
    def encode(self) -> bytes:
        """Return the descriptor's bytes (tag, length, body)."""


def _check_range(what: str, base: int, length: int, limit: int) -> None:
    if not isinstance(base, int) or not isinstance(length, int):
        raise AmlError(f"{what}: base and length must be ints")
    if base < 0 or length <= 0 or base + length > limit:
        raise AmlError(f"{what}: range {base:#x}+{length:#x} is empty or exceeds {limit:#x}")


class Memory32Fixed(ResourceDescriptor):
    """``Memory32Fixed(ReadWrite|ReadOnly, base, length)``."""

    def __init__(self, base: int, length: int, writable: bool = True) -> None:
        _check_range("Memory32Fixed", base, length, 1 << 32)
        self.base, self.length, self.writable = base, length, writable

    def encode(self) -> bytes:
        info = MEM_READ_WRITE if self.writable else 0
        return struct.pack("<BHBII", LARGE_MEMORY32_FIXED, MEMORY32_FIXED_BODY_LEN,
                           info, self.base, self.length)


class QWordMemory(ResourceDescriptor):
    """``QWordMemory(ResourceConsumer, PosDecode, MinFixed, MaxFixed, ...)``
    for a fixed window, e.g. one above 4 GiB."""

    def __init__(self, base: int, length: int, writable: bool = True,
                 cacheability: str = "noncacheable", consumer: bool = True) -> None:
        _check_range("QWordMemory", base, length, 1 << 64)
        if cacheability not in MEM_CACHEABILITY:
            raise AmlError(f"QWordMemory: cacheability must be one of {sorted(MEM_CACHEABILITY)}")
        self.base, self.length, self.writable = base, length, writable
        self.cacheability, self.consumer = cacheability, consumer

    def encode(self) -> bytes:
        general = ADDR_FLAG_MIN_FIXED | ADDR_FLAG_MAX_FIXED
        if self.consumer:
            general |= ADDR_FLAG_CONSUMER
        specific = (MEM_CACHEABILITY[self.cacheability] << 1) | (
            MEM_READ_WRITE if self.writable else 0)
        granularity = translation = 0
        return struct.pack("<BHBBBQQQQQ", LARGE_QWORD_ADDRESS, QWORD_ADDRESS_BODY_LEN,
                           ADDRESS_SPACE_MEMORY, general, specific, granularity,
                           self.base, self.base + self.length - 1, translation, self.length)


class ExtendedInterrupt(ResourceDescriptor):
    """``Interrupt(ResourceConsumer, Edge|Level, ActiveHigh|ActiveLow,
    Exclusive|Shared) { gsi, ... }``."""

    def __init__(self, irqs: Iterable[int], edge: bool = True, active_low: bool = False,
                 shared: bool = False, wake_capable: bool = False,
                 consumer: bool = True) -> None:
        self.irqs = list(irqs)
        if not 1 <= len(self.irqs) <= MAX_EXTENDED_IRQS:
            raise AmlError(f"Interrupt descriptor needs 1..255 interrupts, got {len(self.irqs)}")
        for irq in self.irqs:
            if not isinstance(irq, int) or not 0 <= irq <= 0xFFFFFFFF:
                raise AmlError(f"interrupt number {irq!r} out of range 0..2**32-1")
        self.flags = ((IRQ_FLAG_CONSUMER if consumer else 0)
                      | (IRQ_FLAG_EDGE if edge else 0)
                      | (IRQ_FLAG_ACTIVE_LOW if active_low else 0)
                      | (IRQ_FLAG_SHARED if shared else 0)
                      | (IRQ_FLAG_WAKE_CAPABLE if wake_capable else 0))

    def encode(self) -> bytes:
        body = struct.pack("<BB", self.flags, len(self.irqs)) + b"".join(
            struct.pack("<I", irq) for irq in self.irqs)
        return struct.pack("<BH", LARGE_EXTENDED_IRQ, len(body)) + body


class Io(ResourceDescriptor):
    """``IO(Decode16, min, max, alignment, length)``; by default a fixed port
    range (min == max)."""

    def __init__(self, port: int, length: int, max_port: int | None = None,
                 alignment: int = 1, decode16: bool = True) -> None:
        max_port = port if max_port is None else max_port
        if not (0 <= port <= max_port <= 0xFFFF):
            raise AmlError(f"IO: ports {port!r}..{max_port!r} out of range 0..0xffff")
        if not 0 < length <= 0xFF or max_port + length > 0x10000:
            raise AmlError(f"IO: length {length!r} must be 1..255 and stay below 0x10000")
        if not 0 <= alignment <= 0xFF:
            raise AmlError(f"IO: alignment {alignment!r} must be 0..255")
        self.port, self.max_port, self.length = port, max_port, length
        self.alignment, self.decode16 = alignment, decode16

    def encode(self) -> bytes:
        info = IO_DECODE_16 if self.decode16 else 0
        return struct.pack("<BBHHBB", SMALL_IO_TAG, info, self.port, self.max_port,
                           self.alignment, self.length)


class ResourceTemplate(AmlObject):
    """``ResourceTemplate() { descriptors }``: a Buffer ending in an End Tag.

    The End Tag's checksum byte makes all bytes of the template sum to zero
    (ACPI 6.x, 6.4.2.9); ``checksum=False`` writes 0, which the spec defines
    as "treat the checksum as valid" and which is what iasl emits.
    """

    def __init__(self, descriptors: Iterable[ResourceDescriptor], checksum: bool = True) -> None:
        self.descriptors = list(descriptors)
        for d in self.descriptors:
            if not isinstance(d, ResourceDescriptor):
                raise AmlError(f"not a resource descriptor: {type(d).__name__}")
        self.checksum = checksum

    def template_bytes(self) -> bytes:
        """The raw descriptor bytes, End Tag included (the Buffer's contents)."""
        body = b"".join(d.encode() for d in self.descriptors) + bytes([SMALL_END_TAG])
        check = (-sum(body)) & 0xFF if self.checksum else 0
        return body + bytes([check])

    def encode(self) -> bytes:
        return Buffer(self.template_bytes()).encode()
