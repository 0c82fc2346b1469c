"""Tiny hand-assembled 64-bit ELF "kernels" for fast tests and the exit-loop benchmark.

They are entered exactly like a vmlinux (64-bit mode, RSI = boot_params) and talk to the
machine only through port I/O, so they exercise the loader, the boot CPU state, the vCPU
loop, the bus, the UART and the ACPI power-management registers in well under a second.

Every stub is one flat image loaded at LOAD_ADDR (identity-mapped by the boot page
tables), so code can refer to its own data by absolute address LOAD_ADDR + offset.
"""

from __future__ import annotations

import struct
from pathlib import Path

LOAD_ADDR = 0x1000000
COM1 = 0x3F8
ACPI_SLEEP_CONTROL = 0x600
ACPI_RESET = 0x602
S5_POWEROFF = (5 << 2) | (1 << 5)
UNCLAIMED_PORT = 0x80  # the POST-code port: no pyvmm device claims it

# ELF constants (include/uapi/linux/elf.h)
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1
ET_EXEC = 2
EM_X86_64 = 62
PT_LOAD = 1
PF_X, PF_W, PF_R = 1, 2, 4
ELF64_EHDR_SIZE = 64
ELF64_PHDR_SIZE = 56
SEGMENT_FILE_ALIGN = 0x1000
DEFAULT_BSS = 0x1000

# The boot GDT's 64-bit code selector (vmm/boot/cpu_setup.py BOOT_CS).
BOOT_CS = 0x10
IDT_GATE_SIZE = 16
GATE_INTERRUPT_64_DPL0 = 0x8E  # present, DPL 0, 64-bit interrupt gate
X86_TRAP_BP = 3


def _mov_dx(port: int) -> bytes:
    return b"\x66\xba" + struct.pack("<H", port)


def _mov_al(value: int) -> bytes:
    return b"\xb0" + bytes([value])


OUT_DX_AL = b"\xee"
IN_AL_DX = b"\xec"
HLT_LOOP = b"\xf4\xeb\xfd"  # hlt; jmp back to hlt (IF is clear at entry, so it stays halted)
JMP_SELF = b"\xeb\xfe"      # jmp $: spins inside the guest without ever exiting
INT3 = b"\xcc"
IRETQ = b"\x48\xcf"


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


def out_code(port: int, value: int, times: int = 1) -> bytes:
    """`times` single OUTs of `value` to `port`, unrolled (each one is an exit)."""
    return _mov_dx(port) + _mov_al(value) + OUT_DX_AL * times


def console_flood_code(char: int = ord(".")) -> bytes:
    """Write `char` to the UART forever: a guest whose progress shows on the console."""
    return _mov_dx(COM1) + _mov_al(char) + OUT_DX_AL + b"\xeb\xfd"  # out dx,al; jmp back to out


def elf64(segments: list[tuple[int, bytes, int]], entry: int, machine: int = EM_X86_64,
          elf_class: int = ELFCLASS64) -> bytes:
    """An ELF64 executable: one PT_LOAD per (paddr, data, memsz), physical = virtual.

    `machine` and `elf_class` only change the identification fields, so a test can make
    a well-formed file the loader must refuse.
    """
    phoff = ELF64_EHDR_SIZE
    data_start = -(-(phoff + ELF64_PHDR_SIZE * len(segments)) // SEGMENT_FILE_ALIGN) * SEGMENT_FILE_ALIGN
    ehdr = struct.pack("<4sBBBBB7xHHIQQQIHHHHHH", b"\x7fELF", elf_class, ELFDATA2LSB, EV_CURRENT, 0, 0,
                       ET_EXEC, machine, EV_CURRENT, entry, phoff, 0, 0,
                       ELF64_EHDR_SIZE, ELF64_PHDR_SIZE, len(segments), 64, 0, 0)
    phdrs = b""
    body = b""
    offset = data_start
    for paddr, data, memsz in segments:
        phdrs += struct.pack("<IIQQQQQQ", PT_LOAD, PF_R | PF_W | PF_X, offset, paddr, paddr,
                             len(data), memsz, SEGMENT_FILE_ALIGN)
        padded = data.ljust(-(-len(data) // SEGMENT_FILE_ALIGN) * SEGMENT_FILE_ALIGN, b"\0")
        body += padded
        offset += len(padded)
    return (ehdr + phdrs).ljust(data_start, b"\0") + body


def elf(code: bytes, entry_offset: int = 0) -> bytes:
    """An ELF64 x86-64 executable with one PT_LOAD at LOAD_ADDR (physical = virtual) and a bss."""
    return elf64([(LOAD_ADDR, code, len(code) + DEFAULT_BSS)], LOAD_ADDR + entry_offset)


def write_stub(path: Path, code: bytes) -> Path:
    path.write_bytes(elf(code))
    return path


def hello_poweroff(path: Path, text: bytes = b"hi\n") -> Path:
    return write_stub(path, print_code(text) + poweroff_code())


# --- a stub with an IDT: int3 -------------------------------------------------------------
# Image layout (offsets from LOAD_ADDR). The main code comes first so the entry is offset 0.
INT3_HANDLER_OFFSET = 0x100
INT3_IDTR_OFFSET = 0x200
INT3_IDT_OFFSET = 0x210
INT3_IDT_VECTORS = X86_TRAP_BP + 1


def lidt_rip(at: int, target: int) -> bytes:
    """`lidt [rip + disp32]` placed at image offset `at`, loading the pseudo-descriptor at `target`."""
    insn_len = 7  # 0F 01 /3 with a RIP-relative ModRM (0x1D) and a 32-bit displacement
    return b"\x0f\x01\x1d" + struct.pack("<i", target - (at + insn_len))


def idt_gate64(handler: int, selector: int = BOOT_CS) -> bytes:
    """A 16-byte long-mode interrupt gate (SDM vol. 3, "64-Bit IDT Gate Descriptors")."""
    return struct.pack("<HHBBHII", handler & 0xFFFF, selector, 0, GATE_INTERRUPT_64_DPL0,
                       (handler >> 16) & 0xFFFF, handler >> 32, 0)


def int3_code(handler_text: bytes = b"B", after_text: bytes = b"A", then: bytes | None = None) -> bytes:
    """lidt; int3; print `after_text`; `then`. The #BP handler prints `handler_text` and iretq's.

    int3 is a trap, so a correct #BP frame returns to the instruction after it: the console
    reads handler_text + after_text exactly once. A wrong return RIP re-runs the int3 (the
    handler text repeats) or skips code.
    """
    then = poweroff_code() if then is None else then
    main = lidt_rip(0, INT3_IDTR_OFFSET) + INT3 + print_code(after_text) + then
    handler = print_code(handler_text) + IRETQ
    if len(main) > INT3_HANDLER_OFFSET or len(handler) > INT3_IDTR_OFFSET - INT3_HANDLER_OFFSET:
        raise ValueError("int3 stub code does not fit its layout")
    image = bytearray(INT3_IDT_OFFSET + IDT_GATE_SIZE * INT3_IDT_VECTORS)
    image[:len(main)] = main
    image[INT3_HANDLER_OFFSET:INT3_HANDLER_OFFSET + len(handler)] = handler
    struct.pack_into("<HQ", image, INT3_IDTR_OFFSET, IDT_GATE_SIZE * INT3_IDT_VECTORS - 1,
                     LOAD_ADDR + INT3_IDT_OFFSET)
    gate_at = INT3_IDT_OFFSET + IDT_GATE_SIZE * X86_TRAP_BP
    image[gate_at:gate_at + IDT_GATE_SIZE] = idt_gate64(LOAD_ADDR + INT3_HANDLER_OFFSET)
    return bytes(image)
