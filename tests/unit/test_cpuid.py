"""Tests for the CPUID policy: --cpu-features parsing, masking, per-vCPU leaves, clearcpuid=.

The "supported" CPUID list is synthetic (every feature bit set), so a cleared bit can only
come from the policy. Bit positions in the spot checks are from the SDM / APM, written as
literals, so a wrong entry in the feature table is caught rather than echoed.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmm import cpuid
from vmm.cpuid import (
    CLEARCPUID_MAX,
    CLEARCPUID_PRIORITY,
    DEFAULT_MASK,
    FEATURES,
    IMPLIED_BY,
    CpuFeatureError,
    CpuidPolicy,
    apply_policy,
    clearcpuid_names,
    for_vcpu,
)

ALL = 0xFFFF_FFFF
REGS = ("eax", "ebx", "ecx", "edx")
HYPERVISOR_BIT = 1 << 31     # CPUID.1:ECX[31]
TSC_DEADLINE_BIT = 1 << 24   # CPUID.1:ECX[24]


def supported() -> list[dict]:
    """What a generous KVM_GET_SUPPORTED_CPUID might return: every bit of every feature leaf set."""
    def e(function: int, index: int = 0, flags: int = 0, **regs: int) -> dict:
        d = {"function": function, "index": index, "flags": flags, "eax": ALL, "ebx": ALL, "ecx": ALL, "edx": ALL}
        d.update(regs)
        return d

    return [
        e(0, eax=0x1F, ebx=0x756E6547, ecx=0x6C65746E, edx=0x49656E69),
        e(1, eax=0x000906EA, ebx=0x0000_0800, ecx=ALL & ~HYPERVISOR_BIT & ~TSC_DEADLINE_BIT, edx=ALL & ~(1 << 28)),
        e(7, 0, flags=1, eax=1),
        e(7, 1, flags=1),
        e(0xB, 0, flags=1, eax=1, ebx=1, ecx=0x100, edx=0),
        e(0xB, 1, flags=1, eax=4, ebx=8, ecx=0x201, edx=0),
        e(0xD, 0, flags=1, eax=0x2E7, ebx=0x988, ecx=0x988, edx=0),
        e(0xD, 1, flags=1, eax=0xF, ebx=0, ecx=0, edx=0),
        e(0x1F, 0, flags=1, eax=1, ebx=1, ecx=0x100, edx=0),
        e(0x40000000, eax=0x40000001, ebx=0x4B4D564B, ecx=0x564B4D56, edx=0x4D),
        e(0x40000001, eax=0x01007AFB, ebx=0, ecx=0, edx=0),
        e(0x80000000, eax=0x80000008, ebx=0, ecx=0, edx=0),
        e(0x80000001),
    ]


def find(entries: list[dict], function: int, index: int = 0) -> dict:
    matches = [e for e in entries if e["function"] == function and e["index"] == index]
    assert len(matches) == 1, f"leaf {function:#x}.{index}: {len(matches)} entries"
    return matches[0]


def cleared_bits(before: list[dict], after: list[dict]) -> set[tuple[int, int, str, int]]:
    """(leaf, subleaf, register, bit) for every bit set before and clear after."""
    out = set()
    for b in before:
        a = [x for x in after if x["function"] == b["function"] and x["index"] == b["index"]]
        if not a:
            continue
        for reg in REGS:
            gone = b[reg] & ~a[0][reg]
            out |= {(b["function"], b["index"], reg, bit) for bit in range(32) if gone >> bit & 1}
    return out


# ------------------------------------------------------------------------------ parsing


def test_parse_none_and_default_hide_the_default_mask() -> None:
    assert CpuidPolicy.parse(None).hide == frozenset(DEFAULT_MASK)
    assert CpuidPolicy.parse("default").hide == frozenset(DEFAULT_MASK)
    assert CpuidPolicy().hide == frozenset(DEFAULT_MASK)


def test_default_mask_hides_the_emulator_unsafe_features() -> None:
    # The features docs/host-kvm.md says kill a guest kernel under KVM's emulator.
    for name in ("xsave", "avx", "avx2", "avx512f", "bmi1", "bmi2", "popcnt", "movbe", "rdrand", "rdseed",
                 "cx16", "smap", "fsgsbase", "invpcid", "pcid", "rdpid"):
        assert name in DEFAULT_MASK, name
    for name in ("sse", "sse2", "fxsr", "x2apic", "hypervisor", "tsc_deadline_timer"):
        assert name not in DEFAULT_MASK, name


def test_parse_host_hides_nothing() -> None:
    assert CpuidPolicy.parse("host").hide == frozenset()


def test_parse_default_then_plus_unhides() -> None:
    p = CpuidPolicy.parse("default,+popcnt,-sse4_2")
    assert p.hide == (frozenset(DEFAULT_MASK) - {"popcnt"}) | {"sse4_2"}


def test_parse_host_then_minus_hides_only_that() -> None:
    assert CpuidPolicy.parse("host,-avx2").hide == {"avx2"}
    assert CpuidPolicy.parse(" host , -avx2 ,").hide == {"avx2"}  # blanks and empty items are ignored


def test_parse_later_items_win() -> None:
    assert CpuidPolicy.parse("host,-avx2,+avx2").hide == frozenset()
    assert CpuidPolicy.parse("-avx2,host").hide == frozenset()
    assert CpuidPolicy.parse("host,default").hide == frozenset(DEFAULT_MASK)


def test_parse_plus_alone_starts_from_the_default() -> None:
    """`--cpu-features +popcnt` is the default mask with popcnt shown, like `default,+popcnt`.

    Starting from "nothing hidden" instead would expose every AVX/XSAVE feature the user
    did not mention, which kills a guest kernel on an emulating host.
    """
    assert CpuidPolicy.parse("+popcnt").hide == CpuidPolicy.parse("default,+popcnt").hide


def test_parse_minus_alone_starts_from_the_default() -> None:
    assert CpuidPolicy.parse("-sse4_2").hide == frozenset(DEFAULT_MASK) | {"sse4_2"}


def test_parse_empty_spec_is_the_default() -> None:
    assert CpuidPolicy.parse("").hide == CpuidPolicy.parse(None).hide


@pytest.mark.parametrize("spec", ["+nosuch", "-nosuch", "default,+avx3", "+AVX2", "+", "-"])
def test_parse_unknown_feature(spec: str) -> None:
    with pytest.raises(CpuFeatureError) as info:
        CpuidPolicy.parse(spec)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("spec", ["avx2", "default;+avx2", "*avx2", "hosts", "=avx2", "default +avx2"])
def test_parse_malformed_item(spec: str) -> None:
    with pytest.raises(CpuFeatureError) as info:
        CpuidPolicy.parse(spec)
    assert "\n" not in str(info.value)


def test_cpu_feature_error_is_a_value_error() -> None:
    assert issubclass(CpuFeatureError, ValueError)


# ------------------------------------------------------------------------------ apply_policy

# (name, leaf, subleaf, register, bit) from the SDM/APM, independent of vmm.cpuid's table
SPOT_CHECKS = [
    ("sse2", 1, 0, "edx", 26), ("avx", 1, 0, "ecx", 28), ("xsave", 1, 0, "ecx", 26), ("popcnt", 1, 0, "ecx", 23),
    ("cx16", 1, 0, "ecx", 13), ("movbe", 1, 0, "ecx", 22), ("rdrand", 1, 0, "ecx", 30), ("pcid", 1, 0, "ecx", 17),
    ("fsgsbase", 7, 0, "ebx", 0), ("bmi1", 7, 0, "ebx", 3), ("avx2", 7, 0, "ebx", 5), ("bmi2", 7, 0, "ebx", 8),
    ("invpcid", 7, 0, "ebx", 10), ("avx512f", 7, 0, "ebx", 16), ("rdseed", 7, 0, "ebx", 18), ("smap", 7, 0, "ebx", 20),
    ("sha_ni", 7, 0, "ebx", 29), ("avx512vl", 7, 0, "ebx", 31), ("la57", 7, 0, "ecx", 16), ("rdpid", 7, 0, "ecx", 22),
    ("pku", 7, 0, "ecx", 3), ("gfni", 7, 0, "ecx", 8), ("movdir64b", 7, 0, "ecx", 28), ("amx_tile", 7, 0, "edx", 24),
    ("avx512_fp16", 7, 0, "edx", 23), ("avx_vnni", 7, 1, "eax", 4), ("avx512_bf16", 7, 1, "eax", 5),
    ("xop", 0x80000001, 0, "ecx", 11), ("fma4", 0x80000001, 0, "ecx", 16), ("tbm", 0x80000001, 0, "ecx", 21),
    ("pdpe1gb", 0x80000001, 0, "edx", 26), ("rdtscp", 0x80000001, 0, "edx", 27),
]


@pytest.mark.parametrize("name,leaf,subleaf,reg,bit", SPOT_CHECKS)
def test_apply_policy_clears_exactly_the_named_bit(name: str, leaf: int, subleaf: int, reg: str, bit: int) -> None:
    before = supported()
    after, hidden = apply_policy(before, CpuidPolicy(hide=frozenset({name})))
    assert hidden == [name]
    assert cleared_bits(before, after) == {(leaf, subleaf, reg, bit)}


def test_apply_policy_does_not_modify_its_input() -> None:
    before = supported()
    snapshot = [dict(e) for e in before]
    apply_policy(before, CpuidPolicy())
    assert before == snapshot


def test_apply_policy_sets_the_hypervisor_bit() -> None:
    for policy in (CpuidPolicy(), CpuidPolicy(hide=frozenset())):
        after, _ = apply_policy(supported(), policy)
        assert find(after, 1)["ecx"] & HYPERVISOR_BIT


def test_apply_policy_tsc_deadline_only_when_asked() -> None:
    off, _ = apply_policy(supported(), CpuidPolicy(), tsc_deadline=False)
    on, _ = apply_policy(supported(), CpuidPolicy(), tsc_deadline=True)
    assert not find(off, 1)["ecx"] & TSC_DEADLINE_BIT
    assert find(on, 1)["ecx"] & TSC_DEADLINE_BIT


def test_apply_policy_drops_leaf_0xd_when_xsave_is_hidden() -> None:
    hidden_xsave, _ = apply_policy(supported(), CpuidPolicy(hide=frozenset({"xsave"})))
    assert not [e for e in hidden_xsave if e["function"] == 0xD]
    shown, _ = apply_policy(supported(), CpuidPolicy(hide=frozenset({"avx2"})))
    assert len([e for e in shown if e["function"] == 0xD]) == 2


def test_apply_policy_adds_the_timing_leaf_with_tsc_khz() -> None:
    after, _ = apply_policy(supported(), CpuidPolicy(), tsc_khz=2_400_000)
    timing = find(after, 0x40000010)
    assert (timing["eax"], timing["ebx"]) == (2_400_000, 1_000_000)  # TSC kHz, APIC bus kHz (1 GHz)
    assert find(after, 0x40000000)["eax"] >= 0x40000010  # the max hypervisor leaf covers it
    without, _ = apply_policy(supported(), CpuidPolicy(), tsc_khz=0)
    assert not [e for e in without if e["function"] == 0x40000010]
    assert find(without, 0x40000000)["eax"] == 0x40000001


def test_apply_policy_names_features_kvm_did_not_report() -> None:
    """A feature absent from KVM's list is still named (for clearcpuid=), and nothing breaks."""
    only_basic = [e for e in supported() if e["function"] in (0, 1)]
    after, hidden = apply_policy(only_basic, CpuidPolicy(hide=frozenset({"avx2", "avx"})))
    assert hidden == ["avx", "avx2"]
    assert not find(after, 1)["ecx"] & (1 << 28)


@settings(max_examples=200, deadline=None)
@given(st.sets(st.sampled_from(sorted(FEATURES))))
def test_apply_policy_random_subsets(names: set[str]) -> None:
    before = supported()
    after, hidden = apply_policy(before, CpuidPolicy(hide=frozenset(names)))
    assert hidden == sorted(names)
    set_before = {(e["function"], e["index"], reg): e[reg] for e in before for reg in REGS}
    expected = {(f.leaf, f.subleaf or 0, f.reg, f.bit) for n, f in FEATURES.items()
                if n in names
                and set_before.get((f.leaf, f.subleaf or 0, f.reg), 0) >> f.bit & 1}
    if "xsave" in names:
        before = [e for e in before if e["function"] != 0xD]
    if "hypervisor" not in names:
        expected = {k for k in expected if k[:3] != (1, 0, "ecx") or k[3] != 31}
    assert cleared_bits(before, after) == expected
    # The hypervisor bit is set unless the policy hides it explicitly.
    assert bool(find(after, 1)["ecx"] & HYPERVISOR_BIT) == ("hypervisor" not in names)


def test_feature_table_has_no_two_names_on_one_bit() -> None:
    seen: dict[tuple, str] = {}
    for name, f in FEATURES.items():
        key = (f.leaf, f.subleaf, f.reg, f.bit)
        assert key not in seen, f"{name} and {seen[key]} share {key}"
        assert 0 <= f.bit < 32 and f.reg in REGS
        seen[key] = name


# ------------------------------------------------------------------------------ for_vcpu


@pytest.mark.parametrize("index,ncpus", [(0, 1), (1, 2), (7, 8)])
def test_for_vcpu_sets_apic_ids(index: int, ncpus: int) -> None:
    template, _ = apply_policy(supported(), CpuidPolicy())
    snapshot = [dict(e) for e in template]
    out = for_vcpu(template, index, ncpus)
    assert template == snapshot, "the template must not be modified"
    leaf1 = find(out, 1)
    assert leaf1["ebx"] >> 24 == index                    # initial APIC id
    assert (leaf1["ebx"] >> 16) & 0xFF == ncpus           # logical processors
    assert leaf1["ebx"] & 0xFFFF == find(template, 1)["ebx"] & 0xFFFF  # CLFLUSH size etc. kept
    assert bool(leaf1["edx"] & (1 << 28)) == (ncpus > 1)  # HTT
    for sub in (0, 1):
        assert find(out, 0xB, sub)["edx"] == index        # x2APIC id
    assert find(out, 0x1F, 0)["edx"] == index
    assert len(out) == len(template)


# ------------------------------------------------------------------------------ clearcpuid=


def implied(name: str, hidden: set[str]) -> bool:
    parent = IMPLIED_BY.get(name)
    while parent is not None:
        if parent in hidden:
            return True
        parent = IMPLIED_BY.get(parent)
    return False


def test_clearcpuid_omits_implied_features() -> None:
    assert clearcpuid_names({"xsave", "avx", "avx2", "fma", "avx512f", "avx512bw"}) == (["xsave"], [])
    # a child whose parent is not hidden is named
    assert clearcpuid_names({"avx2"}) == (["avx2"], [])
    # implication is transitive: avx512bw -> avx512f -> avx
    assert clearcpuid_names({"avx", "avx512bw"}) == (["avx"], [])


def test_clearcpuid_default_mask_fits_and_starts_with_xsave() -> None:
    names, dropped = clearcpuid_names(DEFAULT_MASK)
    text = ",".join(names)
    assert len(text) <= 127
    assert names[0] == "xsave"
    for name in ("bmi1", "bmi2", "popcnt", "movbe", "cx16", "smap", "fsgsbase", "invpcid", "pcid", "rdpid"):
        assert name in names, name
    assert "avx" not in names and "avx2" not in names  # implied by xsave
    assert set(names) | set(dropped) == {n for n in DEFAULT_MASK if not implied(n, set(DEFAULT_MASK))}


def test_clearcpuid_keeps_priority_order() -> None:
    hidden = {"tbm", "pcid", "xsave", "sse4a", "bmi2", "abm"}
    names, dropped = clearcpuid_names(hidden)
    assert dropped == []
    # priority names in CLEARCPUID_PRIORITY order, the rest after them by name
    assert names == ["xsave", "bmi2", "pcid", "tbm", "abm", "sse4a"]


def test_clearcpuid_reports_what_did_not_fit() -> None:
    names, dropped = clearcpuid_names(set(FEATURES))
    text = ",".join(names)
    assert len(text) <= 127
    assert dropped, "all features cannot fit in 127 characters"
    for name in dropped:
        assert len(text) + 1 + len(name) > 127, f"{name} would have fit"


def test_clearcpuid_max_is_linux_limit() -> None:
    # arch/x86/kernel/cpu/common.c parses clearcpuid= into a 128-byte buffer (127 chars + NUL)
    assert CLEARCPUID_MAX == 127


def test_clearcpuid_priority_names_are_features() -> None:
    assert set(CLEARCPUID_PRIORITY) <= set(FEATURES)
    assert set(IMPLIED_BY) <= set(FEATURES) and set(IMPLIED_BY.values()) <= set(FEATURES)


@settings(max_examples=300, deadline=None)
@given(st.sets(st.sampled_from(sorted(FEATURES))))
def test_clearcpuid_random_subsets(hidden: set[str]) -> None:
    names, dropped = clearcpuid_names(hidden)
    text = ",".join(names)
    assert len(text) <= 127
    assert len(names) == len(set(names)) and not set(names) & set(dropped)
    # exactly the names Linux does not clear by itself, each either chosen or reported
    assert set(names) | set(dropped) == {n for n in hidden if not implied(n, hidden)}
    # greedy in priority order: nothing dropped would still fit
    for name in dropped:
        assert len(text) + 1 + len(name) > 127
    rank = {n: i for i, n in enumerate(CLEARCPUID_PRIORITY)}
    keys = [(rank.get(n, len(rank)), n) for n in names]
    assert keys == sorted(keys)
    # clearcpuid= must stay one word: no separators inside a name
    assert all("," not in n and " " not in n and n for n in names)


def test_clearcpuid_accepts_list_and_frozenset() -> None:
    assert clearcpuid_names(["pcid", "xsave"]) == clearcpuid_names(frozenset({"xsave", "pcid"}))


def test_module_keeps_linux_names() -> None:
    # a few names whose /proc/cpuinfo spelling differs from the vendor's mnemonic
    for name in ("sha_ni", "lahf_lm", "tsc_deadline_timer", "pdpe1gb", "avx512_vbmi2", "sse4_1"):
        assert name in cpuid.FEATURES, name
