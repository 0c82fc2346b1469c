"""How a vCPU treats KVM_RUN's EFAULT with a memory-fault exit: what the machine answers
(`FaultAction`) decides between running again, parking and failing, and a fault that keeps
coming back after "retry" becomes fatal instead of spinning forever."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

from vmm import kvm_abi as abi
from vmm.vcpu import MAX_FAULT_RETRIES, FaultAction, Vcpu


def make_vcpu(answer: FaultAction, exit_reason: int = abi.KVM_EXIT_MEMORY_FAULT) -> tuple[Vcpu, list]:
    """A Vcpu with just what `_memory_fault` reads: the run struct and the host."""
    calls: list[tuple[int, int]] = []
    run = SimpleNamespace(exit_reason=exit_reason, memory_fault=SimpleNamespace(gpa=0x1_0000_0000, size=4096))
    host = SimpleNamespace(vcpu_memory_fault=lambda vcpu, gpa, size: calls.append((gpa, size)) or answer)
    vcpu = Vcpu.__new__(Vcpu)
    vcpu.fd, vcpu.host, vcpu.exit_counts = SimpleNamespace(run_ptr=run), host, Counter()
    vcpu._pause_requested, vcpu._fault_gpa, vcpu._fault_retries = False, -1, 0
    return vcpu, calls


def test_retry_runs_again_without_parking() -> None:
    vcpu, calls = make_vcpu(FaultAction.RETRY)
    assert vcpu._memory_fault() and not vcpu._pause_requested
    assert calls == [(0x1_0000_0000, 4096)] and vcpu.exit_counts[abi.KVM_EXIT_MEMORY_FAULT] == 1


def test_stop_parks_the_vcpu() -> None:
    vcpu, _ = make_vcpu(FaultAction.STOP)
    assert vcpu._memory_fault() and vcpu._pause_requested


def test_unhandled_or_another_exit_is_fatal() -> None:
    assert not make_vcpu(FaultAction.UNHANDLED)[0]._memory_fault()
    vcpu, calls = make_vcpu(FaultAction.RETRY, exit_reason=abi.KVM_EXIT_MMIO)
    assert not vcpu._memory_fault() and calls == []


def test_a_fault_that_never_settles_becomes_fatal() -> None:
    vcpu, _ = make_vcpu(FaultAction.RETRY)
    assert all(vcpu._memory_fault() for _ in range(MAX_FAULT_RETRIES))
    assert not vcpu._memory_fault()
    vcpu.fd.run_ptr.memory_fault.gpa += 4096  # another address starts counting afresh
    assert vcpu._memory_fault()
