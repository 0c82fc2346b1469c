"""Tests for firmware.aml against byte sequences worked out from the ACPI spec
(section 20 for AML, 6.4 for resource descriptors) and, where noted, bytes
that iasl itself emits for the same ASL."""

import struct

import pytest
from hypothesis import given, strategies as st

from firmware import aml
from firmware.aml import AmlError


# --- PkgLength -------------------------------------------------------------

@pytest.mark.parametrize("value, encoded", [
    (0, "00"),
    (1, "01"),
    (63, "3f"),            # largest one-byte form
    (64, "40 04"),         # smallest two-byte form: nibble 0, then 64 >> 4
    (0x123, "43 12"),
    (4095, "4f ff"),       # largest two-byte form
    (4096, "80 00 01"),    # smallest three-byte form
    (0xFFFFF, "8f ff ff"),
    (0x100000, "c0 00 00 01"),
    (0x0FFFFFFF, "cf ff ff ff"),
])
def test_pkg_length_known_encodings(value, encoded):
    assert aml.encode_pkg_length(value) == bytes.fromhex(encoded)
    assert aml.decode_pkg_length(bytes.fromhex(encoded)) == (value, len(bytes.fromhex(encoded)))


@pytest.mark.parametrize("value", [-1, 1 << 28])
def test_pkg_length_out_of_range(value):
    with pytest.raises(AmlError):
        aml.encode_pkg_length(value)


@pytest.mark.parametrize("content, encoded", [
    (0, "01"),
    (62, "3f"),            # 62 + 1 = 63 still fits one byte
    (63, "41 04"),         # 63 + 1 = 64 does not: two bytes, 63 + 2 = 65
    (4093, "4f ff"),       # 4093 + 2 = 4095
    (4094, "81 00 01"),    # 4094 + 2 = 4096 overflows: three bytes, 4097
    ((1 << 20) - 4, "8f ff ff"),
    ((1 << 20) - 3, "c1 00 00 01"),  # needs four bytes: (1 << 20) + 1
])
def test_pkg_length_for_counts_itself(content, encoded):
    assert aml.pkg_length_for(content) == bytes.fromhex(encoded)


def test_pkg_length_for_too_large():
    with pytest.raises(AmlError):
        aml.pkg_length_for((1 << 28) - 4)


def test_decode_pkg_length_rejects_reserved_bits_and_truncation():
    with pytest.raises(AmlError):
        aml.decode_pkg_length(bytes([0x50, 0x00]))  # bit 4 set in a multi-byte lead
    with pytest.raises(AmlError):
        aml.decode_pkg_length(bytes([0x80, 0x00]))  # says 2 more bytes, has 1
    with pytest.raises(AmlError):
        aml.decode_pkg_length(b"")
    assert aml.decode_pkg_length(bytes([0xAA, 0x41, 0x04]), offset=1) == (65, 2)


@given(st.integers(min_value=0, max_value=aml.PKG_LENGTH_MAX))
def test_pkg_length_round_trip_and_minimal(value):
    encoded = aml.encode_pkg_length(value)
    assert aml.decode_pkg_length(encoded + b"\xee") == (value, len(encoded))
    expected_len = 1 if value < 64 else 2 if value < 1 << 12 else 3 if value < 1 << 20 else 4
    assert len(encoded) == expected_len


@given(st.integers(min_value=0, max_value=aml.PKG_LENGTH_MAX - 4))
def test_pkg_length_for_round_trip(content):
    encoded = aml.pkg_length_for(content)
    value, used = aml.decode_pkg_length(encoded)
    assert used == len(encoded)
    assert value == content + used


# --- Names -----------------------------------------------------------------

@pytest.mark.parametrize("path, encoded", [
    ("_HID", b"_HID"),
    ("_SB", b"_SB_"),                                  # padded with '_'
    ("\\", b"\\\x00"),                                 # RootChar NullName
    ("\\_SB_", b"\\_SB_"),
    ("\\_SB_.VR00", b"\\\x2e_SB_VR00"),                # DualNamePrefix
    ("A.B.C", b"\x2f\x03A___B___C___"),                # MultiNamePrefix, count
    ("^^FOO", b"^^FOO_"),                              # ParentPrefixChar twice
    ("^", b"^\x00"),
    ("^_S5_.X", b"^\x2e_S5_X___"),
])
def test_name_string(path, encoded):
    assert aml.name_string(path) == encoded


@pytest.mark.parametrize("bad", ["", "TOOLONG", "0ABC", "ab", "A-B", "\\.X", "A..B", "\\^A"])
def test_name_string_rejects_bad_names(bad):
    with pytest.raises(AmlError):
        aml.name_string(bad)


# --- Integers, strings, EISAID ---------------------------------------------

@pytest.mark.parametrize("value, encoded", [
    (0, "00"),                                   # ZeroOp
    (1, "01"),                                   # OneOp
    (2, "0a 02"),                                # BytePrefix
    (0xFF, "0a ff"),
    (0x100, "0b 00 01"),                         # WordPrefix
    (0xFFFF, "0b ff ff"),
    (0x10000, "0c 00 00 01 00"),                 # DWordPrefix
    (0xFFFFFFFF, "0c ff ff ff ff"),
    (0x1_0000_0000, "0e 00 00 00 00 01 00 00 00"),  # QWordPrefix
    ((1 << 64) - 2, "0e fe ff ff ff ff ff ff ff"),
    ((1 << 64) - 1, "ff"),                       # OnesOp in a 64-bit DSDT
])
def test_integer_minimal_encoding(value, encoded):
    assert aml.Integer(value).encode() == bytes.fromhex(encoded)


def test_integer_forced_width():
    assert aml.Integer(1, width=4).encode() == bytes.fromhex("0c 01 00 00 00")
    assert aml.Integer(0, width=1).encode() == bytes.fromhex("0a 00")
    assert aml.Integer(5, width=8).encode() == bytes.fromhex("0e 05 00 00 00 00 00 00 00")


@pytest.mark.parametrize("args", [(-1,), (1 << 64,), (0x100, 1), (1, 3), (True,), ("1",)])
def test_integer_rejects(args):
    with pytest.raises(AmlError):
        aml.Integer(*args)


def _decode_integer(data: bytes) -> int:
    """Independent decoder for the integer forms (ACPI 20.2.3)."""
    op = data[0]
    fixed = {0x00: 0, 0x01: 1, 0xFF: (1 << 64) - 1}
    if op in fixed:
        assert len(data) == 1
        return fixed[op]
    size = {0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8}[op]
    assert len(data) == 1 + size
    return int.from_bytes(data[1:], "little")


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_integer_round_trip_minimal(value):
    encoded = aml.Integer(value).encode()
    assert _decode_integer(encoded) == value
    if value not in (0, 1, (1 << 64) - 1):
        # no narrower prefix could have held it
        payload = len(encoded) - 1
        assert payload == 1 or value >= 1 << (8 * (payload // 2))


def test_string():
    assert aml.String("LNRO0005").encode() == b"\x0dLNRO0005\x00"
    assert aml.String("").encode() == b"\x0d\x00"
    for bad in ("caf\u00e9", "a\x00b"):
        with pytest.raises(AmlError):
            aml.String(bad)


@pytest.mark.parametrize("text, value", [
    ("PNP0A06", 0x060AD041),   # EISAID("PNP0A06") as iasl compiles it
    ("PNP0A03", 0x030AD041),
    ("PNP0501", 0x0105D041),
    # worked by hand: A=1, C=3, P=16 -> (1<<10)|(3<<5)|16 = 0x0470; bytes 04 70 00 01
    ("ACP0001", 0x01007004),
])
def test_eisa_id(text, value):
    assert aml.eisa_id(text) == value
    assert aml.EisaId(text).encode() == b"\x0c" + struct.pack("<I", value)


def test_eisa_id_bytes_for_pnp0a06():
    assert aml.EisaId("PNP0A06").encode() == bytes.fromhex("0c 41 d0 0a 06")


@pytest.mark.parametrize("bad", ["pnp0a06", "PNP0A0", "PNP0A0G", "PNP0A066", "1NP0A06"])
def test_eisa_id_rejects(bad):
    assert not aml.is_eisa_id(bad)
    with pytest.raises(AmlError):
        aml.eisa_id(bad)


# --- Buffers, packages, named objects --------------------------------------

def test_buffer():
    # BufferOp PkgLength(6) BytePrefix 3, then the data
    assert aml.Buffer(b"\x01\x02\x03").encode() == bytes.fromhex("11 06 0a 03 01 02 03")


def test_buffer_with_two_byte_pkg_length():
    data = bytes(range(100))
    encoded = aml.Buffer(data).encode()
    value, used = aml.decode_pkg_length(encoded, 1)
    assert used == 2
    assert value == len(encoded) - 1  # PkgLength covers everything after the opcode
    assert encoded[1 + used:1 + used + 2] == bytes([0x0A, 100])
    assert encoded.endswith(data)


def test_package_s5_matches_iasl():
    # Name (_S5, Package (0x04) {0x05, Zero, Zero, Zero}) as iasl emits it
    encoded = aml.Name("_S5_", aml.Package([5, 0, 0, 0])).encode()
    assert encoded == bytes.fromhex("08 5f 53 35 5f 12 07 04 0a 05 00 00 00")


def test_package_nested_and_mixed():
    encoded = aml.Package([1, "A", [2]]).encode()
    # 12 len 03 | 01 | 0d 41 00 | then the nested Package {2}
    inner = bytes.fromhex("12 04 01 0a 02")
    body = bytes([3]) + b"\x01" + b"\x0dA\x00" + inner
    assert encoded == bytes([0x12, len(body) + 1]) + body


def test_var_package_for_more_than_255_elements():
    encoded = aml.Package([0] * 256).encode()
    assert encoded[0] == aml.VAR_PACKAGE_OP
    value, used = aml.decode_pkg_length(encoded, 1)
    assert value == len(encoded) - 1
    assert encoded[1 + used:1 + used + 3] == bytes.fromhex("0b 00 01")  # NumElements 256


def test_name_uid_zero():
    assert aml.Name("_UID", 0).encode() == bytes.fromhex("08 5f 55 49 44 00")


def test_method_returning_sta_matches_iasl():
    # Method (_STA, 0, NotSerialized) { Return (0x0F) }
    encoded = aml.Method("_STA", [aml.Return(0x0F)]).encode()
    assert encoded == bytes.fromhex("14 09 5f 53 54 41 00 a4 0a 0f")


def test_method_flags():
    method = aml.Method("FOO", [], args=2, serialized=True, sync_level=3)
    assert method.encode() == bytes.fromhex("14 06") + b"FOO_" + bytes([0x3A])
    for kwargs in ({"args": 8}, {"sync_level": 16}):
        with pytest.raises(AmlError):
            aml.Method("FOO", [], **kwargs)


def test_device_and_scope():
    assert aml.Device("VR00").encode() == bytes.fromhex("5b 82 05") + b"VR00"
    scope = aml.Scope("\\_SB_", [aml.Device("VR00")])
    assert scope.encode() == bytes.fromhex("10 0d 5c") + b"_SB_" + bytes.fromhex("5b 82 05") + b"VR00"


def test_device_pkg_length_covers_body_across_boundary():
    # Grow a device past 63 bytes of content and check the PkgLength is exact.
    for n in range(0, 12):
        dev = aml.Device("DEV0", [aml.Name("_HID", "X" * n * 3)])
        encoded = dev.encode()
        value, _ = aml.decode_pkg_length(encoded, 2)
        assert value == len(encoded) - 2


def test_terms_must_be_aml_objects():
    with pytest.raises(AmlError):
        aml.Device("DEV0", [b"\x00"])
    with pytest.raises(AmlError):
        aml.to_aml(True)
    with pytest.raises(AmlError):
        aml.to_aml(1.5)


# --- Resource descriptors --------------------------------------------------

def test_memory32_fixed():
    assert aml.Memory32Fixed(0xD0000000, 0x1000).encode() == bytes.fromhex(
        "86 09 00 01 00 00 00 d0 00 10 00 00")
    assert aml.Memory32Fixed(0x1000, 0x10, writable=False).encode()[3] == 0


def test_memory32_fixed_rejects_above_4g_and_empty():
    with pytest.raises(AmlError):
        aml.Memory32Fixed(0xFFFFF000, 0x2000)
    with pytest.raises(AmlError):
        aml.Memory32Fixed(0x1000, 0)


def test_qword_memory():
    encoded = aml.QWordMemory(0x5_0000_0000, 0x20_0000).encode()
    assert encoded[:6] == bytes.fromhex("8a 2b 00 00 0d 01")  # memory, consumer+MIF+MAF, RW
    gran, lo, hi, tra, length = struct.unpack("<5Q", encoded[6:])
    assert (gran, lo, hi, tra, length) == (0, 0x5_0000_0000, 0x5_001F_FFFF, 0, 0x20_0000)
    assert len(encoded) == 3 + 43
    assert aml.QWordMemory(0, 0x1000, cacheability="prefetchable").encode()[5] == 0x07
    with pytest.raises(AmlError):
        aml.QWordMemory(0, 0x1000, cacheability="fast")


def test_extended_interrupt():
    # Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) {5}
    assert aml.ExtendedInterrupt([5]).encode() == bytes.fromhex("89 06 00 03 01 05 00 00 00")
    # Level, ActiveLow, Shared -> consumer | active-low | shared
    level = aml.ExtendedInterrupt([5, 6], edge=False, active_low=True, shared=True).encode()
    assert level == bytes.fromhex("89 0a 00 0d 02 05 00 00 00 06 00 00 00")
    with pytest.raises(AmlError):
        aml.ExtendedInterrupt([])
    with pytest.raises(AmlError):
        aml.ExtendedInterrupt([1 << 32])


def test_io_descriptor():
    # IO (Decode16, 0x03F8, 0x03F8, 0x01, 0x08)
    assert aml.Io(0x3F8, 8).encode() == bytes.fromhex("47 01 f8 03 f8 03 01 08")
    with pytest.raises(AmlError):
        aml.Io(0xFFFF, 8)
    with pytest.raises(AmlError):
        aml.Io(0x3F8, 0)


def test_resource_template_matches_iasl_without_checksum():
    # iasl writes 0 in the End Tag checksum; these are its bytes for
    # ResourceTemplate () { Memory32Fixed (ReadWrite, 0xD0000000, 0x1000)
    #                       Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) {5} }
    template = aml.ResourceTemplate([aml.Memory32Fixed(0xD0000000, 0x1000),
                                     aml.ExtendedInterrupt([5])], checksum=False)
    assert template.encode() == bytes.fromhex(
        "11 1a 0a 17 86 09 00 01 00 00 00 d0 00 10 00 00 89 06 00 03 01 05 00 00 00 79 00")


def test_resource_template_checksum():
    template = aml.ResourceTemplate([aml.Memory32Fixed(0xD0000000, 0x1000),
                                     aml.ExtendedInterrupt([5])])
    raw = template.template_bytes()
    assert raw[-2] == aml.SMALL_END_TAG
    assert sum(raw) % 256 == 0
    assert raw[-1] == 0x7F  # 0x100 - (sum of the other bytes mod 256)
    with pytest.raises(AmlError):
        aml.ResourceTemplate([b"\x79\x00"])


@given(st.lists(st.tuples(st.integers(0, 0xFFFF_F000), st.integers(1, 0x1000)), max_size=8),
       st.lists(st.integers(0, 0xFFFF_FFFF), min_size=1, max_size=4))
def test_resource_template_always_sums_to_zero(windows, irqs):
    descs = [aml.Memory32Fixed(b, s) for b, s in windows] + [aml.ExtendedInterrupt(irqs)]
    raw = aml.ResourceTemplate(descs).template_bytes()
    assert sum(raw) % 256 == 0
    encoded = aml.ResourceTemplate(descs).encode()
    value, used = aml.decode_pkg_length(encoded, 1)
    assert value == len(encoded) - 1
    assert encoded.endswith(raw)
