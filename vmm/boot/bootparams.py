"""The x86 zero page (`struct boot_params`) with its setup header and e820 map.

Offsets are from the kernel's arch/x86/include/uapi/asm/bootparam.h; only the fields a
64-bit direct boot needs are written.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

BOOT_PARAMS_SIZE = 4096

# struct boot_params
ACPI_RSDP_ADDR = 0x070
EXT_RAMDISK_IMAGE = 0x0C0
EXT_RAMDISK_SIZE = 0x0C4
EXT_CMD_LINE_PTR = 0x0C8
E820_ENTRIES = 0x1E8
SETUP_HEADER = 0x1F1
E820_TABLE = 0x2D0
E820_MAX_ENTRIES_ZEROPAGE = 128
E820_ENTRY_SIZE = 20

# struct setup_header, absolute offsets in boot_params
HDR_BOOT_FLAG = 0x1FE
HDR_HEADER = 0x202
HDR_VERSION = 0x206
HDR_TYPE_OF_LOADER = 0x210
HDR_LOADFLAGS = 0x211
HDR_RAMDISK_IMAGE = 0x218
HDR_RAMDISK_SIZE = 0x21C
HDR_HEAP_END_PTR = 0x224
HDR_CMD_LINE_PTR = 0x228
HDR_INITRD_ADDR_MAX = 0x22C
HDR_KERNEL_ALIGNMENT = 0x230
HDR_CMDLINE_SIZE = 0x238

BOOT_FLAG_MAGIC = 0xAA55
HEADER_MAGIC = b"HdrS"
BOOT_PROTOCOL_VERSION = 0x020F
LOADER_TYPE_UNDEFINED = 0xFF
LOADED_HIGH = 1 << 0
CAN_USE_HEAP = 1 << 7
KERNEL_ALIGNMENT = 0x1000000

E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: int


def build_boot_params(*, e820: list[E820Entry], cmdline_addr: int, cmdline_len: int,
                      initrd_addr: int = 0, initrd_size: int = 0, rsdp_addr: int = 0,
                      setup_header: bytes | None = None) -> bytes:
    """A 4 KiB zero page. `setup_header` is the bzImage's own header, copied verbatim first."""
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise ValueError(f"too many e820 entries ({len(e820)})")
    bp = bytearray(BOOT_PARAMS_SIZE)
    if setup_header:
        bp[SETUP_HEADER:SETUP_HEADER + len(setup_header)] = setup_header
    else:
        struct.pack_into("<H", bp, HDR_BOOT_FLAG, BOOT_FLAG_MAGIC)
        bp[HDR_HEADER:HDR_HEADER + 4] = HEADER_MAGIC
        struct.pack_into("<H", bp, HDR_VERSION, BOOT_PROTOCOL_VERSION)
        struct.pack_into("<I", bp, HDR_KERNEL_ALIGNMENT, KERNEL_ALIGNMENT)
        struct.pack_into("<I", bp, HDR_INITRD_ADDR_MAX, 0x7FFFFFFF)
    bp[HDR_TYPE_OF_LOADER] = LOADER_TYPE_UNDEFINED
    bp[HDR_LOADFLAGS] |= LOADED_HIGH | CAN_USE_HEAP
    struct.pack_into("<H", bp, HDR_HEAP_END_PTR, 0xFE00)
    struct.pack_into("<I", bp, HDR_CMD_LINE_PTR, cmdline_addr & 0xFFFFFFFF)
    struct.pack_into("<I", bp, EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    struct.pack_into("<I", bp, HDR_CMDLINE_SIZE, cmdline_len)
    struct.pack_into("<I", bp, HDR_RAMDISK_IMAGE, initrd_addr & 0xFFFFFFFF)
    struct.pack_into("<I", bp, EXT_RAMDISK_IMAGE, initrd_addr >> 32)
    struct.pack_into("<I", bp, HDR_RAMDISK_SIZE, initrd_size & 0xFFFFFFFF)
    struct.pack_into("<I", bp, EXT_RAMDISK_SIZE, initrd_size >> 32)
    struct.pack_into("<Q", bp, ACPI_RSDP_ADDR, rsdp_addr)
    bp[E820_ENTRIES] = len(e820)
    for i, e in enumerate(e820):
        struct.pack_into("<QQI", bp, E820_TABLE + i * E820_ENTRY_SIZE, e.addr, e.size, e.type)
    return bytes(bp)


def initrd_max_addr(setup_header: bytes | None) -> int:
    """The highest address the initrd may end at, from the bzImage header (2 GiB default)."""
    if setup_header:
        off = HDR_INITRD_ADDR_MAX - SETUP_HEADER
        if len(setup_header) >= off + 4:
            value = struct.unpack_from("<I", setup_header, off)[0]
            if value:
                return value + 1
    return 0x80000000
