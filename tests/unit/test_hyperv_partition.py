"""The Hyper-V partition's MSR layer: every implemented MSR, the #GP cases, reset, stats."""

from __future__ import annotations

import logging
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.hyperv import hv_abi as hv
from devices.hyperv.hypercalls import HypercallRegisters, hypercall_page
from devices.hyperv.partition import HyperV
from tests.hyperv_fakes import FakeGuestMemory, RecordingInterrupts
from vmm.msr import MsrFault

TSC_HZ = 2_500_000_000
APIC_HZ = 1_000_000_000
LINUX_GUEST_ID = 0x8100_0000_060C_0000
HC_PAGE = 0x5000


class Crashes:
    def __init__(self) -> None:
        self.reports: list[tuple[int, ...]] = []

    def __call__(self, params: tuple[int, ...]) -> None:
        self.reports.append(params)


def make(vps: int = 2, tsc_hz: int = TSC_HZ, apic_hz: int = APIC_HZ, regs=None):
    mem = FakeGuestMemory()
    crashes = Crashes()
    irq = RecordingInterrupts()
    p = HyperV(vp_count=vps, memory=mem, raise_interrupt=irq, on_guest_crash=crashes, tsc_hz=tsc_hz,
               apic_hz=apic_hz, registers=regs or (lambda: HypercallRegisters(0, 0, 0, 0)))
    return p, mem, crashes, irq


READ_ONLY = {hv.HV_X64_MSR_VP_INDEX, hv.HV_X64_MSR_TSC_FREQUENCY, hv.HV_X64_MSR_APIC_FREQUENCY,
             hv.HV_X64_MSR_SVERSION}
READ_WRITE = {hv.HV_X64_MSR_GUEST_OS_ID, hv.HV_X64_MSR_HYPERCALL, hv.HV_X64_MSR_VP_ASSIST_PAGE,
              hv.HV_X64_MSR_SCONTROL, hv.HV_X64_MSR_SIEFP, hv.HV_X64_MSR_SIMP, hv.HV_X64_MSR_EOM,
              *range(hv.HV_X64_MSR_SINT0, hv.HV_X64_MSR_SINT15 + 1),
              *range(hv.HV_X64_MSR_CRASH_P0, hv.HV_X64_MSR_CRASH_CTL + 1), hv.HV_X64_MSR_TSC_INVARIANT_CONTROL}
IMPLEMENTED = READ_ONLY | READ_WRITE


def test_every_unimplemented_msr_in_the_range_is_gp_both_ways() -> None:
    p, _, _, _ = make()
    for index in range(hv.HV_MSR_RANGE_FIRST, hv.HV_MSR_RANGE_LAST + 1):
        if index in IMPLEMENTED:
            p.msr_read(0, index)
            continue
        with pytest.raises(MsrFault):
            p.msr_read(0, index)
        with pytest.raises(MsrFault):
            p.msr_write(0, index, 0)
    gp = p.stats()["msr-gp"]
    assert len(gp) == 0x200 - len(IMPLEMENTED)
    assert gp[hex(hv.HV_X64_MSR_TIME_REF_COUNT)] == 2
    # Not advertised, so not implemented: reference counter, TSC page, timers, reset, APIC MSRs.
    for index in (hv.HV_X64_MSR_TIME_REF_COUNT, hv.HV_X64_MSR_REFERENCE_TSC, hv.HV_X64_MSR_STIMER0_CONFIG,
                  hv.HV_X64_MSR_RESET, hv.HV_X64_MSR_VP_RUNTIME, hv.HV_X64_MSR_EOI, hv.HV_X64_MSR_GUEST_IDLE):
        assert hex(index) in gp


def test_unknown_msr_is_logged_once(caplog) -> None:
    p, _, _, _ = make()
    with caplog.at_level(logging.INFO, logger="pyvmm.hyperv"):
        for _ in range(5):
            with pytest.raises(MsrFault):
                p.msr_read(0, hv.HV_X64_MSR_TIME_REF_COUNT)
    assert sum("0x40000020" in r.getMessage() for r in caplog.records) == 1
    assert p.stats()["msr-gp"] == {"0x40000020": 5}


@pytest.mark.parametrize("index", sorted(READ_ONLY))
def test_read_only_msrs_refuse_writes(index: int) -> None:
    p, _, _, _ = make()
    before = p.msr_read(1, index)
    with pytest.raises(MsrFault):
        p.msr_write(1, index, before + 1)
    assert p.msr_read(1, index) == before


def test_vp_index_is_the_vp() -> None:
    p, _, _, _ = make(vps=3)
    assert [p.msr_read(vp, hv.HV_X64_MSR_VP_INDEX) for vp in range(3)] == [0, 1, 2]
    with pytest.raises(MsrFault):
        p.msr_read(3, hv.HV_X64_MSR_VP_INDEX)


def test_frequency_msrs() -> None:
    p, _, _, _ = make()
    assert p.msr_read(0, hv.HV_X64_MSR_TSC_FREQUENCY) == TSC_HZ
    assert p.msr_read(1, hv.HV_X64_MSR_APIC_FREQUENCY) == APIC_HZ


def test_frequency_msrs_are_absent_when_the_tsc_rate_is_unknown() -> None:
    p, _, _, _ = make(tsc_hz=0)
    for index in (hv.HV_X64_MSR_TSC_FREQUENCY, hv.HV_X64_MSR_APIC_FREQUENCY):
        with pytest.raises(MsrFault):
            p.msr_read(0, index)
    features = next(e for e in p.cpuid_leaves() if e["function"] == hv.HYPERV_CPUID_FEATURES)
    assert not features["eax"] & hv.HV_ACCESS_FREQUENCY_MSRS
    assert not features["edx"] & hv.HV_FEATURE_FREQUENCY_MSRS_AVAILABLE


def test_guest_os_id_and_the_hypercall_page() -> None:
    p, mem, _, _ = make()
    assert not p.hypercall_enabled()
    # Before GUEST_OS_ID is set the hypercall MSR cannot be enabled (TLFS).
    p.msr_write(0, hv.HV_X64_MSR_HYPERCALL, HC_PAGE | 1)
    assert p.msr_read(0, hv.HV_X64_MSR_HYPERCALL) == 0
    assert mem.ram[HC_PAGE:HC_PAGE + 4096] == bytes(4096)
    assert not p.hypercall_enabled()
    p.msr_write(1, hv.HV_X64_MSR_GUEST_OS_ID, LINUX_GUEST_ID)
    assert p.msr_read(0, hv.HV_X64_MSR_GUEST_OS_ID) == LINUX_GUEST_ID   # partition-wide
    p.msr_write(0, hv.HV_X64_MSR_HYPERCALL, HC_PAGE | 1 | 0xFFE)         # reserved bits dropped
    assert p.msr_read(1, hv.HV_X64_MSR_HYPERCALL) == HC_PAGE | 1
    assert bytes(mem.ram[HC_PAGE:HC_PAGE + 4096]) == hypercall_page(p.port)
    assert p.hypercall_enabled()
    # Writing GUEST_OS_ID 0 disables the page again.
    p.msr_write(0, hv.HV_X64_MSR_GUEST_OS_ID, 0)
    assert not p.hypercall_enabled()
    assert p.msr_read(0, hv.HV_X64_MSR_HYPERCALL) == HC_PAGE


def test_hypercall_page_disable_keeps_the_address() -> None:
    p, mem, _, _ = make()
    p.msr_write(0, hv.HV_X64_MSR_GUEST_OS_ID, LINUX_GUEST_ID)
    p.msr_write(0, hv.HV_X64_MSR_HYPERCALL, HC_PAGE | 1)
    p.msr_write(0, hv.HV_X64_MSR_HYPERCALL, HC_PAGE)
    assert not p.hypercall_enabled() and p.msr_read(0, hv.HV_X64_MSR_HYPERCALL) == HC_PAGE


def test_hypercall_page_outside_guest_memory_is_counted() -> None:
    p, _, _, _ = make()
    p.msr_write(0, hv.HV_X64_MSR_GUEST_OS_ID, LINUX_GUEST_ID)
    p.msr_write(0, hv.HV_X64_MSR_HYPERCALL, 0xFFFF_FFFF_FFFF_F001)
    assert p.stats()["bad-guest-pages"]["hypercall"] == 1


def test_the_hypercall_port_answers_only_while_the_page_is_enabled() -> None:
    regs = HypercallRegisters(0, hv.HVCALL_SIGNAL_EVENT | hv.HV_HYPERCALL_FAST_BIT, 0x42, 0)
    p, _, _, _ = make(regs=lambda: regs)
    events = []
    p.connections.register_event(0x42, lambda: events.append(1) or 0)
    assert p.hypercall_device.read(0, 4) == b"\xff" * 4
    p.msr_write(0, hv.HV_X64_MSR_GUEST_OS_ID, LINUX_GUEST_ID)
    p.msr_write(0, hv.HV_X64_MSR_HYPERCALL, HC_PAGE | 1)
    assert p.hypercall_device.read(0, 4) == bytes(4)
    assert events == [1]
    assert p.stats()["hypercalls"]["calls"] == {"HvSignalEvent": {"HV_STATUS_SUCCESS": 1}}


def test_vp_assist_page_is_stored_per_vp() -> None:
    p, mem, _, _ = make()
    mem.ram[0x7000:0x8000] = b"\x11" * 4096
    p.msr_write(1, hv.HV_X64_MSR_VP_ASSIST_PAGE, 0x7001)
    assert p.msr_read(1, hv.HV_X64_MSR_VP_ASSIST_PAGE) == 0x7001
    assert p.msr_read(0, hv.HV_X64_MSR_VP_ASSIST_PAGE) == 0
    assert mem.ram[0x7000:0x8000] == b"\x11" * 4096   # only stored: no assist feature touches it


def test_synic_msrs_go_to_the_synic() -> None:
    p, mem, _, irq = make()
    p.msr_write(1, hv.HV_X64_MSR_SIMP, 0x9000 | 1)
    p.msr_write(1, hv.HV_X64_MSR_SINT0 + 2, 0xF3)
    p.msr_write(1, hv.HV_X64_MSR_SCONTROL, 1)
    assert p.msr_read(1, hv.HV_X64_MSR_SVERSION) == 1
    assert p.synic.post_message(1, 2, 1, b"hi")
    assert struct.unpack_from("<IB", mem.ram, 0x9000 + 2 * 256) == (1, 2)
    assert irq.raised == [(1, 0xF3)]
    with pytest.raises(MsrFault):
        p.msr_write(0, hv.HV_X64_MSR_SINT0, 3)      # vector below 16, unmasked
    assert p.stats()["msr-gp"] == {hex(hv.HV_X64_MSR_SINT0): 1}


def test_crash_msrs_report_a_guest_panic() -> None:
    p, _, crashes, _ = make()
    assert p.msr_read(0, hv.HV_X64_MSR_CRASH_CTL) == hv.HV_CRASH_CTL_CRASH_NOTIFY
    for i in range(5):
        p.msr_write(0, hv.HV_X64_MSR_CRASH_P0 + i, 0x100 + i)
    assert p.msr_read(1, hv.HV_X64_MSR_CRASH_P3) == 0x103
    p.msr_write(0, hv.HV_X64_MSR_CRASH_CTL, hv.HV_CRASH_CTL_CRASH_NOTIFY_MSG)   # no notify bit
    assert crashes.reports == []
    p.msr_write(0, hv.HV_X64_MSR_CRASH_CTL, hv.HV_CRASH_CTL_CRASH_NOTIFY)
    assert crashes.reports == [(0x100, 0x101, 0x102, 0x103, 0x104)]
    assert p.stats()["crash-reports"] == 1


def test_tsc_invariant_control() -> None:
    p, _, _, _ = make()
    p.msr_write(0, hv.HV_X64_MSR_TSC_INVARIANT_CONTROL, hv.HV_EXPOSE_INVARIANT_TSC)
    assert p.msr_read(1, hv.HV_X64_MSR_TSC_INVARIANT_CONTROL) == 1


def test_reset_returns_to_power_on_but_keeps_connections() -> None:
    p, _, _, _ = make()
    p.connections.register_message(1, lambda t, b: 0)
    p.msr_write(0, hv.HV_X64_MSR_GUEST_OS_ID, LINUX_GUEST_ID)
    p.msr_write(0, hv.HV_X64_MSR_HYPERCALL, HC_PAGE | 1)
    p.msr_write(1, hv.HV_X64_MSR_VP_ASSIST_PAGE, 0x7001)
    p.msr_write(0, hv.HV_X64_MSR_CRASH_P1, 5)
    p.msr_write(0, hv.HV_X64_MSR_SCONTROL, 1)
    p.msr_write(0, hv.HV_X64_MSR_TSC_INVARIANT_CONTROL, 1)
    p.synic.post_message(0, 0, 1, b"x")
    p.reset()
    assert not p.hypercall_enabled()
    for index in (hv.HV_X64_MSR_GUEST_OS_ID, hv.HV_X64_MSR_HYPERCALL, hv.HV_X64_MSR_CRASH_P1,
                  hv.HV_X64_MSR_SCONTROL, hv.HV_X64_MSR_TSC_INVARIANT_CONTROL):
        assert p.msr_read(0, index) == 0, hex(index)
    assert p.msr_read(1, hv.HV_X64_MSR_VP_ASSIST_PAGE) == 0
    assert p.synic.pending(0, 0) == 0
    assert p.connections.message_handler(1) is not None


def test_stats_shape() -> None:
    p, _, _, _ = make()
    s = p.stats()
    assert set(s) >= {"hypercall-page", "hypercalls", "msr-gp", "synic", "bad-guest-pages", "crash-reports"}
    assert s["hypercall-page"] == {"enabled": False, "gpa": "0x0", "port": hex(p.port)}
    assert s["synic"]["messages-pending"] == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(hv.HV_MSR_RANGE_FIRST - 2, hv.HV_MSR_RANGE_LAST + 2),
                          st.integers(0, (1 << 64) - 1), st.booleans()), max_size=30))
def test_hostile_msr_traffic_raises_only_gp(accesses) -> None:
    p, _, crashes, _ = make(vps=2)
    for vp, index, value, write in accesses:
        try:
            if write:
                p.msr_write(vp, index, value)
            else:
                assert 0 <= p.msr_read(vp, index) < 1 << 64
        except MsrFault:
            pass
    assert len(crashes.reports) <= sum(1 for a in accesses if a[1] == hv.HV_X64_MSR_CRASH_CTL and a[3])
    assert p.stats()["hypercalls"]["calls"] == {}
