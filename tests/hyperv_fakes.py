"""Test doubles for the Hyper-V layer: guest memory in a bytearray, a recording interrupt line,
and a fake vCPU whose registers a hypercall reads."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from vmm.memory import GuestMemoryError


class FakeGuestMemory:
    """`size` bytes of guest RAM at GPA 0; anything else raises GuestMemoryError, as
    vmm.memory.GuestMemory does."""

    def __init__(self, size: int = 1 << 20) -> None:
        self.ram = bytearray(size)
        self.reads = 0
        self.writes = 0

    def _check(self, gpa: int, size: int) -> None:
        if gpa < 0 or size < 0 or gpa + size > len(self.ram):
            raise GuestMemoryError(f"{gpa:#x}+{size:#x} is not guest memory")

    def read(self, gpa: int, size: int) -> bytes:
        self._check(gpa, size)
        self.reads += 1
        return bytes(self.ram[gpa:gpa + size])

    def write(self, gpa: int, data: bytes) -> None:
        self._check(gpa, len(data))
        self.writes += 1
        self.ram[gpa:gpa + len(data)] = data


class RecordingInterrupts:
    """raise_interrupt(vp, vector) that remembers every call."""

    def __init__(self, fail: bool = False) -> None:
        self.raised: list[tuple[int, int]] = []
        self.fail = fail
        self._lock = threading.Lock()

    def __call__(self, vp: int, vector: int) -> None:
        if self.fail:
            raise OSError("KVM_SIGNAL_MSI failed")
        with self._lock:
            self.raised.append((vp, vector))


class FakeVcpu:
    """Enough of vmm.vcpu.Vcpu for the hypercall port: an index and fd.get_regs()."""

    def __init__(self, index: int, rcx: int = 0, rdx: int = 0, r8: int = 0) -> None:
        self.index = index
        self.regs = SimpleNamespace(rcx=rcx, rdx=rdx, r8=r8)
        self.fd = SimpleNamespace(get_regs=lambda: self.regs)
