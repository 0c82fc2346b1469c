"""The Hyper-V CPUID leaves 0x40000000-0x40000006, advertising exactly what pyvmm's partition
implements, and their swap for KVM's own hypervisor leaves.

What Linux 6.12 needs (arch/x86/kernel/cpu/mshyperv.c, arch/x86/hyperv/hv_init.c):
- 0x40000000: "Microsoft Hv" and a max leaf of at least 0x40000005, else no Hyper-V;
- 0x40000003.EAX: the HYPERCALL and VP_INDEX MSRs, else no Hyper-V; then hyperv_init() sets
  up the hypercall page, and hv_is_hyperv_initialized() (which hv_vmbus checks) is true;
- SynIC MSRs for hv_vmbus; the POST_MESSAGES and SIGNAL_EVENTS privileges for its hypercalls;
- HV_ACCESS_TSC_INVARIANT, or Linux marks the TSC unstable "running on Hyper-V" (and, with no
  Hyper-V clocksource advertised, would be left without a good clocksource);
- the frequency MSRs, so the guest skips TSC and APIC-timer calibration.

Not advertised: the reference counter MSR, the reference TSC page and synthetic timers (a
clocksource read through an MSR is a user-space exit per read), APIC-access MSRs, IPI and
TLB-flush hypercalls, and auto-EOI (HV_DEPRECATING_AEOI_RECOMMENDED).

KVM's signature leaves must go: Linux picks the hypervisor whose detection scores highest, and
KVM's signature, found at 0x40000100 or above, would win over Hyper-V's at 0x40000000.
"""

from __future__ import annotations

from devices.hyperv import hv_abi as hv

HYPERVISOR_LEAF_FIRST = 0x40000000
HYPERVISOR_LEAF_LAST = 0x4FFFFFFF
HYPERV_CPUID_MAX_LEAF = hv.HYPERV_CPUID_HARDWARE_FEATURES

# The version pyvmm reports (HYPERV_CPUID_VERSION); Linux only prints it.
HV_VERSION_BUILD = 17763
HV_VERSION_MAJOR = 10
HV_VERSION_MINOR = 0


def _u32s(text: bytes) -> list[int]:
    return [int.from_bytes(text[i:i + 4], "little") for i in range(0, len(text), 4)]


def partition_features(frequency_msrs: bool) -> tuple[int, int, int]:
    """HYPERV_CPUID_FEATURES (EAX, EBX, EDX) for what the partition implements."""
    eax = (hv.HV_MSR_HYPERCALL_AVAILABLE | hv.HV_MSR_VP_INDEX_AVAILABLE | hv.HV_MSR_SYNIC_AVAILABLE
           | hv.HV_ACCESS_TSC_INVARIANT)
    ebx = hv.HV_POST_MESSAGES | hv.HV_SIGNAL_EVENTS
    edx = hv.HV_FEATURE_GUEST_CRASH_MSR_AVAILABLE
    if frequency_msrs:
        eax |= hv.HV_ACCESS_FREQUENCY_MSRS
        edx |= hv.HV_FEATURE_FREQUENCY_MSRS_AVAILABLE
    return eax, ebx, edx


def _leaf(function: int, eax: int = 0, ebx: int = 0, ecx: int = 0, edx: int = 0) -> dict[str, int]:
    return {"function": function, "index": 0, "flags": 0, "eax": eax, "ebx": ebx, "ecx": ecx, "edx": edx}


def hyperv_cpuid_leaves(*, max_vps: int, frequency_msrs: bool) -> list[dict[str, int]]:
    """Leaves 0x40000000-0x40000006 (KVM_SET_CPUID2 entry dicts)."""
    if max_vps < 1:
        raise ValueError("max_vps must be at least 1")
    vendor = _u32s(hv.HYPERV_VENDOR_ID)
    features = partition_features(frequency_msrs)
    return [
        _leaf(hv.HYPERV_CPUID_VENDOR_AND_MAX_FUNCTIONS, HYPERV_CPUID_MAX_LEAF, *vendor),
        _leaf(hv.HYPERV_CPUID_INTERFACE, _u32s(hv.HYPERV_INTERFACE_SIGNATURE)[0]),
        _leaf(hv.HYPERV_CPUID_VERSION, HV_VERSION_BUILD, HV_VERSION_MAJOR << 16 | HV_VERSION_MINOR),
        _leaf(hv.HYPERV_CPUID_FEATURES, features[0], features[1], 0, features[2]),
        _leaf(hv.HYPERV_CPUID_ENLIGHTMENT_INFO, hv.HV_DEPRECATING_AEOI_RECOMMENDED, hv.HV_SPINLOCK_NEVER_NOTIFY),
        _leaf(hv.HYPERV_CPUID_IMPLEMENT_LIMITS, max_vps, max_vps),
        _leaf(hv.HYPERV_CPUID_HARDWARE_FEATURES),
    ]


def with_hyperv_leaves(entries: list[dict[str, int]], leaves: list[dict[str, int]]) -> list[dict[str, int]]:
    """`entries` with every hypervisor leaf (KVM's signature, features, timing) replaced by `leaves`."""
    kept = [dict(e) for e in entries if not HYPERVISOR_LEAF_FIRST <= e["function"] <= HYPERVISOR_LEAF_LAST]
    return kept + [dict(leaf) for leaf in leaves]
