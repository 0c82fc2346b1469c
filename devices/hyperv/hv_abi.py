"""The Hyper-V guest ABI as numbers: synthetic MSRs, CPUID leaves and feature bits, hypercall
codes and control-word fields, and the SynIC message and event-flag page layouts.

Names follow the Hyper-V TLFS and Linux's `hyperv-tlfs.h`; the hypercall status codes live in
`devices.hyperv.interfaces`. Nothing here has behaviour.
"""

from __future__ import annotations

import struct

# --- synthetic MSRs --------------------------------------------------------------------------
HV_X64_MSR_GUEST_OS_ID = 0x40000000
HV_X64_MSR_HYPERCALL = 0x40000001
HV_X64_MSR_VP_INDEX = 0x40000002
HV_X64_MSR_RESET = 0x40000003
HV_X64_MSR_VP_RUNTIME = 0x40000010
HV_X64_MSR_TIME_REF_COUNT = 0x40000020
HV_X64_MSR_REFERENCE_TSC = 0x40000021
HV_X64_MSR_TSC_FREQUENCY = 0x40000022
HV_X64_MSR_APIC_FREQUENCY = 0x40000023
HV_X64_MSR_EOI = 0x40000070
HV_X64_MSR_ICR = 0x40000071
HV_X64_MSR_TPR = 0x40000072
HV_X64_MSR_VP_ASSIST_PAGE = 0x40000073
HV_X64_MSR_SCONTROL = 0x40000080
HV_X64_MSR_SVERSION = 0x40000081
HV_X64_MSR_SIEFP = 0x40000082
HV_X64_MSR_SIMP = 0x40000083
HV_X64_MSR_EOM = 0x40000084
HV_X64_MSR_SINT0 = 0x40000090
HV_X64_MSR_SINT15 = 0x4000009F
HV_X64_MSR_STIMER0_CONFIG = 0x400000B0
HV_X64_MSR_GUEST_IDLE = 0x400000F0
HV_X64_MSR_CRASH_P0 = 0x40000100
HV_X64_MSR_CRASH_P1 = 0x40000101
HV_X64_MSR_CRASH_P2 = 0x40000102
HV_X64_MSR_CRASH_P3 = 0x40000103
HV_X64_MSR_CRASH_P4 = 0x40000104
HV_X64_MSR_CRASH_CTL = 0x40000105
HV_X64_MSR_TSC_INVARIANT_CONTROL = 0x40000118

# The range pyvmm claims from KVM (MSR filter) so that every access exits to user space.
HV_MSR_RANGE_FIRST = 0x40000000
HV_MSR_RANGE_LAST = 0x400001FF

HV_X64_MSR_CRASH_PARAMS = HV_X64_MSR_CRASH_CTL - HV_X64_MSR_CRASH_P0  # P0..P4

# HV_X64_MSR_HYPERCALL / VP_ASSIST_PAGE / SIMP / SIEFP: bit 0 enable, GPA page in bits 12-63.
HV_X64_MSR_HYPERCALL_ENABLE = 1 << 0
HV_X64_MSR_VP_ASSIST_PAGE_ENABLE = 1 << 0
HV_SYNIC_SIMP_ENABLE = 1 << 0
HV_SYNIC_SIEFP_ENABLE = 1 << 0
HV_SYNIC_CONTROL_ENABLE = 1 << 0
HV_PAGE_ADDRESS_MASK = 0xFFFF_FFFF_FFFF_F000

# SINTx register fields.
HV_SYNIC_SINT_VECTOR_MASK = 0xFF
HV_SYNIC_SINT_MASKED = 1 << 16
HV_SYNIC_SINT_AUTO_EOI = 1 << 17
HV_SYNIC_SINT_POLLING = 1 << 18
HV_SYNIC_SINT_WRITABLE = (HV_SYNIC_SINT_VECTOR_MASK | HV_SYNIC_SINT_MASKED | HV_SYNIC_SINT_AUTO_EOI
                          | HV_SYNIC_SINT_POLLING)
HV_SYNIC_FIRST_VALID_VECTOR = 16
HV_SYNIC_SINT_COUNT = 16
HV_SYNIC_VERSION_1 = 0x1

# Crash control: what the partition supports (read) and what the guest reports (write).
HV_CRASH_CTL_CRASH_NOTIFY_MSG = 1 << 62
HV_CRASH_CTL_CRASH_NOTIFY = 1 << 63

HV_EXPOSE_INVARIANT_TSC = 1 << 0

# --- CPUID --------------------------------------------------------------------------------------
HYPERV_CPUID_VENDOR_AND_MAX_FUNCTIONS = 0x40000000
HYPERV_CPUID_INTERFACE = 0x40000001
HYPERV_CPUID_VERSION = 0x40000002
HYPERV_CPUID_FEATURES = 0x40000003
HYPERV_CPUID_ENLIGHTMENT_INFO = 0x40000004
HYPERV_CPUID_IMPLEMENT_LIMITS = 0x40000005
HYPERV_CPUID_HARDWARE_FEATURES = 0x40000006
HYPERV_CPUID_MIN = 0x40000005  # Linux ignores a Hyper-V whose max leaf is below this

HYPERV_VENDOR_ID = b"Microsoft Hv"
HYPERV_INTERFACE_SIGNATURE = b"Hv#1"

# HYPERV_CPUID_FEATURES.EAX: partition privileges, low half (which MSRs exist).
HV_MSR_VP_RUNTIME_AVAILABLE = 1 << 0
HV_MSR_TIME_REF_COUNT_AVAILABLE = 1 << 1
HV_MSR_SYNIC_AVAILABLE = 1 << 2
HV_MSR_SYNTIMER_AVAILABLE = 1 << 3
HV_MSR_APIC_ACCESS_AVAILABLE = 1 << 4
HV_MSR_HYPERCALL_AVAILABLE = 1 << 5
HV_MSR_VP_INDEX_AVAILABLE = 1 << 6
HV_MSR_RESET_AVAILABLE = 1 << 7
HV_MSR_REFERENCE_TSC_AVAILABLE = 1 << 9
HV_ACCESS_FREQUENCY_MSRS = 1 << 11
HV_ACCESS_TSC_INVARIANT = 1 << 15

# HYPERV_CPUID_FEATURES.EBX: partition privileges, high half (which hypercalls are allowed).
HV_POST_MESSAGES = 1 << 4
HV_SIGNAL_EVENTS = 1 << 5
HV_ENABLE_EXTENDED_HYPERCALLS = 1 << 20

# HYPERV_CPUID_FEATURES.EDX: feature group D.
HV_FEATURE_FREQUENCY_MSRS_AVAILABLE = 1 << 8
HV_FEATURE_GUEST_CRASH_MSR_AVAILABLE = 1 << 10

# HYPERV_CPUID_ENLIGHTMENT_INFO.EAX: recommendations.
HV_X64_APIC_ACCESS_RECOMMENDED = 1 << 3
HV_DEPRECATING_AEOI_RECOMMENDED = 1 << 9
HV_SPINLOCK_NEVER_NOTIFY = 0xFFFFFFFF  # ENLIGHTMENT_INFO.EBX: spinlock retries before notifying

# --- hypercalls ---------------------------------------------------------------------------------
HVCALL_POST_MESSAGE = 0x005C
HVCALL_SIGNAL_EVENT = 0x005D

# The hypercall input value (RCX).
HV_HYPERCALL_CODE_MASK = 0xFFFF
HV_HYPERCALL_FAST_BIT = 1 << 16
HV_HYPERCALL_VARHEAD_MASK = 0x3FF << 17          # bits 17-26
HV_HYPERCALL_RSVD_MASK = (0x1F << 27) | (0xF << 44) | (0xF << 60)
HV_HYPERCALL_REP_COMP_MASK = 0xFFF << 32         # bits 32-43
HV_HYPERCALL_REP_START_MASK = 0xFFF << 48        # bits 48-59
HV_HYPERCALL_RESULT_MASK = 0xFFFF

HV_HYPERCALL_INPUT_ALIGNMENT = 8
HV_HYP_PAGE_SIZE = 4096

# --- SynIC pages --------------------------------------------------------------------------------
HVMSG_NONE = 0x00000000
HV_MESSAGE_TYPE_HYPERVISOR_FIRST = 0x80000000   # message types at or above are the hypervisor's
HV_MESSAGE_SIZE = 256
HV_MESSAGE_PAYLOAD_BYTE_COUNT = 240
HV_MESSAGE_FLAG_PENDING = 1 << 0                # hv_message_flags.msg_pending

# struct hv_message_header: message_type u32, payload_size u8, message_flags u8, reserved u16,
# sender u64; then the payload.
HV_MESSAGE_HEADER = struct.Struct("<IBBHQ")
HV_MESSAGE_TYPE_OFFSET = 0
HV_MESSAGE_FLAGS_OFFSET = 5
HV_MESSAGE_PAYLOAD_OFFSET = HV_MESSAGE_HEADER.size  # 16

HV_EVENT_FLAGS_BYTE_COUNT = 256                 # per SINT in the SIEF page
HV_EVENT_FLAGS_COUNT = HV_EVENT_FLAGS_BYTE_COUNT * 8

# HvPostMessage input: connection_id u32, reserved u32, message_type u32, payload_size u32,
# payload[240].
HV_INPUT_POST_MESSAGE = struct.Struct("<IIII")
HV_INPUT_POST_MESSAGE_SIZE = HV_INPUT_POST_MESSAGE.size + HV_MESSAGE_PAYLOAD_BYTE_COUNT  # 256
# HvSignalEvent input: connection_id u32, flag_number u16, rsvd u16 (the fast form packs the
# same 8 bytes into RDX).
HV_INPUT_SIGNAL_EVENT = struct.Struct("<IHH")

HYPERCALL_NAMES = {HVCALL_POST_MESSAGE: "HvPostMessage", HVCALL_SIGNAL_EVENT: "HvSignalEvent"}


def hypercall_name(code: int) -> str:
    """'HvPostMessage', or the code in hex for calls pyvmm does not implement."""
    return HYPERCALL_NAMES.get(code, f"{code:#06x}")
