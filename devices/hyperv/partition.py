"""The Hyper-V partition pyvmm emulates in user space: its synthetic MSRs, the hypercall page,
the SynIC and the connection table VMBus registers with.

`HyperV.msr_read` / `msr_write` serve every MSR of 0x40000000-0x400001FF for the machine's
user-space MSR exits and raise `MsrFault` where Hyper-V gives #GP: an MSR the partition does
not implement (logged once per MSR), a write to a read-only one. Implemented:

| MSR | behaviour |
| --- | --- |
| GUEST_OS_ID | read/write, partition-wide; writing 0 disables the hypercall page |
| HYPERCALL | read/write; enabling it writes the hypercall code into the page, and is ignored while GUEST_OS_ID is 0 (TLFS) |
| VP_INDEX | read-only: the VP number (= the vCPU index = its APIC id) |
| TSC_FREQUENCY, APIC_FREQUENCY | read-only, when the frequencies are known |
| VP_ASSIST_PAGE | read/write per VP, stored only (no assist feature is offered) |
| SCONTROL, SVERSION, SIEFP, SIMP, EOM, SINT0-15 | the SynIC (synic.py) |
| CRASH_P0-P4, CRASH_CTL | a CRASH_CTL write with CRASH_NOTIFY reports a guest panic |
| TSC_INVARIANT_CONTROL | read/write, stored (Linux writes it when HV_ACCESS_TSC_INVARIANT is offered) |

Everything the guest set is partition state that `reset()` returns to power-on; the
connections VMBus registered are not guest state and stay.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Callable

from devices.hyperv import hv_abi as hv
from devices.hyperv.connections import Connections
from devices.hyperv.cpuid import hyperv_cpuid_leaves
from devices.hyperv.hypercalls import (HV_HYPERCALL_PORT, HypercallDispatcher, HypercallPort, HypercallRegisters,
                                       current_vcpu_registers, hypercall_page)
from devices.hyperv.interfaces import GuestMemoryAccess
from devices.hyperv.synic import SYNIC_MSRS, RaiseInterrupt, Synic
from vmm.msr import MsrFault

log = logging.getLogger("pyvmm.hyperv")

GuestCrashReport = Callable[[tuple[int, ...]], None]   # CRASH_P0..P4 at the time of the report

_CRASH_PARAMS = range(hv.HV_X64_MSR_CRASH_P0, hv.HV_X64_MSR_CRASH_P4 + 1)
_PAGE_MSR_MASK = hv.HV_PAGE_ADDRESS_MASK | 1   # enable bit and the page address


class HyperV:
    """One partition of `vp_count` VPs. Safe to call from any thread."""

    def __init__(self, *, vp_count: int, memory: GuestMemoryAccess, raise_interrupt: RaiseInterrupt,
                 on_guest_crash: GuestCrashReport, tsc_hz: int = 0, apic_hz: int = 0,
                 hypercall_port: int = HV_HYPERCALL_PORT,
                 registers: Callable[[], HypercallRegisters] = current_vcpu_registers) -> None:
        self.vp_count = vp_count
        self.tsc_hz = tsc_hz
        self.apic_hz = apic_hz
        self.frequency_msrs = tsc_hz > 0 and apic_hz > 0
        self.port = hypercall_port
        self._memory = memory
        self._on_guest_crash = on_guest_crash
        self._lock = threading.Lock()
        self._gp_lock = threading.Lock()
        self.connections = Connections()
        self.synic = Synic(vp_count, memory, raise_interrupt)
        self.hypercalls = HypercallDispatcher(memory, self.connections)
        self.hypercall_device = HypercallPort(self.hypercalls, self.hypercall_enabled, registers)
        self._page = hypercall_page(hypercall_port)
        self._msr_gp: Counter[int] = Counter()
        self._counts: Counter[str] = Counter()
        self._power_on()

    def _power_on(self) -> None:
        self.guest_os_id = 0
        self.hypercall = 0
        self.vp_assist = [0] * self.vp_count
        self.crash_params = [0] * len(_CRASH_PARAMS)
        self.tsc_invariant_control = 0

    # ------------------------------------------------------------------ what the guest sees
    def cpuid_leaves(self) -> list[dict[str, int]]:
        """The Hyper-V CPUID leaves matching what this partition implements."""
        return hyperv_cpuid_leaves(max_vps=self.vp_count, frequency_msrs=self.frequency_msrs)

    def hypercall_enabled(self) -> bool:
        return bool(self.hypercall & hv.HV_X64_MSR_HYPERCALL_ENABLE)

    # ------------------------------------------------------------------ MSRs
    def msr_read(self, vp: int, index: int) -> int:
        """The guest's RDMSR of `index` on VP `vp`; MsrFault means #GP."""
        self._check_vp(vp, index)
        if index in SYNIC_MSRS:
            return self.synic.msr_read(vp, index)
        with self._lock:
            if index == hv.HV_X64_MSR_GUEST_OS_ID:
                return self.guest_os_id
            if index == hv.HV_X64_MSR_HYPERCALL:
                return self.hypercall
            if index == hv.HV_X64_MSR_VP_INDEX:
                return vp
            if index == hv.HV_X64_MSR_VP_ASSIST_PAGE:
                return self.vp_assist[vp]
            if index in _CRASH_PARAMS:
                return self.crash_params[index - hv.HV_X64_MSR_CRASH_P0]
            if index == hv.HV_X64_MSR_CRASH_CTL:
                return hv.HV_CRASH_CTL_CRASH_NOTIFY    # what the partition supports
            if index == hv.HV_X64_MSR_TSC_INVARIANT_CONTROL:
                return self.tsc_invariant_control
            if self.frequency_msrs and index == hv.HV_X64_MSR_TSC_FREQUENCY:
                return self.tsc_hz
            if self.frequency_msrs and index == hv.HV_X64_MSR_APIC_FREQUENCY:
                return self.apic_hz
        raise self._gp(index, "read of an MSR the partition does not implement")

    def msr_write(self, vp: int, index: int, value: int) -> None:
        """The guest's WRMSR of `value` to `index` on VP `vp`; MsrFault means #GP."""
        self._check_vp(vp, index)
        value &= (1 << 64) - 1
        if index in SYNIC_MSRS:
            try:
                self.synic.msr_write(vp, index, value)
            except MsrFault as e:
                raise self._gp(index, str(e)) from None
            return
        crash: tuple[int, ...] | None = None
        with self._lock:
            if index == hv.HV_X64_MSR_GUEST_OS_ID:
                self.guest_os_id = value
                if value == 0:
                    self.hypercall &= ~hv.HV_X64_MSR_HYPERCALL_ENABLE
            elif index == hv.HV_X64_MSR_HYPERCALL:
                self._write_hypercall(value)
            elif index == hv.HV_X64_MSR_VP_ASSIST_PAGE:
                self.vp_assist[vp] = value & _PAGE_MSR_MASK
            elif index in _CRASH_PARAMS:
                self.crash_params[index - hv.HV_X64_MSR_CRASH_P0] = value
            elif index == hv.HV_X64_MSR_CRASH_CTL:
                if value & hv.HV_CRASH_CTL_CRASH_NOTIFY:
                    self._counts["crash-reports"] += 1
                    crash = tuple(self.crash_params)
            elif index == hv.HV_X64_MSR_TSC_INVARIANT_CONTROL:
                self.tsc_invariant_control = value & hv.HV_EXPOSE_INVARIANT_TSC
            elif index in (hv.HV_X64_MSR_VP_INDEX, hv.HV_X64_MSR_TSC_FREQUENCY, hv.HV_X64_MSR_APIC_FREQUENCY):
                raise self._gp(index, "write of a read-only MSR")
            else:
                raise self._gp(index, "write of an MSR the partition does not implement")
        if crash is not None:
            log.error("the guest reported a crash through the Hyper-V crash MSRs: P0-P4 = %s",
                      " ".join(f"{p:#x}" for p in crash))
            self._on_guest_crash(crash)

    def _write_hypercall(self, value: int) -> None:
        if self.guest_os_id == 0:
            # TLFS: the hypercall page cannot be enabled before the guest has identified itself.
            self._counts["hypercall-enable-before-guest-os-id"] += 1
            if self._counts["hypercall-enable-before-guest-os-id"] == 1:
                log.info("the guest wrote the hypercall MSR before GUEST_OS_ID: ignored (logged once)")
            return
        self.hypercall = value & _PAGE_MSR_MASK
        if value & hv.HV_X64_MSR_HYPERCALL_ENABLE:
            gpa = value & hv.HV_PAGE_ADDRESS_MASK
            try:
                self._memory.write(gpa, self._page)
            except Exception as e:
                self._counts["bad-hypercall-pages"] += 1
                if self._counts["bad-hypercall-pages"] == 1:
                    log.warning("the guest's hypercall page at %#x is not guest memory (%s): counted, "
                                "logged once", gpa, e)

    def _check_vp(self, vp: int, index: int) -> None:
        if not 0 <= vp < self.vp_count:
            raise MsrFault(f"MSR {index:#x} accessed by VP {vp}, which the partition lacks")

    def _gp(self, index: int, why: str) -> MsrFault:
        with self._gp_lock:  # not self._lock: this runs with it held and without
            self._msr_gp[index] += 1
            first = self._msr_gp[index] == 1
        if first:
            log.info("Hyper-V MSR %#x: %s: #GP (logged once per MSR)", index, why)
        return MsrFault(f"MSR {index:#x}: {why}")

    def _msr_gp_stats(self) -> dict[str, int]:
        with self._gp_lock:
            return {f"{i:#x}": n for i, n in sorted(self._msr_gp.items())}

    # ------------------------------------------------------------------ lifecycle
    def reset(self) -> None:
        """Machine reset: every MSR and SynIC back to power-on, hypercall page disabled."""
        with self._lock:
            self._power_on()
        self.synic.reset()

    def stats(self) -> dict:
        synic = self.synic.stats()
        with self._lock:
            return {
                "hypercall-page": {"enabled": self.hypercall_enabled(),
                                   "gpa": hex(self.hypercall & hv.HV_PAGE_ADDRESS_MASK),
                                   "port": hex(self.port)},
                "guest-os-id": hex(self.guest_os_id),
                "hypercalls": self.hypercalls.stats(),
                "hypercall-port-ignored": self.hypercall_device.stats(),
                "msr-gp": self._msr_gp_stats(),
                "synic": synic,
                "bad-guest-pages": {"hypercall": self._counts["bad-hypercall-pages"],
                                    "simp": synic["bad-simp-accesses"], "siefp": synic["bad-siefp-accesses"]},
                "crash-reports": self._counts["crash-reports"],
                "connections": self.connections.stats(),
            }
