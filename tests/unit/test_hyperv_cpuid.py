"""The Hyper-V CPUID leaves: what Linux needs to detect Hyper-V, and nothing pyvmm lacks."""

from __future__ import annotations

import pytest

from devices.hyperv import hv_abi as hv
from devices.hyperv.cpuid import hyperv_cpuid_leaves, with_hyperv_leaves
from devices.hyperv.partition import HyperV
from tests.hyperv_fakes import FakeGuestMemory, RecordingInterrupts
from vmm import cpuid as vmm_cpuid
from vmm.msr import MsrFault


def leaves(**kw) -> dict[int, dict[str, int]]:
    kw.setdefault("max_vps", 2)
    kw.setdefault("frequency_msrs", True)
    return {e["function"]: e for e in hyperv_cpuid_leaves(**kw)}


def text(*regs: int) -> bytes:
    return b"".join(r.to_bytes(4, "little") for r in regs)


def test_leaves_0x40000000_to_0x40000006() -> None:
    got = leaves()
    assert sorted(got) == list(range(0x40000000, 0x40000007))
    assert all(e["index"] == 0 and e["flags"] == 0 for e in got.values())


def test_vendor_and_interface_signatures() -> None:
    got = leaves()
    v = got[hv.HYPERV_CPUID_VENDOR_AND_MAX_FUNCTIONS]
    assert text(v["ebx"], v["ecx"], v["edx"]) == b"Microsoft Hv"
    assert hv.HYPERV_CPUID_MIN <= v["eax"] == 0x40000006   # Linux needs at least 0x40000005
    assert text(got[hv.HYPERV_CPUID_INTERFACE]["eax"]) == b"Hv#1"
    version = got[hv.HYPERV_CPUID_VERSION]
    assert version["eax"] > 0 and version["ebx"] >> 16 >= 6


def test_features_linux_requires_for_hyperv_and_vmbus() -> None:
    f = leaves()[hv.HYPERV_CPUID_FEATURES]
    for bit in (hv.HV_MSR_HYPERCALL_AVAILABLE, hv.HV_MSR_VP_INDEX_AVAILABLE, hv.HV_MSR_SYNIC_AVAILABLE,
                hv.HV_ACCESS_FREQUENCY_MSRS, hv.HV_ACCESS_TSC_INVARIANT):
        assert f["eax"] & bit, hex(bit)
    assert f["ebx"] == hv.HV_POST_MESSAGES | hv.HV_SIGNAL_EVENTS
    assert f["edx"] == hv.HV_FEATURE_FREQUENCY_MSRS_AVAILABLE | hv.HV_FEATURE_GUEST_CRASH_MSR_AVAILABLE
    assert f["ecx"] == 0


def test_features_pyvmm_does_not_implement_are_not_advertised() -> None:
    f = leaves()[hv.HYPERV_CPUID_FEATURES]
    for bit in (hv.HV_MSR_TIME_REF_COUNT_AVAILABLE, hv.HV_MSR_REFERENCE_TSC_AVAILABLE, hv.HV_MSR_SYNTIMER_AVAILABLE,
                hv.HV_MSR_APIC_ACCESS_AVAILABLE, hv.HV_MSR_RESET_AVAILABLE, hv.HV_MSR_VP_RUNTIME_AVAILABLE):
        assert not f["eax"] & bit, hex(bit)
    assert not f["ebx"] & hv.HV_ENABLE_EXTENDED_HYPERCALLS
    assert not f["ebx"] & (1 << 12)   # HV_CPU_MANAGEMENT: would make Linux a root partition
    assert not f["ebx"] & (1 << 22)   # HV_ISOLATION


def test_recommendations_and_limits() -> None:
    got = leaves(max_vps=3)
    hints = got[hv.HYPERV_CPUID_ENLIGHTMENT_INFO]
    assert hints["eax"] == hv.HV_DEPRECATING_AEOI_RECOMMENDED
    assert not hints["eax"] & hv.HV_X64_APIC_ACCESS_RECOMMENDED
    assert hints["ebx"] == 0xFFFFFFFF
    assert got[hv.HYPERV_CPUID_IMPLEMENT_LIMITS]["eax"] == 3
    assert got[hv.HYPERV_CPUID_HARDWARE_FEATURES] == {"function": 0x40000006, "index": 0, "flags": 0,
                                                      "eax": 0, "ebx": 0, "ecx": 0, "edx": 0}
    with pytest.raises(ValueError):
        leaves(max_vps=0)


def test_kvm_leaves_are_replaced() -> None:
    kvm_sig = int.from_bytes(b"KVMK", "little")
    base = [{"function": 0, "index": 0, "flags": 0, "eax": 0xD, "ebx": 1, "ecx": 2, "edx": 3},
            {"function": 1, "index": 0, "flags": 0, "eax": 0, "ebx": 0, "ecx": 1 << 31, "edx": 0},
            {"function": 0x40000000, "index": 0, "flags": 0, "eax": 0x40000010, "ebx": kvm_sig, "ecx": 0, "edx": 0},
            {"function": 0x40000001, "index": 0, "flags": 0, "eax": 0xFFFF, "ebx": 0, "ecx": 0, "edx": 0},
            {"function": 0x40000010, "index": 0, "flags": 0, "eax": 2_000_000, "ebx": 1_000_000, "ecx": 0, "edx": 0},
            {"function": 0x40000100, "index": 0, "flags": 0, "eax": 0x40000101, "ebx": kvm_sig, "ecx": 0, "edx": 0},
            {"function": 0x80000000, "index": 0, "flags": 0, "eax": 0x80000008, "ebx": 0, "ecx": 0, "edx": 0}]
    out = with_hyperv_leaves(base, hyperv_cpuid_leaves(max_vps=1, frequency_msrs=False))
    functions = [e["function"] for e in out]
    assert functions == [0, 1, 0x80000000, *range(0x40000000, 0x40000007)]
    assert all(e["ebx"] != kvm_sig for e in out)
    assert base[2]["ebx"] == kvm_sig   # the input is not modified


def test_every_advertised_msr_is_implemented() -> None:
    p = HyperV(vp_count=1, memory=FakeGuestMemory(), raise_interrupt=RecordingInterrupts(),
               on_guest_crash=lambda params: None, tsc_hz=1_000_000_000, apic_hz=vmm_cpuid.KVM_APIC_BUS_KHZ * 1000)
    f = {e["function"]: e for e in p.cpuid_leaves()}[hv.HYPERV_CPUID_FEATURES]
    advertised = {hv.HV_MSR_HYPERCALL_AVAILABLE: [hv.HV_X64_MSR_GUEST_OS_ID, hv.HV_X64_MSR_HYPERCALL],
                  hv.HV_MSR_VP_INDEX_AVAILABLE: [hv.HV_X64_MSR_VP_INDEX],
                  hv.HV_MSR_SYNIC_AVAILABLE: [hv.HV_X64_MSR_SCONTROL, hv.HV_X64_MSR_SVERSION, hv.HV_X64_MSR_SIEFP,
                                              hv.HV_X64_MSR_SIMP, hv.HV_X64_MSR_EOM, hv.HV_X64_MSR_SINT15],
                  hv.HV_ACCESS_FREQUENCY_MSRS: [hv.HV_X64_MSR_TSC_FREQUENCY, hv.HV_X64_MSR_APIC_FREQUENCY],
                  hv.HV_ACCESS_TSC_INVARIANT: [hv.HV_X64_MSR_TSC_INVARIANT_CONTROL]}
    for bit, msrs in advertised.items():
        assert f["eax"] & bit
        for index in msrs:
            p.msr_read(0, index)   # no MsrFault
    for index in range(hv.HV_X64_MSR_CRASH_P0, hv.HV_X64_MSR_CRASH_CTL + 1):
        p.msr_read(0, index)
    with pytest.raises(MsrFault):
        p.msr_read(0, hv.HV_X64_MSR_TIME_REF_COUNT)
