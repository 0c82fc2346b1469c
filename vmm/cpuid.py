"""CPUID policy: start from KVM_GET_SUPPORTED_CPUID, hide features, set topology and TSC leaves.

Features are named as Linux names them (/proc/cpuinfo, `clearcpuid=`), so one table serves
`--cpu-features`, the masking and the `clearcpuid=` that pyvmm appends for every feature it
hid. Some KVMs (PVM among them) do not enforce CPUID masking for every bit, so telling the
guest kernel too is the general, host-independent way to make the mask stick.

The default mask is the set of features whose instructions KVM's instruction emulator is
known not to handle (VEX/EVEX encodings and a few others). It matters wherever KVM emulates
guest code: everything at CPL0 on PVM, MMIO accesses on VMX/SVM.
"""

from __future__ import annotations

from dataclasses import dataclass

EAX, EBX, ECX, EDX = "eax", "ebx", "ecx", "edx"


@dataclass(frozen=True)
class Feature:
    leaf: int
    subleaf: int | None
    reg: str
    bit: int


FEATURES: dict[str, Feature] = {}


def _add(leaf: int, subleaf: int | None, reg: str, bits: dict[str, int]) -> None:
    for name, bit in bits.items():
        FEATURES[name] = Feature(leaf, subleaf, reg, bit)


_add(1, None, ECX, {"pni": 0, "pclmulqdq": 1, "monitor": 3, "vmx": 5, "ssse3": 9, "fma": 12, "cx16": 13,
                    "pcid": 17, "sse4_1": 19, "sse4_2": 20, "x2apic": 21, "movbe": 22, "popcnt": 23,
                    "tsc_deadline_timer": 24, "aes": 25, "xsave": 26, "osxsave": 27, "avx": 28, "f16c": 29,
                    "rdrand": 30, "hypervisor": 31})
_add(1, None, EDX, {"mtrr": 12, "pat": 16, "clflush": 19, "mmx": 23, "fxsr": 24, "sse": 25, "sse2": 26})
_add(7, 0, EBX, {"fsgsbase": 0, "bmi1": 3, "hle": 4, "avx2": 5, "smep": 7, "bmi2": 8, "erms": 9,
                 "invpcid": 10, "rtm": 11, "avx512f": 16, "avx512dq": 17, "rdseed": 18, "adx": 19,
                 "smap": 20, "avx512ifma": 21, "clflushopt": 23, "clwb": 24, "avx512pf": 26, "avx512er": 27,
                 "avx512cd": 28, "sha_ni": 29, "avx512bw": 30, "avx512vl": 31})
_add(7, 0, ECX, {"avx512vbmi": 1, "umip": 2, "pku": 3, "waitpkg": 5, "avx512_vbmi2": 6, "gfni": 8,
                 "vaes": 9, "vpclmulqdq": 10, "avx512_vnni": 11, "avx512_bitalg": 12,
                 "avx512_vpopcntdq": 14, "la57": 16, "rdpid": 22, "movdiri": 27, "movdir64b": 28})
_add(7, 0, EDX, {"avx512_4vnniw": 2, "avx512_4fmaps": 3, "fsrm": 4, "avx512_vp2intersect": 8,
                 "serialize": 14, "amx_bf16": 22, "avx512_fp16": 23, "amx_tile": 24, "amx_int8": 25})
_add(7, 1, EAX, {"avx_vnni": 4, "avx512_bf16": 5})
_add(0x80000001, None, ECX, {"lahf_lm": 0, "abm": 5, "sse4a": 6, "misalignsse": 7, "xop": 11,
                             "fma4": 16, "tbm": 21})
_add(0x80000001, None, EDX, {"pdpe1gb": 26, "rdtscp": 27})

VEX_ENCODED = (
    "avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "xop", "fma4", "tbm", "vaes", "vpclmulqdq", "gfni",
    "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
    "avx512f", "avx512dq", "avx512ifma", "avx512pf", "avx512er", "avx512cd", "avx512bw", "avx512vl",
    "avx512vbmi", "avx512_vbmi2", "avx512_vnni", "avx512_bitalg", "avx512_vpopcntdq", "avx512_4vnniw",
    "avx512_4fmaps", "avx512_vp2intersect", "avx512_fp16", "avx512_bf16",
)
# Non-VEX features whose instructions, or the kernel paths they enable, KVM's emulator has
# been seen to reject (XSAVE/XRSTOR, CMPXCHG16B, CLAC/STAC, MOVBE, …); see docs/host-kvm notes.
EMULATOR_UNSAFE = (
    "xsave", "osxsave", "movbe", "popcnt", "rdrand", "rdseed", "cx16", "smap", "fsgsbase", "invpcid",
    "pcid", "rdpid", "sha_ni", "adx", "waitpkg", "movdiri", "movdir64b", "pku", "la57",
)
DEFAULT_MASK = VEX_ENCODED + EMULATOR_UNSAFE

# child -> parent: Linux clears the child itself when the parent is cleared (cpuid-deps.c),
# or the child cannot execute without the parent's XCR0 state. Omitting implied names keeps
# clearcpuid= short: Linux reads at most 127 characters of it.
IMPLIED_BY = {
    "avx": "xsave", "osxsave": "xsave", "pku": "xsave", "fma": "avx", "vaes": "avx", "vpclmulqdq": "avx",
    "avx2": "avx", "avx512f": "avx", "f16c": "avx", "avx_vnni": "avx", "xop": "avx", "fma4": "avx",
    "amx_tile": "xsave", "amx_bf16": "amx_tile", "amx_int8": "amx_tile",
    **{name: "avx512f" for name in FEATURES if name.startswith("avx512") and name != "avx512f"},
}
# Most important first: the features a Linux guest kernel itself uses on its boot path.
CLEARCPUID_PRIORITY = ("xsave", "bmi1", "bmi2", "popcnt", "movbe", "rdrand", "rdseed", "cx16", "smap",
                       "fsgsbase", "invpcid", "pcid", "rdpid", "waitpkg", "la57", "adx", "sha_ni", "gfni",
                       "movdiri", "movdir64b", "tbm")
CLEARCPUID_MAX = 127


def clearcpuid_names(hidden: list[str] | frozenset[str],
                     first: frozenset[str] = frozenset()) -> tuple[list[str], list[str]]:
    """(names for clearcpuid=, names that did not fit); implied features are left out.

    `first` (features the user hid explicitly) go before the default priority order."""
    hidden = set(hidden)

    def implied(name: str) -> bool:
        parent = IMPLIED_BY.get(name)
        while parent is not None:
            if parent in hidden:
                return True
            parent = IMPLIED_BY.get(parent)
        return False

    wanted = [n for n in hidden if not implied(n)]
    rank = {n: i for i, n in enumerate(CLEARCPUID_PRIORITY)}
    wanted.sort(key=lambda n: (n not in first, rank.get(n, len(rank)), n))
    chosen: list[str] = []
    length = -1  # no comma before the first name
    dropped = []
    for name in wanted:
        if length + 1 + len(name) <= CLEARCPUID_MAX:
            chosen.append(name)
            length += 1 + len(name)
        else:
            dropped.append(name)
    return chosen, dropped


KVM_CPUID_SIGNATURE = 0x40000000
KVM_CPUID_FEATURES = 0x40000001
TIMING_LEAF = 0x40000010  # eax = TSC kHz, ebx = APIC bus kHz (the VMware/QEMU convention)
KVM_APIC_BUS_KHZ = 1_000_000  # KVM's emulated APIC timer runs at 1 GHz


class CpuFeatureError(ValueError):
    """A --cpu-features value was malformed or named an unknown feature."""


@dataclass
class CpuidPolicy:
    """Which features to hide. Parsed from --cpu-features."""

    hide: frozenset[str] = frozenset(DEFAULT_MASK)

    @classmethod
    def parse(cls, spec: str | None) -> "CpuidPolicy":
        """'default', 'host', or a comma list like 'default,+popcnt,-sse4_2'.

        Items apply left to right on top of the default mask: 'host' clears the mask,
        'default' restores it, '+name' unhides a feature and '-name' hides one.
        """
        hide: set[str] = set(DEFAULT_MASK)
        for item in (s.strip() for s in (spec or "").split(",")):
            if not item:
                continue
            if item == "default":
                hide = set(DEFAULT_MASK)
            elif item == "host":
                hide.clear()
            elif item[0] in "+-" and item[1:] in FEATURES:
                (hide.discard if item[0] == "+" else hide.add)(item[1:])
            elif item[0] in "+-":
                raise CpuFeatureError(f"unknown CPU feature {item[1:]!r} in --cpu-features")
            else:
                raise CpuFeatureError(f"bad --cpu-features item {item!r}: use default, host, +name or -name")
        return cls(frozenset(hide))


def _entry(entries: list[dict], leaf: int, subleaf: int | None) -> dict | None:
    for e in entries:
        if e["function"] == leaf and (subleaf is None or e["index"] == subleaf):
            return e
    return None


def apply_policy(supported: list[dict], policy: CpuidPolicy, *, tsc_khz: int = 0,
                 tsc_deadline: bool = False) -> tuple[list[dict], list[str]]:
    """Returns the masked template and the names of the hidden features (for clearcpuid=)."""
    entries = [dict(e) for e in supported]
    hidden: list[str] = []
    for name in sorted(policy.hide):
        f = FEATURES[name]
        e = _entry(entries, f.leaf, f.subleaf)
        if e:
            e[f.reg] &= ~(1 << f.bit)
        # Named even when KVM did not report it: a KVM that ignores CPUID masking may still
        # let the guest see the host's bit, and only clearcpuid= then hides it.
        hidden.append(name)
    leaf1 = _entry(entries, 1, None)
    if leaf1:
        if "hypervisor" not in policy.hide:
            leaf1[ECX] |= 1 << FEATURES["hypervisor"].bit
        if tsc_deadline and "tsc_deadline_timer" not in policy.hide:
            leaf1[ECX] |= 1 << FEATURES["tsc_deadline_timer"].bit
    if "xsave" in policy.hide:
        # Without XSAVE the XSAVE state leaf must not advertise AVX/AVX-512 state either.
        entries = [e for e in entries if e["function"] != 0xD]
    sig = _entry(entries, KVM_CPUID_SIGNATURE, None)
    if sig and tsc_khz:
        sig[EAX] = max(sig[EAX], TIMING_LEAF)
        entries.append({"function": TIMING_LEAF, "index": 0, "flags": 0, "eax": tsc_khz,
                        "ebx": KVM_APIC_BUS_KHZ, "ecx": 0, "edx": 0})
    return entries, hidden


def for_vcpu(template: list[dict], index: int, ncpus: int) -> list[dict]:
    """Per-vCPU copy: APIC ids in leaves 1, 0xB and 0x1F."""
    out = []
    for e in template:
        e = dict(e)
        if e["function"] == 1:
            e[EBX] = (e[EBX] & 0x0000FFFF) | (index << 24) | (min(ncpus, 255) << 16)
            if ncpus > 1:
                e[EDX] |= 1 << 28  # HTT: the logical-processor count in EBX is valid
        elif e["function"] in (0xB, 0x1F):
            e[EDX] = index
        out.append(e)
    return out
