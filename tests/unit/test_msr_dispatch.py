"""User-space MSR exits: the dispatch table, the #GP path, the KVM filter range, the machine hook."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from vmm import kvm_abi as abi
from vmm.machine import Machine, MachineConfig
from vmm.msr import MsrDispatch, MsrFault, deny_filter_range
from vmm.vcpu import current_vcpu, set_current_vcpu


class RangeHandler:
    def __init__(self) -> None:
        self.values: dict[tuple[int, int], int] = {}

    def msr_read(self, vp: int, index: int) -> int:
        if index == 0x40000005:
            raise MsrFault("unknown")
        return self.values.get((vp, index), 0)

    def msr_write(self, vp: int, index: int, value: int) -> None:
        if index == 0x40000006:
            raise RuntimeError("handler bug")
        self.values[(vp, index)] = value


def test_range_and_single_handlers() -> None:
    d = MsrDispatch()
    h = RangeHandler()
    d.add_range(0x40000000, 0x400001FF, h)
    d.single[0x123] = (lambda vp: 7 + vp, lambda vp, value: None)
    d.write(1, 0x40000010, 99)
    assert d.read(1, 0x40000010) == 99
    assert d.read(0, 0x40000010) == 0
    assert d.read(2, 0x123) == 9


def test_faults_unclaimed_and_handler_errors_are_gp() -> None:
    d = MsrDispatch()
    d.add_range(0x40000000, 0x400001FF, RangeHandler())
    with pytest.raises(MsrFault):
        d.read(0, 0x40000005)
    with pytest.raises(MsrFault):
        d.write(0, 0x40000006, 1)
    for _ in range(3):
        with pytest.raises(MsrFault):
            d.read(0, 0x40000200)
    assert d.stats() == {"unclaimed": {"0x40000200": 3}, "handler-errors": 1}


def test_read_values_are_64_bit() -> None:
    d = MsrDispatch()
    d.single[1] = (lambda vp: -1, lambda vp, v: None)
    assert d.read(0, 1) == (1 << 64) - 1


def test_ranges_must_not_overlap() -> None:
    d = MsrDispatch()
    d.add_range(0x10, 0x1F, RangeHandler())
    with pytest.raises(ValueError):
        d.add_range(0x1F, 0x30, RangeHandler())
    with pytest.raises(ValueError):
        d.add_range(0x40, 0x3F, RangeHandler())
    d.add_range(0x20, 0x30, RangeHandler())


def test_deny_filter_range_covers_the_hyperv_msrs_with_a_clear_bitmap() -> None:
    flags = abi.KVM_MSR_FILTER_READ | abi.KVM_MSR_FILTER_WRITE
    assert deny_filter_range(0x40000000, 0x400001FF, flags) == (flags, 0x40000000, 0x200, bytes(64))
    assert deny_filter_range(5, 5, flags) == (flags, 5, 1, b"\0")
    with pytest.raises(ValueError):
        deny_filter_range(6, 5, flags)


def _exit(index: int, data: int = 0):
    msr = SimpleNamespace(index=index, data=data, error=None)
    return SimpleNamespace(index=1, fd=SimpleNamespace(run_ptr=SimpleNamespace(msr=msr))), msr


def test_machine_msr_exit_sets_error_for_gp_and_data_for_reads() -> None:
    d = MsrDispatch()
    h = RangeHandler()
    d.add_range(0x40000000, 0x400001FF, h)
    machine = SimpleNamespace(msrs=d)
    vcpu, msr = _exit(0x40000010, 0x55)
    Machine.vcpu_msr_exit(machine, vcpu, True)
    assert msr.error == 0 and h.values[(1, 0x40000010)] == 0x55
    vcpu, msr = _exit(0x40000010)
    Machine.vcpu_msr_exit(machine, vcpu, False)
    assert (msr.error, msr.data) == (0, 0x55)
    for index, write in ((0x40000005, False), (0x40000006, True), (0xC0000999, False)):
        vcpu, msr = _exit(index)
        Machine.vcpu_msr_exit(machine, vcpu, write)
        assert msr.error == 1


def test_default_cmdline_asks_for_kvm_clock_only_without_hyperv() -> None:
    def cmdline(hyperv: bool) -> list[str]:
        fake = SimpleNamespace(config=MachineConfig(kernel=Path("vmlinux"), hyperv=hyperv), _hidden_features=[])
        return Machine._build_cmdline(fake).split()

    assert "clocksource=kvm-clock" in cmdline(False)
    assert "clocksource=kvm-clock" not in cmdline(True)
    assert "tsc=reliable" in cmdline(True) and "tsc=reliable" in cmdline(False)


def test_current_vcpu_is_per_thread() -> None:
    seen = []
    marker = object()

    def other() -> None:
        seen.append(current_vcpu())

    set_current_vcpu(marker)  # type: ignore[arg-type]
    try:
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert current_vcpu() is marker and seen == [None]
    finally:
        set_current_vcpu(None)
