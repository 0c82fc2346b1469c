"""Initial CPU state for a 64-bit Linux entry: GDT, identity page tables, registers, MSRs.

The boot CPU starts in long mode at the kernel's 64-bit entry with RSI pointing at
boot_params, as the x86-64 boot protocol describes; the application processors start
uninitialised and are woken by the guest with INIT/SIPI through the in-kernel LAPIC.
"""

from __future__ import annotations

import struct

GDT_ADDR = 0x500
BOOT_PARAMS_ADDR = 0x7000
BOOT_STACK_TOP = 0x8FF0
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000
IDENTITY_MAP_GIB = 4  # four page directories of 2 MiB pages: 0xb000..0xefff
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000

# GDT selectors, as the boot protocol names them
BOOT_CS = 0x10
BOOT_DS = 0x18
BOOT_TSS = 0x20

PTE_PRESENT = 1 << 0
PTE_RW = 1 << 1
PTE_PS = 1 << 7

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1

MSR_IA32_MISC_ENABLE = 0x1A0
MSR_IA32_MISC_ENABLE_FAST_STRING = 1 << 0
MSR_MTRR_DEF_TYPE = 0x2FF
MTRR_DEF_TYPE_ENABLE = 1 << 11
MTRR_TYPE_WRBACK = 6

# LAPIC registers (offsets in struct kvm_lapic_state)
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_DM_EXTINT = 0x700
APIC_DM_NMI = 0x400
APIC_DM_MASK = 0x700


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """Pack a segment descriptor; `flags` is the 12-bit access+flags word (e.g. 0xA09B)."""
    return (((base & 0xFF000000) << 32) | ((flags & 0xF0FF) << 40) | ((limit & 0xF0000) << 32)
            | ((base & 0x00FFFFFF) << 16) | (limit & 0x0000FFFF))


GDT = (
    0,                                # null
    0,                                # unused (0x08)
    gdt_entry(0xA09B, 0, 0xFFFFF),    # 0x10: 64-bit code, present, DPL0, G
    gdt_entry(0xC093, 0, 0xFFFFF),    # 0x18: data, present, DPL0, D/B, G
    gdt_entry(0x808B, 0, 0xFFFFF),    # 0x20: busy 64-bit TSS
)


def gdt_bytes() -> bytes:
    return b"".join(struct.pack("<Q", e) for e in GDT)


def page_tables() -> list[tuple[int, bytes]]:
    """Identity map of the first IDENTITY_MAP_GIB GiB with 2 MiB pages."""
    pml4 = struct.pack("<Q", PDPT_ADDR | PTE_PRESENT | PTE_RW).ljust(4096, b"\0")
    pdpt = b"".join(struct.pack("<Q", (PD_ADDR + i * 4096) | PTE_PRESENT | PTE_RW)
                    for i in range(IDENTITY_MAP_GIB)).ljust(4096, b"\0")
    pds = b"".join(struct.pack("<Q", (i << 21) | PTE_PRESENT | PTE_RW | PTE_PS)
                   for i in range(512 * IDENTITY_MAP_GIB))
    return [(PML4_ADDR, pml4), (PDPT_ADDR, pdpt), (PD_ADDR, pds)]


def _set_segment(seg, selector: int, type_: int, *, code: bool) -> None:
    seg.base = 0
    seg.limit = 0xFFFFFFFF
    seg.selector = selector
    seg.type = type_
    seg.present = 1
    seg.dpl = 0
    seg.db = 0 if code else 1
    seg.s = 1
    seg.l = 1 if code else 0
    seg.g = 1
    seg.avl = 0
    seg.unusable = 0


def setup_long_mode_sregs(sregs) -> None:
    """Fill a `struct kvm_sregs` for 64-bit entry with the identity page tables."""
    _set_segment(sregs.cs, BOOT_CS, 0xB, code=True)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _set_segment(seg, BOOT_DS, 0x3, code=False)
    sregs.tr.base, sregs.tr.limit, sregs.tr.selector = 0, 0xFFFF, BOOT_TSS
    sregs.tr.type, sregs.tr.present, sregs.tr.s, sregs.tr.g = 0xB, 1, 0, 0
    sregs.gdt.base, sregs.gdt.limit = GDT_ADDR, len(GDT) * 8 - 1
    sregs.idt.base, sregs.idt.limit = 0, 0xFFFF
    sregs.cr3 = PML4_ADDR
    sregs.cr4 = CR4_PAE
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    sregs.efer = EFER_LME | EFER_LMA


def setup_boot_regs(regs, entry: int) -> None:
    for name in ("rax", "rbx", "rcx", "rdx", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"):
        setattr(regs, name, 0)
    regs.rip = entry
    regs.rsi = BOOT_PARAMS_ADDR
    regs.rsp = regs.rbp = BOOT_STACK_TOP
    regs.rflags = RFLAGS_RESERVED


BOOT_MSRS = (
    (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
    (MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_ENABLE | MTRR_TYPE_WRBACK),
)


def lapic_with_lint(state: bytes) -> bytes:
    """LINT0 as ExtINT and LINT1 as NMI, as a PC's firmware leaves them."""
    buf = bytearray(state)
    for off, mode in ((APIC_LVT0, APIC_DM_EXTINT), (APIC_LVT1, APIC_DM_NMI)):
        v = struct.unpack_from("<I", buf, off)[0]
        struct.pack_into("<I", buf, off, (v & ~APIC_DM_MASK) | mode)
    return bytes(buf)
