"""Tests for the emulation assist, the software page walk and System.map symbols.

Guest memory is a bytearray with real x86 page tables built by the test, and every
exit is a recorded KVM emulation-failure exit, so no KVM is needed.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmm import assist as assist_mod
from vmm.assist import (
    AssistAction,
    AssistFailure,
    AssistStats,
    CpuState,
    EmulationFailure,
    assist,
)
from vmm.pagewalk import (
    Access,
    NonCanonicalAddress,
    PageFault,
    PhysAccessError,
    X86_PF_INSTR,
    X86_PF_PROT,
    X86_PF_RSVD,
    X86_PF_USER,
    X86_PF_WRITE,
    gva_to_gpa,
    read_virt,
    translate,
)
from vmm.symbols import Symbols

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
P, RW, US, PS, NX = 1 << 0, 1 << 1, 1 << 2, 1 << 7, 1 << 63

# Control registers of a typical x86-64 Linux guest.
CR0_LINUX = 0x8005_0033  # PG WP NE ET MP PE
CR4_LINUX = 0x0000_0620  # OSXMMEXCPT OSFXSR PAE
EFER_LINUX = 0xD01  # NXE LMA LME SCE
CR4_LA57 = 1 << 12
CR4_SMAP = 1 << 21
CR4_SMEP = 1 << 20
RFLAGS_AC = 1 << 18
RFLAGS_ZF = 1 << 6

# Guest-virtual layout the tests build.
KTEXT = 0xFFFF_FFFF_8100_0000  # 16 x 4 KiB -> GPA 0x100000
KTEXT_GPA = 0x10_0000
KDATA = 0xFFFF_FFFF_8200_0000  # 4 KiB pages, see build_guest()
KDATA_GPA = 0x20_0000
LARGE = 0xFFFF_8880_0040_0000  # one 2 MiB page -> GPA 0x400000
LARGE_GPA = 0x40_0000
USER = 0x0000_0040_0000_0000  # one 1 GiB user page -> GPA 0
UNMAPPED = 0xFFFF_FFFF_C000_0000


class FakeRam:
    """Guest RAM at GPA 0; anything else raises like an unmapped GPA."""

    def __init__(self, size: int = 8 * MiB) -> None:
        self.buf = bytearray(size)

    def read_phys(self, gpa: int, size: int) -> bytes:
        if gpa < 0 or size < 0 or gpa + size > len(self.buf):
            raise IndexError(f"GPA {gpa:#x}+{size} is not RAM")
        return bytes(self.buf[gpa:gpa + size])

    def write_phys(self, gpa: int, data: bytes) -> None:
        if gpa < 0 or gpa + len(data) > len(self.buf):
            raise IndexError(f"GPA {gpa:#x}+{len(data)} is not RAM")
        self.buf[gpa:gpa + len(data)] = data

    def u64(self, gpa: int) -> int:
        return int.from_bytes(self.read_phys(gpa, 8), "little")

    def set_u64(self, gpa: int, value: int) -> None:
        self.write_phys(gpa, value.to_bytes(8, "little"))


class PageTables:
    """Builds 4- or 5-level x86-64 page tables inside FakeRam."""

    def __init__(self, ram: FakeRam, levels: int = 4, pool: int = 0x1_0000) -> None:
        self.ram = ram
        self.levels = levels
        self.next_free = pool
        self.root = self.alloc()

    def alloc(self) -> int:
        gpa = self.next_free
        self.next_free += 4 * KiB
        self.ram.write_phys(gpa, bytes(4 * KiB))
        return gpa

    def entry_gpa(self, gva: int, level: int) -> int:
        """GPA of the entry at `level` on the path of gva (the path must exist)."""
        table = self.root
        for lvl in range(self.levels, level, -1):
            table = self.ram.u64(table + 8 * ((gva >> (12 + 9 * (lvl - 1))) & 0x1FF)) & 0x000F_FFFF_FFFF_F000
        return table + 8 * ((gva >> (12 + 9 * (level - 1))) & 0x1FF)

    def map(self, gva: int, gpa: int, size: int = 4 * KiB, flags: int = P | RW) -> None:
        leaf_level = {4 * KiB: 1, 2 * MiB: 2, 1 * GiB: 3}[size]
        table = self.root
        for lvl in range(self.levels, leaf_level, -1):
            slot = table + 8 * ((gva >> (12 + 9 * (lvl - 1))) & 0x1FF)
            entry = self.ram.u64(slot)
            if not entry & P:
                entry = self.alloc() | P | RW | US  # the leaf decides the rights
                self.ram.set_u64(slot, entry)
            table = entry & 0x000F_FFFF_FFFF_F000
        slot = table + 8 * ((gva >> (12 + 9 * (leaf_level - 1))) & 0x1FF)
        self.ram.set_u64(slot, gpa | flags | (PS if leaf_level > 1 else 0))


def build_guest(levels: int = 4) -> tuple[FakeRam, PageTables]:
    ram = FakeRam()
    pt = PageTables(ram, levels)
    for i in range(16):
        pt.map(KTEXT + i * 4 * KiB, KTEXT_GPA + i * 4 * KiB, flags=P)  # read-only text
    pt.map(KDATA, KDATA_GPA, flags=P | RW | NX)
    # The next page is mapped to a far-away frame, to catch reads that assume contiguity.
    pt.map(KDATA + 0x1000, KDATA_GPA + 0x3000, flags=P | RW | NX)
    pt.map(KDATA + 0x2000, KDATA_GPA + 0x2000, flags=P | NX)  # read-only data
    # KDATA + 0x3000 is left unmapped (its PT entry exists but is not present).
    pt.map(LARGE, LARGE_GPA, size=2 * MiB, flags=P | RW | NX)
    pt.map(USER, 0, size=1 * GiB, flags=P | RW | US)
    return ram, pt


def make_cpu(pt: PageTables, *, rip: int = KTEXT, cpl: int = 0, cr0: int = CR0_LINUX,
             cr4: int = CR4_LINUX, efer: int = EFER_LINUX, rflags: int = 0x2, **regs: int) -> CpuState:
    values = {name: 0 for name in assist_mod.REG_NAMES}
    values.update(rip=rip, rflags=rflags, **regs)
    if pt.levels == 5:
        cr4 |= CR4_LA57
    return CpuState(regs=values, cr0=cr0, cr3=pt.root, cr4=cr4, efer=efer, cpl=cpl,
                    mxcsr=0x1F80)


def run(code: bytes, cpu: CpuState, ram: FakeRam, *, in_exit: bool = True,
        symbols: Symbols | None = None) -> AssistAction:
    """Place `code` at RIP in guest memory and run the assist on a recorded exit."""
    gpa = gva_to_gpa(ram, cpu, cpu.regs["rip"])
    ram.write_phys(gpa, code)
    before = bytes(ram.buf)
    failure = EmulationFailure.recorded(code[:15] if in_exit else None)
    try:
        return assist(failure, cpu, ram, symbols)
    finally:
        assert bytes(ram.buf) == before, "assist() must not write guest memory itself"


def apply_writes(ram: FakeRam, action: AssistAction) -> None:
    for gpa, data in action.mem_writes:
        ram.write_phys(gpa, data)


# ---------------------------------------------------------------------------------------
# Exit parsing


def kvm_exit_bytes(insn: bytes | None, debug_words: tuple[int, ...] = ()) -> bytes:
    """The kvm_run `internal` union as the kernel fills it for an emulation failure."""
    if insn is None:
        return struct.pack("<II", 1, 0) + bytes(8 * 16)
    body = struct.pack("<QB15s", 1, len(insn), insn.ljust(15, b"\x90"))
    words = b"".join(struct.pack("<Q", w) for w in debug_words)
    raw = struct.pack("<II", 1, 3 + len(debug_words)) + body + words
    return raw.ljust(8 + 8 * 16, b"\0")


def test_exit_parsing_matches_kernel_layout():
    raw = kvm_exit_bytes(bytes.fromhex("0f01ca"), debug_words=(0x1234, 0x5678))
    failure = EmulationFailure.from_bytes(raw)
    assert failure.suberror == 1 and failure.ndata == 5
    assert failure.insn_bytes == bytes.fromhex("0f01ca")  # the 0x90 padding is not included
    assert failure.data[3:5] == (0x1234, 0x5678)
    assert EmulationFailure.recorded(bytes.fromhex("0f01ca")).insn_bytes == failure.insn_bytes


def test_exit_without_insn_bytes():
    assert EmulationFailure.from_bytes(kvm_exit_bytes(None)).insn_bytes is None
    # Flag bit clear, or ndata too small for the bytes: ignore what is in the words.
    blob = bytes([1, 0xCC]) + bytes(14)
    words = (0, int.from_bytes(blob[:8], "little"), int.from_bytes(blob[8:], "little"))
    assert EmulationFailure(1, 3, words).insn_bytes is None
    assert EmulationFailure(1, 2, (1,) + words[1:]).insn_bytes is None
    # A bogus insn_size is ignored rather than trusted.
    bad = bytes([16]) + bytes(15)
    assert EmulationFailure(1, 3, (1, int.from_bytes(bad[:8], "little"), 0)).insn_bytes is None


# ---------------------------------------------------------------------------------------
# Completed instructions


@pytest.mark.parametrize("in_exit", [True, False], ids=["bytes-in-exit", "bytes-from-memory"])
def test_int3_injects_bp_after_the_instruction(in_exit):
    ram, pt = build_guest()
    rip = KTEXT + 0x10
    act = run(bytes.fromhex("cc0f0b"), make_cpu(pt, rip=rip), ram, in_exit=in_exit)
    assert act.kind == "int3"
    assert act.inject_exception == (3, None)
    assert act.set_regs == ({"rip": rip + 1} if assist_mod.ADVANCE_RIP_BEFORE_SOFT_EXCEPTION else {})


def test_int3_from_raw_kvm_exit_and_prefix_length():
    ram, pt = build_guest()
    cpu = make_cpu(pt)
    ram.write_phys(KTEXT_GPA, bytes.fromhex("66cc"))
    act = assist(EmulationFailure.from_bytes(kvm_exit_bytes(bytes.fromhex("66cc"))), cpu, ram, None)
    assert act.kind == "int3" and act.set_regs["rip"] == KTEXT + 2  # length from capstone


def test_lock_int3_is_ud():
    ram, pt = build_guest()
    act = run(bytes.fromhex("f0cc"), make_cpu(pt), ram)
    assert act.inject_exception == (6, None) and act.set_regs == {} and act.kind == "int3"


@pytest.mark.parametrize("in_exit", [True, False])
@pytest.mark.parametrize("code,kind,ac_after", [("0f01ca", "clac", 0), ("0f01cb", "stac", RFLAGS_AC)])
def test_clac_stac(code, kind, ac_after, in_exit):
    ram, pt = build_guest()
    for ac_before in (0, RFLAGS_AC):
        cpu = make_cpu(pt, rflags=0x202 | ac_before)
        act = run(bytes.fromhex(code), cpu, ram, in_exit=in_exit)
        assert act.kind == kind and act.inject_exception is None
        assert act.set_regs == {"rip": KTEXT + 3, "rflags": 0x202 | ac_after}


def test_clac_at_cpl3_is_ud():
    ram, pt = build_guest()
    act = run(bytes.fromhex("0f01ca"), make_cpu(pt, cpl=3, rflags=0x202 | RFLAGS_AC), ram)
    assert act.inject_exception == (6, None)
    assert act.set_regs == {}  # a fault: RIP stays on the instruction, AC untouched


def test_clac_with_f3_prefix_is_not_clac():
    ram, pt = build_guest()
    with pytest.raises(AssistFailure, match="ERETU"):
        run(bytes.fromhex("f30f01ca"), make_cpu(pt), ram)


@pytest.mark.parametrize("in_exit", [True, False])
def test_fwait(in_exit):
    ram, pt = build_guest()
    # 9b df e0 is two instructions (fwait; fnstsw ax): only the fwait is completed.
    act = run(bytes.fromhex("9bdfe0"), make_cpu(pt), ram, in_exit=in_exit)
    assert act.kind == "fwait" and act.set_regs == {"rip": KTEXT + 1}
    act = run(bytes.fromhex("9b"), make_cpu(pt, cr0=CR0_LINUX | 0x8), ram)  # MP and TS
    assert act.inject_exception == (7, None) and act.set_regs == {}
    cpu = make_cpu(pt)
    cpu.fsw = 0x0081  # IE flag with ES: an unmasked invalid-operation exception is pending
    act = run(bytes.fromhex("9b"), cpu, ram)
    assert act.inject_exception == (16, None) and act.set_regs == {}
    cpu.fsw = 0x3800  # only TOP bits: nothing pending
    assert run(bytes.fromhex("9b"), cpu, ram).set_regs == {"rip": KTEXT + 1}


@pytest.mark.parametrize("in_exit", [True, False])
def test_ldmxcsr_base_index_scale_disp(in_exit):
    ram, pt = build_guest()
    ram.write_phys(KDATA_GPA + 0x100 + 3 * 8 + 0x10, struct.pack("<I", 0x9FC0))
    cpu = make_cpu(pt, rax=KDATA + 0x100, rcx=3)
    act = run(bytes.fromhex("0fae54c810"), cpu, ram, in_exit=in_exit)  # ldmxcsr [rax+rcx*8+0x10]
    assert act.kind == "ldmxcsr" and act.set_mxcsr == 0x9FC0
    assert act.set_regs == {"rip": KTEXT + 5} and act.inject_exception is None


def test_ldmxcsr_rip_relative():
    ram, pt = build_guest()
    rip = KTEXT + 0x40
    # ldmxcsr [rip+0x1000]: counts from the end of the 7-byte instruction.
    code = bytes.fromhex("0fae15") + struct.pack("<i", 0x1000)
    ram.write_phys(KTEXT_GPA + 0x40 + 7 + 0x1000, struct.pack("<I", 0x1F80 | 0x6000))
    act = run(code, make_cpu(pt, rip=rip), ram)
    assert act.set_mxcsr == 0x7F80 and act.set_regs["rip"] == rip + 7
    # Negative displacement, REX prefix in front (the length still comes from capstone).
    code = bytes.fromhex("410fae15") + struct.pack("<i", -0x48)
    ram.write_phys(KTEXT_GPA + 0x40 + 8 - 0x48, struct.pack("<I", 0x1F81))
    act = run(code, make_cpu(pt, rip=rip), ram)
    assert act.set_mxcsr == 0x1F81 and act.set_regs["rip"] == rip + 8


def test_ldmxcsr_gs_relative_and_crossing_pages():
    ram, pt = build_guest()
    # ldmxcsr gs:[0xffe]: the dword straddles two pages whose frames are not adjacent.
    code = bytes.fromhex("650fae142500000000")
    code = code[:5] + struct.pack("<i", 0xFFE)
    ram.write_phys(KDATA_GPA + 0xFFE, b"\x80\x1f")
    ram.write_phys(KDATA_GPA + 0x3000, b"\x00\x00")
    cpu = make_cpu(pt)
    cpu.gs_base = KDATA
    act = run(code, cpu, ram)
    assert act.set_mxcsr == 0x1F80 and act.set_regs["rip"] == KTEXT + 9


def test_ldmxcsr_reserved_bits_gp():
    ram, pt = build_guest()
    ram.write_phys(KDATA_GPA, struct.pack("<I", 0x1_1F80))
    act = run(bytes.fromhex("0fae10"), make_cpu(pt, rax=KDATA), ram)
    assert act.inject_exception == (13, 0) and act.set_mxcsr is None and act.set_regs == {}


def test_ldmxcsr_faults():
    ram, pt = build_guest()
    code = bytes.fromhex("0fae10")  # ldmxcsr [rax]
    act = run(code, make_cpu(pt, rax=KDATA + 0x3010), ram)  # not-present page
    assert act.inject_exception == (14, 0) and act.set_cr2 == KDATA + 0x3010
    act = run(code, make_cpu(pt, rax=0x0000_8000_0000_0000), ram)  # non-canonical
    assert act.inject_exception == (13, 0)
    act = run(bytes.fromhex("0fae5500"), make_cpu(pt, rbp=0x0000_8000_0000_0000), ram)
    assert act.inject_exception == (12, 0)  # [rbp]: an SS access
    act = run(code, make_cpu(pt, rax=KDATA, cr4=CR4_LINUX & ~(1 << 9)), ram)  # no OSFXSR
    assert act.inject_exception == (6, None)
    act = run(code, make_cpu(pt, rax=KDATA, cr0=CR0_LINUX | 0x8), ram)  # CR0.TS
    assert act.inject_exception == (7, None)
    # SMAP: a supervisor read of a user page faults unless RFLAGS.AC is set.
    ram.write_phys(0x5000, struct.pack("<I", 0x1F80))
    cpu = make_cpu(pt, rax=USER + 0x5000, cr4=CR4_LINUX | CR4_SMAP)
    assert run(code, cpu, ram).inject_exception == (14, X86_PF_PROT)
    cpu = make_cpu(pt, rax=USER + 0x5000, cr4=CR4_LINUX | CR4_SMAP, rflags=0x2 | RFLAGS_AC)
    assert run(code, cpu, ram).set_mxcsr == 0x1F80


def test_ldmxcsr_from_user_mode_on_supervisor_page():
    ram, pt = build_guest()
    cpu = make_cpu(pt, rax=KDATA, cpl=3)
    act = run(bytes.fromhex("0fae10"), cpu, ram)
    assert act.inject_exception == (14, X86_PF_USER | X86_PF_PROT)


def test_ldmxcsr_operand_in_mmio_fails_with_report():
    ram, pt = build_guest()
    pt.map(KDATA + 0x5000, 0xFEE0_0000, flags=P | RW)  # the local APIC, not RAM
    with pytest.raises(AssistFailure, match="not guest RAM"):
        run(bytes.fromhex("0fae10"), make_cpu(pt, rax=KDATA + 0x5000), ram)


def test_ldmxcsr_exit_bytes_truncated_falls_back_to_memory():
    ram, pt = build_guest()
    ram.write_phys(KDATA_GPA, struct.pack("<I", 0x1FA0))
    cpu = make_cpu(pt, rax=KDATA, rcx=0)
    code = bytes.fromhex("0fae54c800")
    ram.write_phys(KTEXT_GPA, code)
    act = assist(EmulationFailure.recorded(code[:2]), cpu, ram, None)
    assert act.set_mxcsr == 0x1FA0 and act.set_regs["rip"] == KTEXT + 5


def test_ldmxcsr_32bit_code_with_segment_base():
    ram, pt = build_guest()
    # 32-bit protected mode, paging off: linear = DS.base + EA, wrapping at 4 GiB.
    cpu = make_cpu(pt, rip=0x1000, cr0=0x33, efer=0, rax=0x100, rbp=0x200)
    cpu.cs_l, cpu.cs_db, cpu.ds_base, cpu.ss_base = False, True, 0x30_0000, 0x31_0000
    ram.write_phys(0x30_0100, struct.pack("<I", 0x1F81))
    ram.write_phys(0x31_01F0, struct.pack("<I", 0x1F82))
    assert run(bytes.fromhex("0fae10"), cpu, ram).set_mxcsr == 0x1F81  # [eax] -> DS
    act = run(bytes.fromhex("0fae55f0"), cpu, ram)  # [ebp-0x10] -> SS
    assert act.set_mxcsr == 0x1F82 and act.set_regs["rip"] == 0x1004


def test_ldmxcsr_honours_the_cpus_mxcsr_mask():
    ram, pt = build_guest()
    ram.write_phys(KDATA_GPA, struct.pack("<I", 0x1F80 | 1 << 17))  # MM: valid on AMD only
    cpu = make_cpu(pt, rax=KDATA)
    assert run(bytes.fromhex("0fae10"), cpu, ram).inject_exception == (13, 0)
    cpu.mxcsr_mask = 0x2FFFF
    assert run(bytes.fromhex("0fae10"), cpu, ram).set_mxcsr == 0x21F80


def test_mxcsr_xsave_helpers_and_from_kvm():
    from types import SimpleNamespace as NS
    xsave = bytearray(4096)
    xsave[24:32] = struct.pack("<II", 0x1F80, 0x2FFFF)
    xsave[2:4] = struct.pack("<H", 0x3800)
    assert assist_mod.mxcsr_from_xsave(xsave) == (0x1F80, 0x2FFFF)
    assist_mod.set_mxcsr_in_xsave(xsave, 0x9FC0)
    assert xsave[24:28] == struct.pack("<I", 0x9FC0)
    assert struct.unpack_from("<Q", xsave, 512)[0] & 2  # XSTATE_BV.SSE, or KVM ignores MXCSR
    zero_mask = bytearray(4096)
    assert assist_mod.mxcsr_from_xsave(zero_mask)[1] == 0xFFBF
    seg = lambda base, **kw: NS(base=base, l=kw.get("l", 0), db=kw.get("db", 0), dpl=kw.get("dpl", 0))
    regs = NS(**{n: i for i, n in enumerate(assist_mod.REG_NAMES)})
    regs.rflags = 0x202
    sregs = NS(cr0=CR0_LINUX, cr3=0x1000, cr4=CR4_LINUX, efer=EFER_LINUX, cs=seg(0, l=1),
               ds=seg(0), es=seg(0), fs=seg(0x7000), gs=seg(0x8000), ss=seg(0, dpl=3))
    cpu = CpuState.from_kvm(regs, sregs, bytes(xsave))
    assert cpu.cpl == 3 and cpu.cs_l and cpu.gs_base == 0x8000 and cpu.regs["rcx"] == 2
    assert (cpu.mxcsr, cpu.mxcsr_mask, cpu.fsw) == (0x9FC0, 0x2FFFF, 0x3800)
    assert CpuState.from_kvm(regs, sregs).mxcsr is None


def test_stmxcsr_writes_across_pages():
    ram, pt = build_guest()
    cpu = make_cpu(pt, rax=KDATA + 0xFFD)
    cpu.mxcsr = 0xA1B2C3D4
    act = run(bytes.fromhex("0fae18"), cpu, ram)  # stmxcsr [rax]
    assert act.kind == "stmxcsr" and act.set_regs == {"rip": KTEXT + 3}
    apply_writes(ram, act)
    assert read_virt(ram, cpu, KDATA + 0xFFD, 4) == struct.pack("<I", 0xA1B2C3D4)
    assert ram.read_phys(KDATA_GPA + 0x3000, 1) == b"\xa1"
    # A read-only page (CR0.WP) faults with P|W before anything is written.
    act = run(bytes.fromhex("0fae18"), make_cpu(pt, rax=KDATA + 0x2000), ram)
    assert act.inject_exception == (14, X86_PF_PROT | X86_PF_WRITE) and act.mem_writes == []


CMPXCHG16B_RSI = bytes.fromhex("f0480fc70e")  # lock cmpxchg16b [rsi]


def test_cmpxchg16b_equal():
    ram, pt = build_guest()
    ram.write_phys(KDATA_GPA + 0x40, struct.pack("<QQ", 0x1111, 0x2222))
    cpu = make_cpu(pt, rsi=KDATA + 0x40, rax=0x1111, rdx=0x2222, rbx=0x3333, rcx=0x4444,
                   rflags=0x2)
    act = run(CMPXCHG16B_RSI, cpu, ram)
    assert act.kind == "cmpxchg16b"
    assert act.set_regs == {"rip": KTEXT + 5, "rflags": 0x2 | RFLAGS_ZF}
    apply_writes(ram, act)
    assert ram.read_phys(KDATA_GPA + 0x40, 16) == struct.pack("<QQ", 0x3333, 0x4444)


def test_cmpxchg16b_unequal():
    ram, pt = build_guest()
    ram.write_phys(LARGE_GPA + 0x12340, struct.pack("<QQ", 0xAAAA, 0xBBBB))
    cpu = make_cpu(pt, rsi=LARGE + 0x12340, rax=0xAAAA, rdx=0x2222, rbx=1, rcx=2,
                   rflags=0x2 | RFLAGS_ZF)
    act = run(bytes.fromhex("480fc70e"), cpu, ram)  # without lock, on a 2 MiB page
    assert act.mem_writes == []
    assert act.set_regs == {"rip": KTEXT + 4, "rflags": 0x2, "rax": 0xAAAA, "rdx": 0xBBBB}


def test_cmpxchg16b_misaligned_and_read_only():
    ram, pt = build_guest()
    act = run(CMPXCHG16B_RSI, make_cpu(pt, rsi=KDATA + 0x48), ram)
    assert act.inject_exception == (13, 0) and act.set_regs == {} and act.mem_writes == []
    # Equal or not, the CPU always writes, so a read-only page faults.
    act = run(CMPXCHG16B_RSI, make_cpu(pt, rsi=KDATA + 0x2000), ram)
    assert act.inject_exception == (14, X86_PF_PROT | X86_PF_WRITE)
    assert act.set_cr2 == KDATA + 0x2000


# ---------------------------------------------------------------------------------------
# Failure reports

SYSTEM_MAP = """\
ffffffff81000000 T _stext
ffffffff81000000 T startup_64
ffffffff81000100 t helper_local
ffffffff81000200 T crc_update
ffffffff81000280 D some_data
ffffffff81000300 t local_alias
ffffffff81000300 W weak_fn
ffffffff81000400 T _etext
not a line
"""


@pytest.fixture
def symbols(tmp_path):
    path = tmp_path / "System.map"
    path.write_text(SYSTEM_MAP)
    return Symbols.load(path)


def test_report_for_vex_andn(symbols):
    ram, pt = build_guest()
    code = bytes.fromhex("c4e278f2c1")  # andn eax, eax, ecx
    with pytest.raises(AssistFailure) as info:
        run(code, make_cpu(pt, rip=KTEXT + 0x21A), ram, symbols=symbols)
    text = str(info.value)
    assert f"RIP {KTEXT + 0x21A:#x}" in text
    assert "c4 e2 78 f2 c1" in text
    assert "`andn eax, eax, ecx`" in text
    assert "crc_update+0x1a/0x80" in text
    assert "VEX" in text and "clearcpuid=bmi1" in text
    assert info.value.symbol == "crc_update+0x1a/0x80" and info.value.mnemonic == "andn"


def test_report_for_xrstor_without_insn_bytes(symbols):
    ram, pt = build_guest()
    with pytest.raises(AssistFailure) as info:
        run(bytes.fromhex("0fae2f"), make_cpu(pt, rip=KTEXT + 0x104), ram, in_exit=False,
            symbols=symbols)
    text = str(info.value)
    assert "0f ae 2f (read from guest memory)" in text
    assert "`xrstor ptr [rdi]`" in text and "not completed" in text
    assert "clearcpuid=xsave" in text and "helper_local+0x4/0x100" in text


def test_report_for_avx_and_unknown(symbols):
    ram, pt = build_guest()
    with pytest.raises(AssistFailure, match="clearcpuid=avx2"):
        run(bytes.fromhex("c5fdfec1"), make_cpu(pt), ram)  # vpaddd ymm0, ymm0, ymm1
    with pytest.raises(AssistFailure, match=r"does not complete `ud2`.*int3, clac"):
        run(bytes.fromhex("0f0b"), make_cpu(pt), ram)
    with pytest.raises(AssistFailure, match="not decodable by capstone"):
        run(bytes.fromhex("0f04"), make_cpu(pt), ram)


def test_report_when_rip_is_unmapped():
    ram, pt = build_guest()
    cpu = make_cpu(pt, rip=UNMAPPED)
    with pytest.raises(AssistFailure, match="Cannot fetch the instruction.*not present"):
        assist(EmulationFailure.recorded(None), cpu, ram, None)
    # With the bytes in the exit the RIP need not be mapped.
    act = assist(EmulationFailure.recorded(b"\xcc"), cpu, ram, None)
    assert act.kind == "int3"


def test_other_internal_error_is_reported():
    ram, pt = build_guest()
    with pytest.raises(AssistFailure, match="KVM_INTERNAL_ERROR_DELIVERY_EV"):
        assist(EmulationFailure(3, 0, ()), make_cpu(pt), ram, None)


def test_stats():
    ram, pt = build_guest()
    stats = AssistStats()
    stats.record(run(b"\xcc", make_cpu(pt), ram))
    stats.record(run(bytes.fromhex("0f01ca"), make_cpu(pt), ram))
    stats.record(run(bytes.fromhex("0f01ca"), make_cpu(pt, cpl=3), ram))
    try:
        run(bytes.fromhex("0f0b"), make_cpu(pt), ram)
    except AssistFailure as exc:
        stats.record_failure(exc)
    assert stats.as_dict() == {"clac": 2, "failed": 1, "inject:#BP": 1, "inject:#UD": 1, "int3": 1}


# ---------------------------------------------------------------------------------------
# Page walk


@pytest.mark.parametrize("levels", [4, 5])
def test_walk_not_present_at_each_level(levels):
    for level in range(levels, 0, -1):
        ram, pt = build_guest(levels)
        cpu = make_cpu(pt)
        gva = KDATA + 0x10
        slot = pt.entry_gpa(gva, level)
        ram.set_u64(slot, ram.u64(slot) & ~P)
        with pytest.raises(PageFault) as info:
            translate(ram, cpu, gva, Access(write=True))
        assert info.value.level == level and info.value.gva == gva
        assert info.value.error_code == X86_PF_WRITE  # not present: P clear


def test_walk_large_pages_and_5_level():
    for levels in (4, 5):
        ram, pt = build_guest(levels)
        cpu = make_cpu(pt)
        tr = translate(ram, cpu, LARGE + 0x1_2345)
        assert (tr.gpa, tr.page_size, tr.level) == (LARGE_GPA + 0x1_2345, 2 * MiB, 2)
        tr = translate(ram, cpu, USER + 0x6_5432)
        assert (tr.gpa, tr.page_size, tr.level, tr.user) == (0x6_5432, GiB, 3, True)
        assert gva_to_gpa(ram, cpu, KTEXT + 0x3123) == KTEXT_GPA + 0x3123
    # Bit 12 of a large-page entry is PAT, not part of the frame address.
    pt.map(LARGE + 2 * MiB, LARGE_GPA | (1 << 12), size=2 * MiB)
    assert gva_to_gpa(ram, cpu, LARGE + 2 * MiB + 0x10) == LARGE_GPA + 0x10


def test_walk_reserved_bits():
    ram, pt = build_guest()
    cpu = make_cpu(pt)
    slot = pt.entry_gpa(KDATA, 4)
    ram.set_u64(slot, ram.u64(slot) | PS)  # PS is reserved in a PML4E
    with pytest.raises(PageFault) as info:
        translate(ram, cpu, KDATA)
    assert info.value.level == 4 and info.value.error_code & X86_PF_RSVD
    ram, pt = build_guest()
    slot = pt.entry_gpa(LARGE, 2)
    ram.set_u64(slot, ram.u64(slot) | (1 << 14))  # inside a 2 MiB frame address
    with pytest.raises(PageFault, match="reserved"):
        translate(ram, make_cpu(pt), LARGE)
    # NX is reserved unless EFER.NXE.
    ram, pt = build_guest()
    with pytest.raises(PageFault, match="reserved"):
        translate(ram, make_cpu(pt, efer=EFER_LINUX & ~(1 << 11)), KDATA)


def test_walk_rights():
    ram, pt = build_guest()
    cpu = make_cpu(pt)
    with pytest.raises(PageFault) as info:
        translate(ram, cpu, KDATA, Access(fetch=True))
    assert info.value.error_code == X86_PF_PROT | X86_PF_INSTR
    translate(ram, cpu, KTEXT, Access(fetch=True))
    smep = make_cpu(pt, cr4=CR4_LINUX | CR4_SMEP)
    with pytest.raises(PageFault, match="SMEP"):
        translate(ram, smep, USER, Access(fetch=True))
    translate(ram, cpu, USER, Access(fetch=True, user=True))
    no_wp = make_cpu(pt, cr0=CR0_LINUX & ~(1 << 16))
    translate(ram, no_wp, KDATA + 0x2000, Access(write=True))  # WP clear: supervisor may write
    with pytest.raises(PageFault):
        translate(ram, no_wp, KDATA + 0x2000, Access(write=True, user=True))


def test_read_virt_crosses_pages_and_wraps_errors():
    ram, pt = build_guest()
    cpu = make_cpu(pt)
    ram.write_phys(KDATA_GPA + 0xFF0, bytes(range(16)))
    ram.write_phys(KDATA_GPA + 0x3000, bytes(range(16, 32)))
    assert read_virt(ram, cpu, KDATA + 0xFF0, 32) == bytes(range(32))
    with pytest.raises(PageFault) as info:
        read_virt(ram, cpu, KDATA + 0x2FF8, 16)  # second page not present
    assert info.value.gva == KDATA + 0x3000 and info.value.level == 1
    with pytest.raises(NonCanonicalAddress):
        read_virt(ram, cpu, 0x0000_7FFF_FFFF_FFFC, 8)
    cpu.cr3 = 0x7000_0000  # page tables outside RAM
    with pytest.raises(PhysAccessError, match="PML4 entry"):
        translate(ram, cpu, KDATA)


def test_walk_pae_and_32bit():
    ram = FakeRam()
    # PAE: CR3 -> 4 PDPTEs at 0x1000 (32-byte aligned); PD at 0x2000, PT at 0x3000.
    ram.set_u64(0x1000 + 8 * 3, 0x2000 | P)  # PDPTE 3 covers 0xC0000000..
    ram.set_u64(0x2000 + 8 * 1, 0x3000 | P | RW)  # PDE 1: 0xC0200000 -> PT
    ram.set_u64(0x3000 + 8 * 5, 0x7_5000 | P | RW)
    ram.set_u64(0x2000 + 8 * 2, 0x60_0000 | P | RW | PS)  # 2 MiB page at 0xC0400000
    pae = CpuState(regs={n: 0 for n in assist_mod.REG_NAMES}, cr0=0x8000_0011, cr3=0x1000,
                   cr4=1 << 5, efer=0, cs_l=False, cs_db=True)
    assert gva_to_gpa(ram, pae, 0xC020_5123) == 0x7_5123
    assert gva_to_gpa(ram, pae, 0xC041_0000) == 0x61_0000
    with pytest.raises(PageFault) as info:
        gva_to_gpa(ram, pae, 0x4000_0000)
    assert info.value.level == 3
    # 32-bit paging: PD at 0x4000; a 4 KiB page and (with CR4.PSE) a 4 MiB page.
    ram.write_phys(0x4000 + 4 * 0x300, struct.pack("<I", 0x5000 | P))
    ram.write_phys(0x5000 + 4 * 2, struct.pack("<I", 0x8_8000 | P))
    ram.write_phys(0x4000 + 4 * 0x301, struct.pack("<I", 0x40_0000 | P | PS))
    legacy = CpuState(regs={n: 0 for n in assist_mod.REG_NAMES}, cr0=0x8000_0011, cr3=0x4000,
                      cr4=1 << 4, efer=0, cs_l=False, cs_db=True)
    assert gva_to_gpa(ram, legacy, 0xC000_2ABC) == 0x8_8ABC
    assert gva_to_gpa(ram, legacy, 0xC04A_BCDE) == 0x4A_BCDE
    with pytest.raises(PageFault) as info:
        gva_to_gpa(ram, legacy, 0xC000_3000)
    assert info.value.level == 1


# ---------------------------------------------------------------------------------------
# Symbols


def test_symbols_lookup(symbols):
    assert symbols.lookup(0xFFFF_FFFF_8100_0010) == "_stext+0x10/0x100"  # first global alias
    assert symbols.lookup(0xFFFF_FFFF_8100_0300) == "weak_fn+0x0/0x100"  # global beats local alias
    assert symbols.lookup(0xFFFF_FFFF_8100_0290) is None  # in some_data, not in a function
    assert symbols.lookup(0xFFFF_FFFF_80FF_FFFF) is None
    assert symbols.lookup(0xFFFF_FFFF_8100_0400) == "_etext+0x0/0x0"
    assert symbols.lookup(0xFFFF_FFFF_8100_0401) is None
    assert len(symbols) == 5


def test_symbols_are_loaded_lazily(tmp_path):
    path = tmp_path / "System.map"
    path.write_text(SYSTEM_MAP)
    syms = Symbols.load(path)
    path.unlink()  # not read yet: the lookup finds no file and degrades to "unknown"
    assert syms.lookup(0xFFFF_FFFF_8100_0010) is None
    with pytest.raises(FileNotFoundError):
        Symbols.load(path)
    assert Symbols.from_lines(SYSTEM_MAP.splitlines()).lookup(0xFFFF_FFFF_8100_0201) == \
        "crc_update+0x1/0x80"


# ---------------------------------------------------------------------------------------
# Robustness: arbitrary bytes and registers never escape as anything but AssistFailure

_PREFIXES = ["", "f0", "66", "f2", "f3", "48", "67", "64", "65", "f048", "66f3"]
_OPCODES = ["cc", "9b", "0f01ca", "0f01cb", "0fae", "0fc7", "c4", "c5", "62", "8f", "0f",
            # ldmxcsr/stmxcsr/cmpxchg16b with every addressing form (ModRM; SIB/disp from the tail)
            "0fae10", "0fae14", "0fae15", "0fae54", "0fae94", "0fae18", "0fae1c", "0fae5d",
            "480fc70e", "480fc70c", "480fc74c", "480fc78e", "480fc70d", "4c0fc70c"]
_INTERESTING = [0, 1, 0xFFF, 0xFFFF_FFFF, 1 << 63, (1 << 64) - 1, KDATA, KDATA + 0xFF8,
                KDATA + 0x2FFE, LARGE + 0x10, USER + 0x1000, UNMAPPED, 0x0000_8000_0000_0000]

instruction_bytes = st.one_of(
    st.binary(min_size=1, max_size=15),
    st.builds(lambda p, o, tail: (bytes.fromhex(p + o) + tail)[:15],
              st.sampled_from(_PREFIXES), st.sampled_from(_OPCODES), st.binary(max_size=12)),
)
register_value = st.one_of(st.sampled_from(_INTERESTING), st.integers(0, (1 << 64) - 1))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    code=instruction_bytes,
    in_exit=st.booleans(),
    regs=st.fixed_dictionaries({n: register_value for n in assist_mod.GPR_NAMES}),
    rflags=st.integers(0, (1 << 32) - 1),
    rip=st.sampled_from([KTEXT, KTEXT, KTEXT, KTEXT + 0xFFE, UNMAPPED, 0x1000, 1 << 47]),
    mode=st.sampled_from(["64", "32", "16", "32-pae", "random-cr3", "la57"]),
    cpl=st.sampled_from([0, 3]),
    cr0_extra=st.sampled_from([0, 0x4, 0x8, 0x2_0000]),
    cr4_extra=st.sampled_from([0, CR4_SMAP, CR4_SMEP, 1 << 9]),
    seg_base=register_value,
    mxcsr=st.one_of(st.none(), st.integers(0, (1 << 32) - 1)),
    fsw=st.one_of(st.none(), st.integers(0, 0xFFFF)),
)
def test_assist_never_raises_anything_but_assist_failure(
        code, in_exit, regs, rflags, rip, mode, cpl, cr0_extra, cr4_extra, seg_base, mxcsr, fsw):
    ram, pt = _ROBUST_GUEST
    cpu = make_cpu(pt, rip=rip, cpl=cpl, rflags=rflags, cr0=CR0_LINUX ^ cr0_extra,
                   cr4=CR4_LINUX ^ cr4_extra, **regs)
    cpu.fs_base = cpu.gs_base = cpu.ds_base = cpu.ss_base = cpu.cs_base = seg_base
    cpu.mxcsr, cpu.fsw = mxcsr, fsw
    if mode in ("32", "16", "32-pae"):
        cpu.cs_l, cpu.cs_db, cpu.efer = False, mode != "16", 0
        if mode == "32":
            cpu.cr0 &= ~(1 << 31)
    elif mode == "random-cr3":
        cpu.cr3 = regs["rax"]
    elif mode == "la57":
        cpu.cr4 |= CR4_LA57
    ram.buf[KTEXT_GPA:KTEXT_GPA + len(code)] = code
    ram.buf[KTEXT_GPA + 0xFFE:KTEXT_GPA + 0xFFE + len(code)] = code
    failure = EmulationFailure.recorded(code if in_exit else None)
    try:
        action = assist(failure, cpu, ram, None)
    except AssistFailure as exc:
        assert str(exc).startswith("emulation assist cannot complete")
        return
    assert isinstance(action, AssistAction)
    assert action.kind in assist_mod.COMPLETED_KINDS
    if action.inject_exception is None:
        assert "rip" in action.set_regs  # completed instructions always advance


_ROBUST_GUEST = build_guest()
