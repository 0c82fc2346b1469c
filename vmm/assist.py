"""The emulation assist: complete, in user space, an instruction KVM's emulator rejected.

When KVM cannot emulate a guest instruction it exits with KVM_EXIT_INTERNAL_ERROR,
suberror KVM_INTERNAL_ERROR_EMULATION. On the PVM host that happens for ordinary kernel
code (KVM interprets all CPL0 code); on a VMX/SVM host it happens when an MMIO access
uses an instruction the emulator lacks. `assist()` is the one mechanism for both:

1. get the instruction bytes: from the exit when KVM supplied them, else from guest
   memory at CS.base+RIP through a software page walk (`vmm.pagewalk`);
2. decode them with capstone (length, operands, addressing);
3. return an `AssistAction` the vCPU code applies (registers, MXCSR, guest-physical
   writes, an exception to inject), or raise `AssistFailure` whose text is a
   one-paragraph report (RIP, bytes, disassembly, symbol, and why).

Completed: int3, clac/stac, fwait, ldmxcsr/stmxcsr, cmpxchg16b. Everything else fails
with the report. `assist()` is a pure function of its inputs (no KVM, no globals that
change), so it is unit-tested from recorded exits.

Assumptions and limits, stated once:
- fwait raises #MF only when the snapshot carries the x87 status word (`CpuState.fsw`,
  from KVM_GET_XSAVE) showing a pending unmasked exception; without it, no exception is
  assumed pending and fwait completes as a no-op. (Linux runs fwait in fpu__drop with an
  exception-table fixup, so either outcome is safe there.)
- cmpxchg16b reads, compares and writes in three steps: it is atomic only against other
  assists (the vCPU code serialises them with one lock), not against other vCPUs running
  natively or inside KVM's emulator. SMP guests should keep cx16 hidden (clearcpuid=cx16).
- Segment limits are not checked (flat segments); alignment checking (#AC) is not
  modelled; paging A/D bits are not set (see `vmm.pagewalk`).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import capstone
from capstone import x86 as cs_x86

from vmm.kvm_abi import (
    KVM_INTERNAL_ERROR_DELIVERY_EV,
    KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
    KVM_INTERNAL_ERROR_SIMUL_EX,
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON,
)
from vmm.pagewalk import (
    DEFAULT_MAXPHYADDR,
    EFER_LMA,
    SUPERVISOR_PEEK,
    Access,
    GuestMemory,
    NonCanonicalAddress,
    PageFault,
    PhysAccessError,
    WalkError,
    X86_CR4_LA57,
    is_canonical,
    read_phys_checked,
    translate,
    translate_range,
)
from vmm.symbols import Symbols

__all__ = [
    "ADVANCE_RIP_BEFORE_SOFT_EXCEPTION",
    "AssistAction",
    "AssistFailure",
    "AssistStats",
    "CpuState",
    "EmulationFailure",
    "GuestMemory",
    "assist",
    "mxcsr_from_xsave",
    "set_mxcsr_in_xsave",
]

# int3 is a trap: the #BP frame holds the address *after* the int3. KVM_SET_VCPU_EVENTS
# injects it like a hardware exception, which pushes the current RIP, so the assist
# advances RIP first. If a host's KVM turns out to add the instruction length itself
# when it injects a soft exception, set this to False (the only place that decides it).
ADVANCE_RIP_BEFORE_SOFT_EXCEPTION = True

# Exception vectors (the kernel's X86_TRAP_*).
X86_TRAP_BP = 3
X86_TRAP_UD = 6
X86_TRAP_NM = 7
X86_TRAP_SS = 12
X86_TRAP_GP = 13
X86_TRAP_PF = 14
X86_TRAP_MF = 16
TRAP_NAMES = {X86_TRAP_BP: "BP", X86_TRAP_UD: "UD", X86_TRAP_NM: "NM", X86_TRAP_SS: "SS",
              X86_TRAP_GP: "GP", X86_TRAP_PF: "PF", X86_TRAP_MF: "MF"}

X86_EFLAGS_ZF = 1 << 6
X86_EFLAGS_VM = 1 << 17
X86_EFLAGS_AC = 1 << 18
X86_CR0_PE = 1 << 0
X86_CR0_MP = 1 << 1
X86_CR0_EM = 1 << 2
X86_CR0_TS = 1 << 3
X86_CR0_NE = 1 << 5
X87_FSW_ES = 1 << 7  # error summary: an unmasked x87 exception is pending
X86_CR4_OSFXSR = 1 << 9

# MXCSR bits assumed writable when the CPU's MXCSR_MASK was not captured: Intel CPUs
# report 0xFFFF; AMD adds bit 17 (MM), so capture the real mask (mxcsr_from_xsave).
MXCSR_DEFAULT_MASK = 0xFFFF
X86_MAX_INSN_LEN = 15
U64 = (1 << 64) - 1

SUBERROR_NAMES = {
    KVM_INTERNAL_ERROR_EMULATION: "KVM_INTERNAL_ERROR_EMULATION",
    KVM_INTERNAL_ERROR_SIMUL_EX: "KVM_INTERNAL_ERROR_SIMUL_EX",
    KVM_INTERNAL_ERROR_DELIVERY_EV: "KVM_INTERNAL_ERROR_DELIVERY_EV",
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON",
}

GPR_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
REG_NAMES = GPR_NAMES + ("rip", "rflags")


# ---------------------------------------------------------------------------------------
# Inputs and outputs


@dataclass(frozen=True)
class EmulationFailure:
    """The `internal` part of a KVM_EXIT_INTERNAL_ERROR exit.

    `data` is kvm_run.internal.data[] (u64 words). For an emulation failure the words
    overlay `struct kvm_run.emulation_failure`: data[0] = flags, then insn_size (u8) and
    insn_bytes[15]. KVM pads insn_bytes past insn_size, so only the first insn_size count.
    """

    suberror: int
    ndata: int = 0
    data: tuple[int, ...] = ()

    @classmethod
    def from_bytes(cls, raw: bytes) -> EmulationFailure:
        """Parse the raw kvm_run union bytes (u32 suberror, u32 ndata, u64 data[])."""
        if len(raw) < 8:
            raise ValueError(f"internal-error exit data too short: {len(raw)} bytes")
        suberror = int.from_bytes(raw[0:4], "little")
        ndata = int.from_bytes(raw[4:8], "little")
        words = tuple(int.from_bytes(raw[i:i + 8], "little") for i in range(8, len(raw) - 7, 8))
        return cls(suberror, ndata, words)

    @classmethod
    def recorded(cls, insn: bytes | None) -> EmulationFailure:
        """An emulation-failure exit as KVM builds it, with or without instruction bytes."""
        if insn is None:
            return cls(KVM_INTERNAL_ERROR_EMULATION, 0, ())
        if not 1 <= len(insn) <= X86_MAX_INSN_LEN:
            raise ValueError(f"instruction bytes must be 1..15 long, not {len(insn)}")
        blob = bytes([len(insn)]) + insn.ljust(X86_MAX_INSN_LEN, b"\x90")
        words = (KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
                 int.from_bytes(blob[:8], "little"), int.from_bytes(blob[8:], "little"))
        return cls(KVM_INTERNAL_ERROR_EMULATION, 3, words)

    @property
    def flags(self) -> int:
        return self.data[0] if self.ndata >= 1 and self.data else 0

    @property
    def insn_bytes(self) -> bytes | None:
        """The instruction bytes KVM fetched, or None when the exit does not carry them."""
        if self.suberror != KVM_INTERNAL_ERROR_EMULATION or self.ndata < 3 or len(self.data) < 3:
            return None
        if not self.flags & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
            return None
        blob = (self.data[1] & U64).to_bytes(8, "little") + (self.data[2] & U64).to_bytes(8, "little")
        size = blob[0]
        if not 1 <= size <= X86_MAX_INSN_LEN:
            return None
        return blob[1:1 + size]


@dataclass
class CpuState:
    """A snapshot of the vCPU registers the assist needs (KVM_GET_REGS/SREGS/XSAVE)."""

    regs: dict[str, int]  # REG_NAMES
    cr0: int
    cr3: int
    cr4: int
    efer: int
    cs_base: int = 0
    cs_l: bool = True
    cs_db: bool = False
    cpl: int = 0
    ds_base: int = 0
    es_base: int = 0
    fs_base: int = 0
    gs_base: int = 0
    ss_base: int = 0
    mxcsr: int | None = None  # needed only by stmxcsr
    mxcsr_mask: int = MXCSR_DEFAULT_MASK  # the CPU's MXCSR_MASK (0x2FFFF on AMD: bit 17 is MM)
    fsw: int | None = None  # x87 status word, for fwait's pending-exception check
    maxphyaddr: int = DEFAULT_MAXPHYADDR

    def __post_init__(self) -> None:
        missing = [n for n in REG_NAMES if n not in self.regs]
        if missing:
            raise ValueError(f"CpuState.regs lacks {', '.join(missing)}")

    @classmethod
    def from_kvm(cls, regs: Any, sregs: Any, xsave: bytes | None = None) -> CpuState:
        """Build from struct kvm_regs / kvm_sregs (kernel field names) and a KVM_GET_XSAVE buffer.

        MXCSR and the x87 status word come from the XSAVE buffer: KVM_GET_FPU leaves
        kvm_fpu.mxcsr zero.
        """
        values = {name: int(getattr(regs, name)) & U64 for name in REG_NAMES}
        cr0 = int(sregs.cr0)
        if not cr0 & X86_CR0_PE:
            cpl = 0
        elif values["rflags"] & X86_EFLAGS_VM:
            cpl = 3
        else:
            cpl = int(sregs.ss.dpl)  # SS.DPL is the CPL in protected mode (KVM's view too)
        mxcsr, mxcsr_mask, fsw = None, MXCSR_DEFAULT_MASK, None
        if xsave is not None:
            mxcsr, mxcsr_mask = mxcsr_from_xsave(xsave)
            fsw = int.from_bytes(xsave[XSAVE_FSW_OFFSET:XSAVE_FSW_OFFSET + 2], "little")
        return cls(
            regs=values, cr0=cr0, cr3=int(sregs.cr3), cr4=int(sregs.cr4), efer=int(sregs.efer),
            cs_base=int(sregs.cs.base), cs_l=bool(sregs.cs.l), cs_db=bool(sregs.cs.db), cpl=cpl,
            ds_base=int(sregs.ds.base), es_base=int(sregs.es.base), fs_base=int(sregs.fs.base),
            gs_base=int(sregs.gs.base), ss_base=int(sregs.ss.base),
            mxcsr=mxcsr, mxcsr_mask=mxcsr_mask, fsw=fsw,
        )


# MXCSR lives in the legacy (FXSAVE-format) part of the KVM_GET/SET_XSAVE buffer. KVM_GET_FPU
# and KVM_SET_FPU ignore kvm_fpu.mxcsr, so the XSAVE ioctls are the way to read and write it.
XSAVE_FSW_OFFSET = 2
XSAVE_MXCSR_OFFSET = 24
XSAVE_MXCSR_MASK_OFFSET = 28
XSAVE_HDR_XSTATE_BV_OFFSET = 512
XFEATURE_MASK_SSE = 1 << 1
MXCSR_MASK_IF_ZERO = 0xFFBF  # what a zero MXCSR_MASK means (no DAZ support)


def mxcsr_from_xsave(xsave: bytes) -> tuple[int, int]:
    """(MXCSR, MXCSR_MASK) from a KVM_GET_XSAVE buffer."""
    mxcsr = int.from_bytes(xsave[XSAVE_MXCSR_OFFSET:XSAVE_MXCSR_OFFSET + 4], "little")
    mask = int.from_bytes(xsave[XSAVE_MXCSR_MASK_OFFSET:XSAVE_MXCSR_MASK_OFFSET + 4], "little")
    return mxcsr, mask or MXCSR_MASK_IF_ZERO


def set_mxcsr_in_xsave(xsave: bytearray, mxcsr: int) -> None:
    """Store MXCSR in a KVM_GET_XSAVE buffer before KVM_SET_XSAVE.

    KVM takes MXCSR from the buffer only when XSTATE_BV marks SSE state present, so the
    bit is set too (harmless: with it clear the XMM registers were zero, as in the buffer).
    """
    xsave[XSAVE_MXCSR_OFFSET:XSAVE_MXCSR_OFFSET + 4] = (mxcsr & 0xFFFF_FFFF).to_bytes(4, "little")
    at = XSAVE_HDR_XSTATE_BV_OFFSET
    bv = int.from_bytes(xsave[at:at + 8], "little") | XFEATURE_MASK_SSE
    xsave[at:at + 8] = bv.to_bytes(8, "little")


@dataclass
class AssistAction:
    """What the vCPU code must apply to complete the instruction (or deliver its fault).

    Apply in this order: mem_writes (write_phys), set_regs (KVM_SET_REGS), set_mxcsr
    (set_mxcsr_in_xsave + KVM_SET_XSAVE), set_cr2 (KVM_SET_SREGS), then inject_exception
    (KVM_SET_VCPU_EVENTS with exception.injected = 1). A fault leaves RIP unchanged.
    """

    kind: str  # the counter key: "int3", "clac", "stac", "fwait", "ldmxcsr", ...
    set_regs: dict[str, int] = field(default_factory=dict)
    inject_exception: tuple[int, int | None] | None = None  # (vector, error code)
    set_mxcsr: int | None = None  # apply with set_mxcsr_in_xsave + KVM_SET_XSAVE
    mem_writes: list[tuple[int, bytes]] = field(default_factory=list)  # guest-physical
    set_cr2: int | None = None  # with an injected #PF: CR2 must hold the faulting address


class AssistFailure(Exception):
    """The instruction cannot be completed; str() is a one-paragraph report."""

    def __init__(self, report: str, *, reason: str, rip: int | None = None,
                 insn_bytes: bytes | None = None, disassembly: str | None = None,
                 symbol: str | None = None, mnemonic: str | None = None) -> None:
        super().__init__(report)
        self.reason = reason
        self.rip = rip
        self.insn_bytes = insn_bytes
        self.disassembly = disassembly
        self.symbol = symbol
        self.mnemonic = mnemonic


class AssistStats:
    """Counts per completed kind, per injected exception, and failures (thread-safe)."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def record(self, action: AssistAction) -> None:
        with self._lock:
            self._counts[action.kind] += 1
            if action.inject_exception is not None:
                vector = action.inject_exception[0]
                self._counts[f"inject:#{TRAP_NAMES.get(vector, vector)}"] += 1

    def record_failure(self, failure: AssistFailure | None = None) -> None:
        with self._lock:
            self._counts["failed"] += 1

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self._counts.items()))


# ---------------------------------------------------------------------------------------
# Registers and decoding

# Sub-register name -> (full register, bit shift, width in bits).
_REG_VIEWS: dict[str, tuple[str, int, int]] = {}
for _full in GPR_NAMES + ("rip",):
    _REG_VIEWS[_full] = (_full, 0, 64)
for _l in "abcd":
    _REG_VIEWS[f"e{_l}x"] = (f"r{_l}x", 0, 32)
    _REG_VIEWS[f"{_l}x"] = (f"r{_l}x", 0, 16)
    _REG_VIEWS[f"{_l}l"] = (f"r{_l}x", 0, 8)
    _REG_VIEWS[f"{_l}h"] = (f"r{_l}x", 8, 8)
for _short in ("sp", "bp", "si", "di"):
    _REG_VIEWS[f"e{_short}"] = (f"r{_short}", 0, 32)
    _REG_VIEWS[_short] = (f"r{_short}", 0, 16)
    _REG_VIEWS[f"{_short}l"] = (f"r{_short}", 0, 8)
for _n in range(8, 16):
    _REG_VIEWS[f"r{_n}d"] = (f"r{_n}", 0, 32)
    _REG_VIEWS[f"r{_n}w"] = (f"r{_n}", 0, 16)
    _REG_VIEWS[f"r{_n}b"] = (f"r{_n}", 0, 8)
_REG_VIEWS["eip"] = ("rip", 0, 32)
_REG_VIEWS["ip"] = ("rip", 0, 16)
_ZERO_INDEX = frozenset({"riz", "eiz"})  # capstone's "no index" pseudo-registers
_STACK_BASES = frozenset({"rsp", "rbp", "esp", "ebp", "sp", "bp"})

_LEGACY_PREFIXES = frozenset({0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67})
PREFIX_LOCK = 0xF0
_MANDATORY_PREFIXES = frozenset({0x66, 0xF2, 0xF3})  # these change what 0F-map opcodes mean

_CS_MODES = {64: capstone.CS_MODE_64, 32: capstone.CS_MODE_32, 16: capstone.CS_MODE_16}
_tls = threading.local()


def _disassembler(bits: int) -> capstone.Cs:
    """One capstone handle per thread and mode (handles are not shared across threads)."""
    cache = getattr(_tls, "cs", None)
    if cache is None:
        cache = _tls.cs = {}
    md = cache.get(bits)
    if md is None:
        md = capstone.Cs(capstone.CS_ARCH_X86, _CS_MODES[bits])
        md.detail = True
        cache[bits] = md
    return md


def _decode(code: bytes, address: int, bits: int) -> Any:
    try:
        return next(_disassembler(bits).disasm(code, address, 1), None)
    except capstone.CsError:
        return None


def _scan_prefixes(code: bytes, bits: int) -> tuple[frozenset[int], int]:
    """Legacy prefixes (and REX in 64-bit code) before the opcode, and the opcode's index.

    Scanned from the raw bytes because capstone folds a "mandatory" F2/F3 into the
    opcode without reporting it (it decodes F3 0F 01 CA, FRED's ERETU, as clac).
    """
    seen: set[int] = set()
    i = 0
    while i < len(code) and i < X86_MAX_INSN_LEN:
        b = code[i]
        if b in _LEGACY_PREFIXES:
            seen.add(b)
        elif not (bits == 64 and 0x40 <= b <= 0x4F):
            break
        i += 1
    return frozenset(seen), i


def _vector_encoding(code: bytes, opcode_at: int, bits: int) -> str | None:
    """'VEX', 'EVEX' or 'XOP' when the instruction uses that encoding, else None."""
    if opcode_at + 1 >= len(code):
        return None
    first, second = code[opcode_at], code[opcode_at + 1]
    # Outside 64-bit mode C4/C5/62 are LES/LDS/BOUND unless the next byte looks like mod=11.
    escapes = bits == 64 or second >= 0xC0
    if first in (0xC4, 0xC5) and escapes:
        return "VEX"
    if first == 0x62 and escapes:
        return "EVEX"
    if first == 0x8F and (second >> 3) & 7:
        return "XOP"
    return None


# Features whose instructions the assist leaves alone, with their clearcpuid= names.
_VECTOR_GROUP_FEATURES = (
    (cs_x86.X86_GRP_BMI, "bmi1", "BMI1"),
    (cs_x86.X86_GRP_BMI2, "bmi2", "BMI2"),
    (cs_x86.X86_GRP_TBM, "tbm", "TBM"),
    (cs_x86.X86_GRP_XOP, "xop", "XOP"),
    (cs_x86.X86_GRP_FMA4, "fma4", "FMA4"),
    (cs_x86.X86_GRP_AVX512, "avx512f", "AVX-512"),
    (cs_x86.X86_GRP_FMA, "fma", "FMA"),
    (cs_x86.X86_GRP_F16C, "f16c", "F16C"),
    (cs_x86.X86_GRP_AVX2, "avx2", "AVX2"),
    (cs_x86.X86_GRP_AVX, "avx", "AVX"),
)
_VECTOR_DEFAULT_FEATURE = {"VEX": ("avx", "AVX"), "EVEX": ("avx512f", "AVX-512"), "XOP": ("xop", "XOP")}
_MNEMONIC_FEATURES: dict[str, tuple[str, str]] = {}
for _names, _feature in (
    ("xsave xsave64 xrstor xrstor64 xsaveopt xsaveopt64 xgetbv xsetbv", ("xsave", "XSAVE")),
    ("xsavec xsavec64", ("xsavec", "XSAVEC")),
    ("xsaves xsaves64 xrstors xrstors64", ("xsaves", "XSAVES")),
    ("popcnt", ("popcnt", "POPCNT")),
    ("movbe", ("movbe", "MOVBE")),
    ("rdrand", ("rdrand", "RDRAND")),
    ("rdseed", ("rdseed", "RDSEED")),
    ("rdfsbase rdgsbase wrfsbase wrgsbase", ("fsgsbase", "FSGSBASE")),
    ("invpcid", ("invpcid", "INVPCID")),
    ("rdpid", ("rdpid", "RDPID")),
    ("lzcnt", ("abm", "LZCNT/ABM")),
    ("tzcnt", ("bmi1", "BMI1")),
    ("adcx adox", ("adx", "ADX")),
    ("crc32", ("sse4_2", "SSE4.2")),
    ("clwb", ("clwb", "CLWB")),
    ("clflushopt", ("clflushopt", "CLFLUSHOPT")),
    ("rdpkru wrpkru", ("pku", "PKU")),
):
    for _m in _names.split():
        _MNEMONIC_FEATURES[_m] = _feature


class _GuestFault(Exception):
    """The instruction raises an exception in the guest instead of completing."""

    def __init__(self, vector: int, error_code: int | None = None, cr2: int | None = None) -> None:
        super().__init__(vector, error_code)
        self.vector = vector
        self.error_code = error_code
        self.cr2 = cr2


# ---------------------------------------------------------------------------------------
# The per-exit context


class _Exit:
    """Everything known about one failing instruction; builds reports and actions."""

    def __init__(self, cpu: CpuState, mem: GuestMemory, symbols: Symbols | None) -> None:
        self.cpu = cpu
        self.mem = mem
        self.symbols = symbols
        lma = bool(cpu.efer & EFER_LMA)
        self.bits = 64 if lma and cpu.cs_l else (32 if cpu.cs_db else 16)
        self.ip_mask = {64: U64, 32: 0xFFFF_FFFF, 16: 0xFFFF}[self.bits]
        self.rip = cpu.regs["rip"] & self.ip_mask
        # 64-bit code ignores CS.base; elsewhere linear addresses wrap at 4 GiB.
        self.linear_rip = self.rip if self.bits == 64 else (cpu.cs_base + self.rip) & 0xFFFF_FFFF
        self.code: bytes | None = None
        self.code_source = ""
        self.insn: Any = None
        self.prefixes: frozenset[int] = frozenset()
        self.opcode_at = 0

    # -- reporting ------------------------------------------------------------------
    def fail(self, reason: str) -> AssistFailure:
        symbol = None
        if self.symbols is not None:
            symbol = self.symbols.lookup(self.linear_rip)
        where = f"RIP {self.rip:#x}"
        if self.linear_rip != self.rip:
            where += f" (linear {self.linear_rip:#x})"
        if symbol:
            where += f" <{symbol}>"
        if self.code:
            shown = self.code[: self.insn.size] if self.insn is not None else self.code
            code_text = f"bytes {shown.hex(' ')} ({self.code_source})"
        else:
            shown = None
            code_text = "instruction bytes unavailable"
        if self.insn is not None:
            disasm = f"{self.insn.mnemonic} {self.insn.op_str}".strip()
            insn_text = f"`{disasm}`"
        else:
            disasm = None
            insn_text = "not decodable by capstone" if self.code else "not decoded"
        report = (f"emulation assist cannot complete the instruction at {where}, "
                  f"CPL{self.cpu.cpl}, {self.bits}-bit code: {code_text}, {insn_text}. {reason}")
        return AssistFailure(report, reason=reason, rip=self.rip, insn_bytes=shown,
                             disassembly=disasm, symbol=symbol,
                             mnemonic=self.insn.mnemonic if self.insn is not None else None)

    # -- fetching and decoding ---------------------------------------------------------
    def fetch_from_memory(self) -> bytes:
        """Up to 15 bytes at CS.base+RIP; stops early at a page that does not translate."""
        first = translate(self.mem, self.cpu, self.linear_rip, SUPERVISOR_PEEK,
                          maxphyaddr=self.cpu.maxphyaddr)
        n = min(X86_MAX_INSN_LEN, first.bytes_left_in_page)
        code = read_phys_checked(self.mem, first.gpa, n, "instruction")
        if n < X86_MAX_INSN_LEN:
            wrap = U64 if self.bits == 64 else 0xFFFF_FFFF
            try:
                second = translate(self.mem, self.cpu, (self.linear_rip + n) & wrap,
                                   SUPERVISOR_PEEK, maxphyaddr=self.cpu.maxphyaddr)
                code += read_phys_checked(self.mem, second.gpa, X86_MAX_INSN_LEN - n, "instruction")
            except WalkError:
                pass  # the instruction may well end on the first page
        return code

    def decode(self, failure: EmulationFailure) -> None:
        exit_bytes = failure.insn_bytes
        if exit_bytes is not None:
            self.code, self.code_source = exit_bytes, "from the exit"
            self.insn = _decode(exit_bytes, self.rip, self.bits)
            if self.insn is not None:
                return
        # No bytes in the exit, or KVM fetched too few (it stops at a page boundary).
        try:
            code = self.fetch_from_memory()
        except WalkError as exc:
            if self.code is None:
                raise self.fail(f"Cannot fetch the instruction from guest memory: {exc}.") from None
            return
        self.code, self.code_source = code, "read from guest memory"
        self.insn = _decode(code, self.rip, self.bits)

    # -- registers and operands ---------------------------------------------------------
    @property
    def next_rip(self) -> int:
        return (self.rip + self.insn.size) & self.ip_mask

    @property
    def rflags(self) -> int:
        return self.cpu.regs["rflags"] & U64

    def reg(self, name: str) -> int:
        view = _REG_VIEWS.get(name)
        if view is None:
            raise self.fail(f"The operand uses register {name}, which the assist does not model.")
        full, shift, width = view
        return (self.cpu.regs[full] >> shift) & ((1 << width) - 1)

    def mem_operand(self) -> tuple[int, bool]:
        """(linear address, uses SS) of the instruction's memory operand."""
        insn = self.insn
        op = next((o for o in insn.operands if o.type == cs_x86.X86_OP_MEM), None)
        if op is None:
            raise self.fail(f"`{insn.mnemonic}` without a memory operand is not completed.")
        m = op.mem
        ea = m.disp
        base = insn.reg_name(m.base) if m.base else None
        if base in ("rip", "eip"):
            ea += self.rip + insn.size  # RIP-relative counts from the next instruction
        elif base:
            ea += self.reg(base)
        index = insn.reg_name(m.index) if m.index else None
        if index and index not in _ZERO_INDEX:
            ea += self.reg(index) * m.scale
        ea &= (1 << (8 * insn.addr_size)) - 1
        segment = insn.reg_name(m.segment) if m.segment else ("ss" if base in _STACK_BASES else "ds")
        if self.bits == 64:
            seg_base = {"fs": self.cpu.fs_base, "gs": self.cpu.gs_base}.get(segment, 0)
            linear = (seg_base + ea) & U64
            if not is_canonical(linear, bool(self.cpu.cr4 & X86_CR4_LA57)):
                raise _GuestFault(X86_TRAP_SS if segment == "ss" else X86_TRAP_GP, 0)
        else:
            seg_base = {"cs": self.cpu.cs_base, "ds": self.cpu.ds_base, "es": self.cpu.es_base,
                        "fs": self.cpu.fs_base, "gs": self.cpu.gs_base,
                        "ss": self.cpu.ss_base}.get(segment, 0)
            linear = (seg_base + ea) & 0xFFFF_FFFF
        return linear, segment == "ss"

    def translate_data(self, linear: int, size: int, write: bool, stack: bool) -> list[tuple[int, int]]:
        access = Access(write=write, user=self.cpu.cpl == 3, ac=bool(self.rflags & X86_EFLAGS_AC))
        try:
            return translate_range(self.mem, self.cpu, linear, size, access,
                                   maxphyaddr=self.cpu.maxphyaddr)
        except PageFault as pf:
            raise _GuestFault(X86_TRAP_PF, pf.error_code, cr2=pf.gva) from None
        except NonCanonicalAddress:
            raise _GuestFault(X86_TRAP_SS if stack else X86_TRAP_GP, 0) from None
        except PhysAccessError as exc:
            raise self.fail(f"The memory operand at linear {linear:#x} cannot be accessed: "
                            f"{exc} (MMIO operands are not completed).") from None

    def read_data(self, chunks: list[tuple[int, int]]) -> bytes:
        try:
            return b"".join(read_phys_checked(self.mem, gpa, n, "memory operand") for gpa, n in chunks)
        except PhysAccessError as exc:
            raise self.fail(f"The memory operand cannot be read: {exc}.") from None

    def done(self, kind: str, **changes: Any) -> AssistAction:
        """The instruction completed: advance RIP and apply `changes`."""
        set_regs = dict(changes.pop("set_regs", {}))
        set_regs["rip"] = self.next_rip
        return AssistAction(kind=kind, set_regs=set_regs, **changes)

    def no_mandatory_prefix(self) -> None:
        if self.prefixes & _MANDATORY_PREFIXES:
            pfx = " ".join(f"{p:02x}" for p in sorted(self.prefixes & _MANDATORY_PREFIXES))
            raise self.fail(f"Prefix {pfx} turns this opcode into a different instruction "
                            f"than capstone's `{self.insn.mnemonic}` (e.g. F2/F3 0F 01 CA are "
                            f"FRED's ERETS/ERETU); not completed.")


# ---------------------------------------------------------------------------------------
# The instructions


def _do_int3(x: _Exit) -> AssistAction:
    # A trap-class soft exception: see ADVANCE_RIP_BEFORE_SOFT_EXCEPTION.
    set_regs = {"rip": x.next_rip} if ADVANCE_RIP_BEFORE_SOFT_EXCEPTION else {}
    return AssistAction(kind="int3", set_regs=set_regs, inject_exception=(X86_TRAP_BP, None))


def _do_clac_stac(x: _Exit) -> AssistAction:
    x.no_mandatory_prefix()
    if x.cpu.cpl > 0:
        raise _GuestFault(X86_TRAP_UD)
    if x.insn.id == cs_x86.X86_INS_CLAC:
        return x.done("clac", set_regs={"rflags": x.rflags & ~X86_EFLAGS_AC})
    return x.done("stac", set_regs={"rflags": x.rflags | X86_EFLAGS_AC})


def _do_fwait(x: _Exit) -> AssistAction:
    if x.cpu.cr0 & X86_CR0_MP and x.cpu.cr0 & X86_CR0_TS:
        raise _GuestFault(X86_TRAP_NM)
    fsw = x.cpu.fsw
    if fsw is not None and fsw & X87_FSW_ES and x.cpu.cr0 & X86_CR0_NE:
        raise _GuestFault(X86_TRAP_MF)
    # Nothing pending (or FSW unknown: see the module docstring): fwait has nothing to wait for.
    return x.done("fwait")


def _check_sse_usable(x: _Exit) -> None:
    x.no_mandatory_prefix()
    if x.cpu.cr0 & X86_CR0_EM or not x.cpu.cr4 & X86_CR4_OSFXSR:
        raise _GuestFault(X86_TRAP_UD)
    if x.cpu.cr0 & X86_CR0_TS:
        raise _GuestFault(X86_TRAP_NM)


def _do_ldmxcsr(x: _Exit) -> AssistAction:
    _check_sse_usable(x)
    linear, stack = x.mem_operand()
    value = int.from_bytes(x.read_data(x.translate_data(linear, 4, False, stack)), "little")
    if value & ~x.cpu.mxcsr_mask:
        raise _GuestFault(X86_TRAP_GP, 0)  # reserved MXCSR bit set
    return x.done("ldmxcsr", set_mxcsr=value)


def _do_stmxcsr(x: _Exit) -> AssistAction:
    _check_sse_usable(x)
    if x.cpu.mxcsr is None:
        raise x.fail("stmxcsr needs the current MXCSR, but CpuState.mxcsr was not captured "
                     "(fill it from KVM_GET_XSAVE).")
    linear, stack = x.mem_operand()
    chunks = x.translate_data(linear, 4, True, stack)
    data = (x.cpu.mxcsr & 0xFFFF_FFFF).to_bytes(4, "little")
    writes, done = [], 0
    for gpa, n in chunks:
        writes.append((gpa, data[done:done + n]))
        done += n
    return x.done("stmxcsr", mem_writes=writes)


def _do_cmpxchg16b(x: _Exit) -> AssistAction:
    # Not atomic against other vCPUs: the vCPU code serialises assists (module docstring).
    linear, stack = x.mem_operand()
    if linear % 16:
        raise _GuestFault(X86_TRAP_GP, 0)
    # The CPU always performs the write cycle, so it needs write access even on mismatch.
    chunks = x.translate_data(linear, 16, True, stack)
    current = int.from_bytes(x.read_data(chunks), "little")
    expected = (x.reg("rdx") << 64) | x.reg("rax")
    if current == expected:
        (gpa, _n), = chunks  # 16-byte aligned, so on one page
        new = ((x.reg("rcx") << 64) | x.reg("rbx")).to_bytes(16, "little")
        return x.done("cmpxchg16b", set_regs={"rflags": x.rflags | X86_EFLAGS_ZF},
                      mem_writes=[(gpa, new)])
    return x.done("cmpxchg16b", set_regs={"rflags": x.rflags & ~X86_EFLAGS_ZF,
                                          "rax": current & U64, "rdx": current >> 64})


_HANDLERS: dict[int, tuple[str, Callable[[_Exit], AssistAction]]] = {
    cs_x86.X86_INS_INT3: ("int3", _do_int3),
    cs_x86.X86_INS_CLAC: ("clac", _do_clac_stac),
    cs_x86.X86_INS_STAC: ("stac", _do_clac_stac),
    cs_x86.X86_INS_WAIT: ("fwait", _do_fwait),
    cs_x86.X86_INS_LDMXCSR: ("ldmxcsr", _do_ldmxcsr),
    cs_x86.X86_INS_STMXCSR: ("stmxcsr", _do_stmxcsr),
    cs_x86.X86_INS_CMPXCHG16B: ("cmpxchg16b", _do_cmpxchg16b),
}
_LOCKABLE = frozenset({cs_x86.X86_INS_CMPXCHG16B})
COMPLETED_KINDS = tuple(kind for kind, _ in _HANDLERS.values())


def _lock_misuse(x: _Exit) -> str | None:
    """The kind, when a LOCK prefix made capstone reject an instruction the assist knows.

    The CPU raises #UD for LOCK on a non-lockable instruction; capstone just refuses it.
    """
    if x.code is None or PREFIX_LOCK not in x.prefixes:
        return None
    stripped = x.code[: x.opcode_at].replace(bytes([PREFIX_LOCK]), b"") + x.code[x.opcode_at:]
    insn = _decode(stripped, x.rip, x.bits)
    if insn is None or insn.id in _LOCKABLE or insn.id not in _HANDLERS:
        return None
    return _HANDLERS[insn.id][0]


def _why_not(x: _Exit) -> str:
    """The report's reason for an instruction the assist does not complete."""
    encoding = _vector_encoding(x.code, x.opcode_at, x.bits) if x.code else None
    insn = x.insn
    if encoding is not None:
        clear, feature = _VECTOR_DEFAULT_FEATURE[encoding]
        if insn is not None:
            for group, name, label in _VECTOR_GROUP_FEATURES:
                if group in insn.groups:
                    clear, feature = name, label
                    break
        return (f"It is a {encoding}-encoded {feature} instruction; pyvmm's assist does not "
                f"complete VEX/EVEX/XOP instructions (AVX, BMI1/2, FMA ...), which the CPUID "
                f"policy hides. The guest uses it anyway: pass clearcpuid={clear} on the "
                f"guest kernel command line.")
    if insn is None:
        return "Capstone cannot decode these bytes, so nothing can complete them."
    hint = _MNEMONIC_FEATURES.get(insn.mnemonic.split()[-1])
    if hint is not None:
        clear, feature = hint
        return (f"`{insn.mnemonic}` is not completed by pyvmm's assist: it belongs to the "
                f"{feature} feature, which the CPUID policy hides. The guest uses it anyway: "
                f"pass clearcpuid={clear} on the guest kernel command line.")
    return (f"pyvmm's assist does not complete `{insn.mnemonic}` "
            f"(it completes {', '.join(COMPLETED_KINDS)}).")


def assist(failure: EmulationFailure, cpu: CpuState, mem: GuestMemory,
           symbols: Symbols | None = None) -> AssistAction:
    """Complete the instruction behind an emulation-failure exit, or raise AssistFailure.

    Pure: reads `mem` but never writes it; the returned action says what to change.
    """
    x = _Exit(cpu, mem, symbols)
    if failure.suberror != KVM_INTERNAL_ERROR_EMULATION:
        name = SUBERROR_NAMES.get(failure.suberror, "unknown")
        raise x.fail(f"KVM internal error suberror {failure.suberror} ({name}) is not an "
                     f"emulation failure; there is no instruction to complete.")
    x.decode(failure)
    if x.code:
        x.prefixes, x.opcode_at = _scan_prefixes(x.code, x.bits)
    kind = None
    try:
        if x.insn is None:
            kind = _lock_misuse(x)
            if kind is not None:
                raise _GuestFault(X86_TRAP_UD)
            raise x.fail(_why_not(x))
        entry = _HANDLERS.get(x.insn.id)
        if entry is None:
            raise x.fail(_why_not(x))
        kind, handler = entry
        return handler(x)
    except _GuestFault as fault:
        return AssistAction(kind=kind or "fault", inject_exception=(fault.vector, fault.error_code),
                            set_cr2=fault.cr2)
