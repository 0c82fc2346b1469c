"""Tests for the boot path without KVM: kernel loading, the zero page, the boot CPU state.

Guest memory is a bytearray behind a writer that refuses writes outside it, the ELF and
bzImage files are built here byte by byte, and every offset a test checks is taken from
the kernel's own documentation (bootparam.h, Documentation/arch/x86/boot.rst, the SDM),
written out as literals so the tests do not just repeat the module's constants.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import stubkernel
from vmm.boot import cpu_setup
from vmm.boot.bootparams import E820Entry, build_boot_params, initrd_max_addr
from vmm.boot.kernel import KernelImageError, LoadedKernel, load_kernel
from vmm.kvm_abi import ffi

MiB, GiB = 1 << 20, 1 << 30
RAM = 64 * MiB
EM_386, EM_AARCH64 = 3, 183
ELFCLASS32 = 1


class Ram:
    """A bytearray with the loader's writer signature; writes outside it fail loudly."""

    def __init__(self, size: int = RAM, fill: int = 0xAA) -> None:
        self.mem = bytearray([fill]) * size
        self.writes: list[tuple[int, int]] = []

    def write(self, gpa: int, data: bytes) -> None:
        if gpa < 0 or gpa + len(data) > len(self.mem):
            raise AssertionError(f"loader wrote outside RAM: {gpa:#x}+{len(data):#x}")
        self.mem[gpa:gpa + len(data)] = data
        self.writes.append((gpa, len(data)))

    def __getitem__(self, key):
        return self.mem[key]


def _load(path: Path, ram: Ram | None = None, limit: int | None = None) -> LoadedKernel:
    ram = ram or Ram()
    return load_kernel(path, ram.write, len(ram.mem) if limit is None else limit)


def _assert_rejected(path: Path, ram: Ram | None = None, limit: int | None = None) -> str:
    with pytest.raises(KernelImageError) as info:
        _load(path, ram, limit)
    msg = str(info.value)
    assert "\n" not in msg, f"message is not one line: {msg!r}"
    assert str(path) in msg, f"message does not name the file: {msg!r}"
    return msg


# ------------------------------------------------------------------------------ ELF vmlinux


def test_elf_segments_land_at_paddr_and_bss_is_zeroed(tmp_path: Path) -> None:
    text = bytes(range(1, 256)) * 20  # 5100 bytes, no zero byte
    data = b"\x5a" * 300
    seg1 = (0x1000000, text, len(text))                # no bss
    seg2 = (0x1200000, data, len(data) + 0x3000)       # 12 KiB of bss behind the data
    path = tmp_path / "vmlinux"
    path.write_bytes(stubkernel.elf64([seg1, seg2], entry=0x1000010))
    ram = Ram()  # filled with 0xAA: bss must be written as zeros, not assumed zero
    k = _load(path, ram)
    assert ram[0x1000000:0x1000000 + len(text)] == text
    assert ram[0x1200000:0x1200000 + len(data)] == data
    assert ram[0x1200000 + len(data):0x1200000 + len(data) + 0x3000] == bytes(0x3000)
    # nothing written past the bss, nor between the segments
    assert ram[0x1200000 + len(data) + 0x3000] == 0xAA
    assert ram[0x1000000 + len(text)] == 0xAA
    assert (k.kind, k.entry, k.start, k.end, k.setup_header) == (
        "vmlinux", 0x1000010, 0x1000000, 0x1200000 + len(data) + 0x3000, None)


def test_stub_kernel_loads_with_entry_at_load_address(tmp_path: Path) -> None:
    code = stubkernel.print_code(b"hi") + stubkernel.poweroff_code()
    path = stubkernel.write_stub(tmp_path / "stub", code)
    ram = Ram()
    k = _load(path, ram)
    assert k.entry == stubkernel.LOAD_ADDR == 0x1000000
    assert ram[k.entry:k.entry + len(code)] == code


def test_elf_entry_outside_the_image_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "virtual-entry"
    # A kernel whose entry is a virtual address: entering there would fault at once.
    path.write_bytes(stubkernel.elf64([(0x1000000, b"\x90" * 16, 16)], entry=0xFFFFFFFF81000000))
    assert "entry" in _assert_rejected(path)


def test_elf_entry_at_the_end_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "entry-at-end"
    path.write_bytes(stubkernel.elf64([(0x1000000, b"\x90" * 16, 0x100)], entry=0x1000100))
    _assert_rejected(path)


def test_garbage_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "garbage"
    path.write_bytes(bytes(range(256)) * 64)
    assert "not an x86-64 Linux kernel" in _assert_rejected(path)


def test_text_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("this is not a kernel\n" * 100)
    _assert_rejected(path)


def test_32bit_elf_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "elf32"
    # A genuine ELF32 i386 header (52 bytes) with one program header.
    ehdr = struct.pack("<4sBBBBB7xHHIIIIIHHHHHH", b"\x7fELF", ELFCLASS32, 1, 1, 0, 0,
                       2, EM_386, 1, 0x100000, 52, 0, 0, 52, 32, 1, 40, 0, 0)
    phdr = struct.pack("<IIIIIIII", 1, 0x1000, 0x100000, 0x100000, 16, 16, 5, 0x1000)
    path.write_bytes((ehdr + phdr).ljust(0x1000, b"\0") + b"\x90" * 16)
    msg = _assert_rejected(path)
    assert "32" in msg


def test_elf_for_another_machine_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "Image-aarch64.elf"
    path.write_bytes(stubkernel.elf64([(0x1000000, b"\x1f\x20\x03\xd5" * 4, 16)], 0x1000000,
                                      machine=EM_AARCH64))
    msg = _assert_rejected(path)
    assert "AARCH64" in msg.upper()


@pytest.mark.parametrize("cut", [4, 20, 63, 64 + 20, 64 + 55])
def test_elf_truncated_in_its_headers_is_rejected(tmp_path: Path, cut: int) -> None:
    path = tmp_path / f"cut{cut}"
    path.write_bytes(stubkernel.elf(b"\x90" * 64)[:cut])
    _assert_rejected(path)


def test_elf_truncated_in_its_segment_data_is_rejected(tmp_path: Path) -> None:
    """The program header promises 4 KiB of file data; the file ends after 100 bytes."""
    path = tmp_path / "cut-data"
    full = stubkernel.elf64([(0x1000000, b"\xcc" * 4096, 4096)], 0x1000000)
    path.write_bytes(full[:len(full) - 4096 + 100])
    _assert_rejected(path)


def test_elf_filesz_larger_than_memsz_is_rejected(tmp_path: Path) -> None:
    """p_filesz > p_memsz is malformed (ELF spec); loading it must not write past p_memsz."""
    path = tmp_path / "filesz-gt-memsz"
    image = bytearray(stubkernel.elf64([(RAM - 0x1000, b"\x90" * 0x2000, 0x2000)], RAM - 0x1000))
    struct.pack_into("<Q", image, 64 + 40, 0x1000)  # phdr p_memsz := 4 KiB (file data is 8 KiB)
    path.write_bytes(bytes(image))
    _assert_rejected(path)


def test_elf_exceeding_ram_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.write_bytes(stubkernel.elf64([(0x1000000, b"\x90" * 16, 0x2000000)], 0x1000000))
    ram = Ram(size=0x2000000)  # 32 MiB; the kernel wants 0x1000000..0x3000000
    msg = _assert_rejected(path, ram)
    assert ram.writes == [], "nothing may be written for a kernel that does not fit"
    assert "0x3000000" in msg


def test_elf_exactly_filling_ram_loads(tmp_path: Path) -> None:
    path = tmp_path / "exact"
    path.write_bytes(stubkernel.elf64([(0x1000000, b"\x90" * 16, 0x1000000)], 0x1000000))
    assert _load(path, Ram(size=0x2000000)).end == 0x2000000


def test_empty_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    _assert_rejected(path)


def test_directory_is_rejected(tmp_path: Path) -> None:
    assert "directory" in _assert_rejected(tmp_path)


def test_missing_file_is_rejected(tmp_path: Path) -> None:
    assert "does not exist" in _assert_rejected(tmp_path / "nosuch")


def test_elf_without_loadable_segments_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "nophdrs"
    path.write_bytes(stubkernel.elf64([], 0x1000000))
    _assert_rejected(path)


_VALID_STUB = stubkernel.elf(stubkernel.print_code(b"hello") + stubkernel.poweroff_code())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 119), st.integers(0, 255)), min_size=1, max_size=6))
def test_damaged_elf_headers_never_escape_as_other_errors(tmp_path: Path, edits: list[tuple[int, int]]) -> None:
    """Any byte damage in the ELF and program headers: a clean load inside RAM, or KernelImageError."""
    image = bytearray(_VALID_STUB)
    for offset, value in edits:
        image[offset] = value
    path = tmp_path / "damaged"
    path.write_bytes(bytes(image))
    limit = 32 * MiB
    writes: list[tuple[int, int]] = []

    def record(gpa: int, data: bytes) -> None:  # bounds only: no 32 MiB buffer per example
        if gpa < 0 or gpa + len(data) > limit:
            raise AssertionError(f"loader wrote outside RAM: {gpa:#x}+{len(data):#x}")
        writes.append((gpa, len(data)))

    try:
        k = load_kernel(path, record, limit)
    except KernelImageError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return
    assert k.start <= k.entry < k.end <= limit
    for gpa, size in writes:
        assert k.start <= gpa and gpa + size <= k.end, "a write outside the image's own range"


# ------------------------------------------------------------------------------ bzImage

HDR_JUMP_LEN = 0x66  # the byte at 0x201: the header ends at 0x202 + 0x66 = 0x268 (protocol 2.15)


def make_bzimage(payload: bytes, *, setup_sects: int = 4, version: int = 0x020F, xloadflags: int = 0x1,
                 pref_address: int = 0x1000000, init_size: int = 0x400000,
                 initrd_addr_max: int = 0x7FFFFFFF) -> bytes:
    """A bzImage per Documentation/arch/x86/boot.rst: setup sectors, then the 64-bit payload."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects                                # setup_sects
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)              # boot_flag
    setup[0x200:0x202] = bytes([0xEB, HDR_JUMP_LEN])          # jump over the header
    setup[0x202:0x206] = b"HdrS"                              # header magic
    struct.pack_into("<H", setup, 0x206, version)             # protocol version
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)     # initrd_addr_max
    struct.pack_into("<I", setup, 0x230, 0x200000)            # kernel_alignment
    setup[0x234] = 1                                          # relocatable_kernel
    struct.pack_into("<H", setup, 0x236, xloadflags)          # xloadflags
    struct.pack_into("<Q", setup, 0x258, pref_address)        # pref_address
    struct.pack_into("<I", setup, 0x260, init_size)           # init_size
    setup[0x268:0x300] = b"\xee" * (0x300 - 0x268)            # real-mode code: must not be copied
    return bytes(setup) + payload


def test_bzimage_payload_lands_at_pref_address(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 64
    image = make_bzimage(payload, setup_sects=4, pref_address=0x1000000, init_size=0x800000)
    path = tmp_path / "bzImage"
    path.write_bytes(image)
    ram = Ram()
    k = _load(path, ram)
    assert k.kind == "bzImage"
    assert k.start == 0x1000000
    assert k.entry == 0x1000000 + 0x200  # the 64-bit entry: startup_64 in compressed/head_64.S
    assert k.end == 0x1000000 + 0x800000  # init_size bytes are reserved from the load address
    assert ram[0x1000000:0x1000000 + len(payload)] == payload
    assert ram[0x1000000 - 1] == 0xAA, "setup sectors must not be loaded"
    # the header from 0x1F1 to its end (0x202 + the jump byte), for boot_params
    assert k.setup_header == image[0x1F1:0x202 + HDR_JUMP_LEN]
    assert k.setup_header[0x202 - 0x1F1:0x206 - 0x1F1] == b"HdrS"


def test_bzimage_with_zero_setup_sects_means_four(tmp_path: Path) -> None:
    payload = b"\x11" * 1024
    image = bytearray(make_bzimage(payload, setup_sects=4))
    image[0x1F1] = 0  # boot.rst: "if this field is 0, the real value is 4"
    path = tmp_path / "bzImage"
    path.write_bytes(bytes(image))
    ram = Ram()
    k = _load(path, ram)
    assert ram[k.start:k.start + len(payload)] == payload


def test_bzimage_without_64bit_entry_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bzImage32"
    path.write_bytes(make_bzimage(b"\x90" * 1024, xloadflags=0))
    assert "64-bit" in _assert_rejected(path)


@pytest.mark.parametrize("version", [0x0200, 0x020A, 0x020B])
def test_bzimage_older_than_2_12_is_rejected(tmp_path: Path, version: int) -> None:
    path = tmp_path / "old-bzImage"
    path.write_bytes(make_bzimage(b"\x90" * 1024, version=version))
    assert "2.12" in _assert_rejected(path)


def test_bzimage_protocol_2_12_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bzImage"
    path.write_bytes(make_bzimage(b"\x90" * 1024, version=0x020C))
    assert _load(path).kind == "bzImage"


def test_bzimage_without_payload_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "setup-only"
    path.write_bytes(make_bzimage(b""))
    _assert_rejected(path)


def test_truncated_bzimage_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "cut-bzImage"
    path.write_bytes(make_bzimage(b"\x90" * 1024)[:0x280])
    _assert_rejected(path)


def test_bzimage_larger_than_ram_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "huge-bzImage"
    path.write_bytes(make_bzimage(b"\x90" * 1024, init_size=RAM))
    ram = Ram()
    _assert_rejected(path, ram)
    assert ram.writes == []


_VALID_BZIMAGE = make_bzimage(b"\x90" * 4096, init_size=0x10000)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0x1F1, 0x267), st.integers(0, 255)), min_size=1, max_size=6))
def test_damaged_bzimage_headers_never_escape_as_other_errors(tmp_path: Path,
                                                              edits: list[tuple[int, int]]) -> None:
    image = bytearray(_VALID_BZIMAGE)
    for offset, value in edits:
        image[offset] = value
    path = tmp_path / "damaged-bzImage"
    path.write_bytes(bytes(image))
    limit = 32 * MiB
    writes: list[tuple[int, int]] = []

    def record(gpa: int, data: bytes) -> None:
        if gpa < 0 or gpa + len(data) > limit:
            raise AssertionError(f"loader wrote outside RAM: {gpa:#x}+{len(data):#x}")
        writes.append((gpa, len(data)))

    try:
        k = load_kernel(path, record, limit)
    except KernelImageError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return
    assert k.entry == k.start + 0x200 and k.end <= limit
    assert all(k.start <= gpa and gpa + n <= k.end for gpa, n in writes)


def test_initrd_max_addr_comes_from_the_header() -> None:
    image = make_bzimage(b"\x90", initrd_addr_max=0x37FFFFFF)
    assert initrd_max_addr(image[0x1F1:0x202 + HDR_JUMP_LEN]) == 0x38000000
    assert initrd_max_addr(None) == 2 * GiB  # vmlinux: the boot protocol's default


# ------------------------------------------------------------------------------ boot_params


def _u8(bp: bytes, off: int) -> int:
    return bp[off]


def _u16(bp: bytes, off: int) -> int:
    return struct.unpack_from("<H", bp, off)[0]


def _u32(bp: bytes, off: int) -> int:
    return struct.unpack_from("<I", bp, off)[0]


def _u64(bp: bytes, off: int) -> int:
    return struct.unpack_from("<Q", bp, off)[0]


E820 = [E820Entry(0, 0x9FC00, 1), E820Entry(0x9FC00, 0x60400, 2), E820Entry(0x100000, 3 * GiB - 0x100000, 1),
        E820Entry(4 * GiB, 2 * GiB, 1)]


def test_boot_params_field_offsets() -> None:
    bp = build_boot_params(e820=E820, cmdline_addr=0x1_2002_0000, cmdline_len=77,
                           initrd_addr=0x2_3000_0000, initrd_size=0x5_0000_1000, rsdp_addr=0xE0000)
    assert len(bp) == 4096
    assert _u16(bp, 0x1FE) == 0xAA55                       # boot_flag
    assert bp[0x202:0x206] == b"HdrS"                      # header
    assert _u16(bp, 0x206) >= 0x020C                       # version
    assert _u8(bp, 0x210) == 0xFF                          # type_of_loader: undefined
    assert _u8(bp, 0x211) & 0x01                           # loadflags: LOADED_HIGH
    assert _u32(bp, 0x228) == 0x2002_0000                  # cmd_line_ptr (low 32 bits)
    assert _u32(bp, 0x0C8) == 0x1                          # ext_cmd_line_ptr (high 32 bits)
    assert _u32(bp, 0x218) == 0x3000_0000                  # ramdisk_image
    assert _u32(bp, 0x0C0) == 0x2                          # ext_ramdisk_image
    assert _u32(bp, 0x21C) == 0x0000_1000                  # ramdisk_size
    assert _u32(bp, 0x0C4) == 0x5                          # ext_ramdisk_size
    assert _u64(bp, 0x070) == 0xE0000                      # acpi_rsdp_addr
    assert _u8(bp, 0x1E8) == len(E820)                     # e820_entries
    for i, e in enumerate(E820):                           # e820_table: {u64 addr, u64 size, u32 type}
        assert struct.unpack_from("<QQI", bp, 0x2D0 + 20 * i) == (e.addr, e.size, e.type)
    assert bp[0x2D0 + 20 * len(E820):0x2D0 + 20 * 128] == bytes(20 * (128 - len(E820)))


def test_boot_params_low_addresses_have_zero_high_halves() -> None:
    bp = build_boot_params(e820=E820[:1], cmdline_addr=0x20000, cmdline_len=10,
                           initrd_addr=0x7000000, initrd_size=0x100000)
    assert (_u32(bp, 0x228), _u32(bp, 0x0C8)) == (0x20000, 0)
    assert (_u32(bp, 0x218), _u32(bp, 0x0C0)) == (0x7000000, 0)
    assert (_u32(bp, 0x21C), _u32(bp, 0x0C4)) == (0x100000, 0)
    assert _u64(bp, 0x070) == 0  # no RSDP given: the kernel searches for it


def test_boot_params_preserve_a_copied_bzimage_header() -> None:
    image = make_bzimage(b"\x90", pref_address=0x1000000, init_size=0x1234000, initrd_addr_max=0x37FFFFFF)
    header = image[0x1F1:0x202 + HDR_JUMP_LEN]
    bp = build_boot_params(e820=E820, cmdline_addr=0x20000, cmdline_len=5, setup_header=header)
    # fields the loader does not own keep the kernel's values
    for off, size in ((0x1F1, 1), (0x1FE, 2), (0x202, 4), (0x206, 2), (0x22C, 4), (0x230, 4), (0x234, 1),
                      (0x236, 2), (0x258, 8), (0x260, 4)):
        assert bp[off:off + size] == image[off:off + size], f"field at {off:#x} was not preserved"
    # ... and the loader's own fields are filled in over the copy
    assert _u8(bp, 0x210) == 0xFF
    assert _u32(bp, 0x228) == 0x20000
    # the real-mode bytes after the header's end are not part of boot_params
    assert bp[0x202 + HDR_JUMP_LEN:0x2D0] == bytes(0x2D0 - 0x202 - HDR_JUMP_LEN)


def test_boot_params_reject_too_many_e820_entries() -> None:
    with pytest.raises(ValueError):
        build_boot_params(e820=[E820Entry(i << 20, 1 << 20, 1) for i in range(129)],
                          cmdline_addr=0x20000, cmdline_len=1)


# ------------------------------------------------------------------------------ page tables and GDT


class Phys:
    """Guest-physical memory holding exactly what `page_tables()` writes."""

    def __init__(self) -> None:
        self.mem = bytearray(1 * MiB)
        for addr, data in cpu_setup.page_tables():
            self.mem[addr:addr + len(data)] = data

    def u64(self, addr: int) -> int:
        return struct.unpack_from("<Q", self.mem, addr)[0]


P, RW, PS = 1 << 0, 1 << 1, 1 << 7
FRAME = 0x000F_FFFF_FFFF_F000


def walk(phys: Phys, cr3: int, va: int) -> tuple[int, int] | None:
    """(physical address, page size) for `va` under 4-level paging, or None if not present."""
    table = cr3 & FRAME
    for level, shift in ((4, 39), (3, 30), (2, 21), (1, 12)):
        entry = phys.u64(table + 8 * ((va >> shift) & 0x1FF))
        if not entry & P:
            return None
        if level in (3, 2) and entry & PS:
            size = 1 << shift
            return (entry & FRAME & ~(size - 1)) | (va & (size - 1)), size
        table = entry & FRAME
    return (table | (va & 0xFFF)), 4096


@pytest.mark.parametrize("va", [0, 0x7000, 0x9FFF, 0x1000000, 0x1000200, 0x3FFF_FFFF, 0x4000_0000,
                                0xBFFF_F000, 0xC000_0000, 0xFEC0_0000, 0xFEE0_0010, 0xFFFF_FFFF])
def test_page_tables_identity_map_with_2mib_pages(va: int) -> None:
    assert walk(Phys(), cpu_setup.PML4_ADDR, va) == (va, 2 * MiB)


@pytest.mark.parametrize("va", [4 * GiB, 4 * GiB + 0x1000, 512 * GiB, 0x0000_7FFF_FFFF_F000])
def test_page_tables_map_nothing_above_4gib(va: int) -> None:
    assert walk(Phys(), cpu_setup.PML4_ADDR, va) is None


def test_page_tables_map_every_2mib_page_below_4gib_writable() -> None:
    phys = Phys()
    for page in range(0, 4 * GiB, 2 * MiB):
        assert walk(phys, cpu_setup.PML4_ADDR, page + 0x1234) == (page + 0x1234, 2 * MiB)
    # every level writable, supervisor-only (U/S clear)
    pml4e = phys.u64(cpu_setup.PML4_ADDR)
    pdpte = phys.u64(pml4e & FRAME)
    pde = phys.u64(pdpte & FRAME)
    for entry in (pml4e, pdpte, pde):
        assert entry & RW and not entry & (1 << 2)


def test_boot_structures_do_not_overlap() -> None:
    regions = [("gdt", cpu_setup.GDT_ADDR, len(cpu_setup.gdt_bytes())),
               ("boot_params", cpu_setup.BOOT_PARAMS_ADDR, 4096),
               ("cmdline", cpu_setup.CMDLINE_ADDR, cpu_setup.CMDLINE_MAX)]
    regions += [("page tables", addr, len(data)) for addr, data in cpu_setup.page_tables()]
    regions.sort(key=lambda r: r[1])
    for (n1, a1, s1), (n2, a2, _) in zip(regions, regions[1:]):
        assert a1 + s1 <= a2, f"{n1} overlaps {n2}"
    # the boot stack grows down from BOOT_STACK_TOP and must not run into boot_params at once
    assert cpu_setup.BOOT_PARAMS_ADDR + 4096 <= cpu_setup.BOOT_STACK_TOP <= cpu_setup.PML4_ADDR
    assert regions[-1][1] + regions[-1][2] <= 0x9FC00, "boot structures must stay below the EBDA"


def decode_descriptor(d: int) -> dict[str, int]:
    """A legacy 8-byte segment descriptor (SDM vol. 3, "Segment Descriptors")."""
    return {
        "limit": (d & 0xFFFF) | ((d >> 32) & 0xF0000),
        "base": ((d >> 16) & 0xFFFFFF) | ((d >> 32) & 0xFF000000),
        "type": (d >> 40) & 0xF,
        "s": (d >> 44) & 1,
        "dpl": (d >> 45) & 3,
        "p": (d >> 47) & 1,
        "avl": (d >> 52) & 1,
        "l": (d >> 53) & 1,
        "db": (d >> 54) & 1,
        "g": (d >> 55) & 1,
    }


def _gdt() -> list[dict[str, int]]:
    raw = cpu_setup.gdt_bytes()
    assert len(raw) % 8 == 0
    return [decode_descriptor(struct.unpack_from("<Q", raw, i)[0]) for i in range(0, len(raw), 8)]


def test_gdt_has_64bit_code_at_0x10_and_data_at_0x18() -> None:
    gdt = _gdt()
    assert struct.unpack_from("<Q", cpu_setup.gdt_bytes(), 0)[0] == 0  # null descriptor
    code, data = gdt[0x10 // 8], gdt[0x18 // 8]
    # code: present, DPL0, S=1, type execute/read (bit 3 = code, bit 1 = readable), L=1, D=0
    assert (code["p"], code["dpl"], code["s"], code["l"], code["db"]) == (1, 0, 1, 1, 0)
    assert code["type"] & 0b1010 == 0b1010
    # data: present, DPL0, S=1, type read/write data (bit 3 clear, bit 1 set), flat 4 GiB
    assert (data["p"], data["dpl"], data["s"], data["l"]) == (1, 0, 1, 0)
    assert data["type"] & 0b1010 == 0b0010
    assert (data["base"], data["limit"], data["g"], data["db"]) == (0, 0xFFFFF, 1, 1)


def test_sregs_match_the_gdt_and_enter_long_mode() -> None:
    sregs = ffi.new("struct kvm_sregs *")
    cpu_setup.setup_long_mode_sregs(sregs)
    gdt = _gdt()
    assert sregs.gdt.base == cpu_setup.GDT_ADDR and sregs.gdt.limit == len(gdt) * 8 - 1
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.ss, sregs.fs, sregs.gs):
        d = gdt[seg.selector // 8]
        assert seg.selector % 8 == 0 and seg.selector // 8 < len(gdt)
        # the hidden part KVM loads must be what the guest would load from the GDT
        assert (seg.type | 1, seg.s, seg.dpl, seg.present, seg.l, seg.db, seg.g) == \
               (d["type"] | 1, d["s"], d["dpl"], d["p"], d["l"], d["db"], d["g"]), seg.selector
    assert sregs.cs.selector == 0x10 and sregs.cs.l == 1 and sregs.cs.db == 0
    assert sregs.ds.selector == sregs.ss.selector == 0x18
    tr = gdt[sregs.tr.selector // 8]
    assert tr["type"] == 0xB and tr["s"] == 0 and sregs.tr.type == 0xB  # busy 64-bit TSS
    assert sregs.cr3 == cpu_setup.PML4_ADDR
    assert sregs.cr0 & (1 << 31) and sregs.cr0 & 1            # PG, PE
    assert sregs.cr4 & (1 << 5)                               # PAE
    assert sregs.efer & (1 << 8) and sregs.efer & (1 << 10)   # LME, LMA


def test_boot_regs_point_rsi_at_boot_params() -> None:
    regs = ffi.new("struct kvm_regs *")
    regs.rax = regs.rdi = regs.r15 = 0xDEAD
    cpu_setup.setup_boot_regs(regs, 0x1000000)
    assert regs.rip == 0x1000000
    assert regs.rsi == cpu_setup.BOOT_PARAMS_ADDR == 0x7000
    assert regs.rflags == 0x2  # reserved bit 1 set, IF clear
    assert regs.rax == regs.rdi == regs.r15 == 0
    assert regs.rsp % 16 == 0 and cpu_setup.BOOT_PARAMS_ADDR + 4096 <= regs.rsp


def test_lapic_lint_pins_become_extint_and_nmi() -> None:
    state = bytearray(1024)
    struct.pack_into("<I", state, 0x350, 0x0001_0000)  # LVT0 masked, fixed
    struct.pack_into("<I", state, 0x360, 0x0001_0700)  # LVT1 masked, ExtINT
    struct.pack_into("<I", state, 0x370, 0x1234)       # LVT error: untouched
    out = cpu_setup.lapic_with_lint(bytes(state))
    assert len(out) == 1024
    assert struct.unpack_from("<I", out, 0x350)[0] == 0x0001_0700  # delivery mode ExtINT (0b111)
    assert struct.unpack_from("<I", out, 0x360)[0] == 0x0001_0400  # delivery mode NMI (0b100)
    assert struct.unpack_from("<I", out, 0x370)[0] == 0x1234
