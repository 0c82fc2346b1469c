"""Tiny hand-assembled 64-bit ELF "kernels" for fast tests and the exit-loop benchmark.

They are entered exactly like a vmlinux (64-bit mode, RSI = boot_params) and talk to the
machine only through port I/O, so they exercise the loader, the boot CPU state, the vCPU
loop, the bus, the UART and the ACPI power-management registers in well under a second.
"""

from __future__ import annotations

import struct
from pathlib import Path

LOAD_ADDR = 0x1000000
COM1 = 0x3F8
ACPI_SLEEP_CONTROL = 0x600
ACPI_RESET = 0x602
S5_POWEROFF = (5 << 2) | (1 << 5)


def _mov_dx(port: int) -> bytes:
    return b"\x66\xba" + struct.pack("<H", port)


def _mov_al(value: int) -> bytes:
    return b"\xb0" + bytes([value])


OUT_DX_AL = b"\xee"
IN_AL_DX = b"\xec"
HLT_LOOP = b"\xf4\xeb\xfd"  # hlt; jmp back to hlt
INT3 = b"\xcc"


def print_code(text: bytes) -> bytes:
    code = _mov_dx(COM1)
    for ch in text:
        code += _mov_al(ch) + OUT_DX_AL
    return code


def poweroff_code() -> bytes:
    return _mov_dx(ACPI_SLEEP_CONTROL) + _mov_al(S5_POWEROFF) + OUT_DX_AL + HLT_LOOP


def reset_code() -> bytes:
    return _mov_dx(ACPI_RESET) + _mov_al(1) + OUT_DX_AL + HLT_LOOP


def pio_loop_code(port: int, count: int) -> bytes:
    """`count` OUTs to `port` (an unclaimed port costs the same exit as a device)."""
    loop = OUT_DX_AL + b"\xff\xc9" + b"\x75\xfb"  # out dx,al; dec ecx; jnz -5
    return _mov_dx(port) + b"\xb9" + struct.pack("<I", count) + loop


def elf(code: bytes, entry_offset: int = 0) -> bytes:
    """An ELF64 x86-64 executable with one PT_LOAD at LOAD_ADDR (physical = virtual)."""
    ehdr_size, phdr_size = 64, 56
    offset = 0x1000
    ehdr = struct.pack("<4sBBBBB7xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0,
                       2, 62, 1, LOAD_ADDR + entry_offset, ehdr_size, 0, 0,
                       ehdr_size, phdr_size, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, offset, LOAD_ADDR, LOAD_ADDR, len(code), len(code) + 0x1000, 0x1000)
    return (ehdr + phdr).ljust(offset, b"\0") + code


def write_stub(path: Path, code: bytes) -> Path:
    path.write_bytes(elf(code))
    return path


def hello_poweroff(path: Path, text: bytes = b"hi\n") -> Path:
    return write_stub(path, print_code(text) + poweroff_code())
