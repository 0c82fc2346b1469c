"""One thread per vCPU: run KVM_RUN and hand each exit to the bus or the machine.

The loop is the hot path, so it binds everything it touches to locals and counts exits in
a plain list indexed by exit reason. Anything the loop cannot handle itself goes to the
`VcpuHost` (the machine) as a one-call request, so this module knows nothing of devices.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import signal
import struct
import threading
import time
from typing import Protocol

from bus import Bus
from vmm import kvm_abi as abi
from vmm.kvm import KvmError, VcpuFd
from vmm.kvm_abi import ffi, libc

log = logging.getLogger("pyvmm.vcpu")

KICK_SIGNAL = signal.SIGUSR1
MAX_EXIT_REASON = 64
# A memory fault the host settled resolves on the next KVM_RUN; the same address faulting
# this many times with no other address between means it never will, and KVM_RUN's EFAULT
# becomes fatal instead of a busy loop.
MAX_FAULT_RETRIES = 1000


class FaultAction(enum.Enum):
    """What the machine made of a memory fault (`VcpuHost.vcpu_memory_fault`)."""
    UNHANDLED = "unhandled"  # no device owns the address: KVM_RUN's EFAULT is fatal
    RETRY = "retry"          # the owner made the memory accessible: run the vCPU again
    STOP = "stop"            # reported, and the VM is stopping: park this vCPU

_thread_vcpu = threading.local()


def current_vcpu() -> "Vcpu | None":
    """The vCPU whose thread is calling (set once when its loop starts), else None. Exit
    handlers use it to reach the exiting vCPU's registers (the hypercall port)."""
    return getattr(_thread_vcpu, "vcpu", None)


def set_current_vcpu(vcpu: "Vcpu | None") -> None:
    """Bind `vcpu` to the calling thread (the vCPU loop does this; tests may too)."""
    _thread_vcpu.vcpu = vcpu


class VcpuHost(Protocol):
    """What a vCPU needs from the machine."""

    def vcpu_emulation_failure(self, vcpu: "Vcpu") -> bool: ...  # True: handled, keep running
    def vcpu_msr_exit(self, vcpu: "Vcpu", is_write: bool) -> None: ...
    def vcpu_fatal(self, vcpu: "Vcpu", reason: str) -> None: ...
    def vcpu_memory_fault(self, vcpu: "Vcpu", gpa: int, size: int) -> FaultAction: ...
    def vcpu_request(self, vcpu: "Vcpu", what: str) -> None: ...  # "reset", "poweroff", "crash"


class Vcpu:
    def __init__(self, fd: VcpuFd, host: VcpuHost, pio: Bus, mmio: Bus, trace_exits: bool = False) -> None:
        self.fd = fd
        self.index = fd.index
        self.host = host
        self.pio = pio
        self.mmio = mmio
        self.trace_exits = trace_exits  # log every exit at debug level
        self.exit_counts = [0] * MAX_EXIT_REASON
        self.native_id: int | None = None
        self._thread: threading.Thread | None = None
        self._stop = False
        self._paused = threading.Event()   # set while the loop is parked
        self._pause_requested = False
        self._resume = threading.Condition()
        self._fault_gpa = -1      # the last memory fault settled with a retry, and how often in a row
        self._fault_retries = 0

    # --- control (from other threads) ---
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"vcpu{self.index}", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        """Make KVM_RUN return promptly: immediate_exit covers the window before the ioctl."""
        self.fd.run_ptr.immediate_exit = 1
        t = self._thread
        if t is not None and t.ident is not None and t.is_alive():
            try:
                signal.pthread_kill(t.ident, KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    def pause(self, timeout: float = 5.0) -> bool:
        with self._resume:
            self._pause_requested = True
        self.kick()
        if threading.current_thread() is self._thread:
            return True
        return self._paused.wait(timeout)

    def resume(self) -> None:
        with self._resume:
            self._pause_requested = False
            self._resume.notify_all()

    def stop(self) -> None:
        self._stop = True
        self.resume()
        self.kick()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def is_paused(self) -> bool:
        return self._paused.is_set()

    # --- the loop ---
    def _park(self) -> None:
        with self._resume:
            while self._pause_requested and not self._stop:
                self._paused.set()
                self._resume.wait()
            self._paused.clear()

    def _loop(self) -> None:
        set_current_vcpu(self)
        try:
            self._run_loop()
        except Exception as e:  # never leave a dead vCPU silently
            log.exception("vCPU %d loop failed", self.index)
            self.host.vcpu_fatal(self, f"vCPU {self.index} loop failed: {e}")
        finally:
            self._paused.set()

    def _run_loop(self) -> None:
        fd = self.fd
        run = fd.run_ptr
        # Exit headers are read straight from the kvm_run mapping with one unpack per exit:
        # cheaper than several cffi attribute reads (see docs/benchmarks.md). Slicing the
        # mmap object itself yields bytes in one step.
        raw = fd.run_mapping
        mm = memoryview(raw)
        exit_reason_at = ffi.offsetof("struct kvm_run", "exit_reason")
        union_at = ffi.offsetof("struct kvm_run", "io")
        mmio_data_at = union_at + ffi.offsetof("struct kvm_run_mmio", "data")
        # exit_reason, then the io member of the exit union: direction size port count data_offset
        unpack_exit = struct.Struct(f"<I{union_at - exit_reason_at - 4}xBBHIQ").unpack_from
        unpack_mmio = struct.Struct("<Q8sIB").unpack_from     # phys_addr data len is_write
        counts = self.exit_counts
        pio_read, pio_write = self.pio.read, self.pio.write
        mmio_read, mmio_write = self.mmio.read, self.mmio.write
        ioctl, vcpu_fd, KVM_RUN, NULL = libc.ioctl, fd.fd, abi.KVM_RUN, ffi.NULL
        EXIT_IO, EXIT_MMIO, IO_OUT = abi.KVM_EXIT_IO, abi.KVM_EXIT_MMIO, abi.KVM_EXIT_IO_OUT
        KICKED = (errno.EINTR, errno.EAGAIN)
        trace = self.trace_exits
        self.native_id = threading.get_native_id()
        # Stop and pause requests always come with a kick (immediate_exit, then a signal), so
        # the flags need checking only after a kick or a slow exit, not on every I/O exit.
        check = True
        while True:
            if check:
                if self._stop:
                    return
                if self._pause_requested:
                    self._park()
                    continue
                check = False
            if ioctl(vcpu_fd, KVM_RUN, NULL) < 0:
                err = ffi.errno
                check = True
                if err in KICKED:
                    run.immediate_exit = 0
                    continue
                if err == errno.EFAULT and self._memory_fault():
                    continue
                raise KvmError(err, f"KVM_RUN: {os.strerror(err)}")
            reason, direction, size, port, count, off = unpack_exit(raw, exit_reason_at)
            counts[reason if reason < MAX_EXIT_REASON else 0] += 1
            if reason == EXIT_IO:
                if trace:
                    log.debug("vcpu%d io %s port=%#x size=%d count=%d", self.index,
                              "out" if direction == IO_OUT else "in", port, size, count)
                if direction == IO_OUT:
                    if count == 1:
                        pio_write(port, raw[off:off + size])
                    else:
                        for i in range(off, off + size * count, size):
                            pio_write(port, raw[i:i + size])
                else:
                    for i in range(off, off + size * count, size):
                        mm[i:i + size] = pio_read(port, size)
            elif reason == EXIT_MMIO:
                addr, data, length, is_write = unpack_mmio(raw, union_at)
                if trace:
                    log.debug("vcpu%d mmio %s addr=%#x len=%d", self.index,
                              "write" if is_write else "read", addr, length)
                if is_write:
                    mmio_write(addr, data[:length])
                else:
                    mm[mmio_data_at:mmio_data_at + length] = mmio_read(addr, length)
            else:
                self._slow_exit(reason)
                check = True

    def _memory_fault(self) -> bool:
        """KVM_RUN failed with EFAULT: with KVM_CAP_MEMORY_FAULT_INFO the exit says where."""
        run = self.fd.run_ptr
        if run.exit_reason != abi.KVM_EXIT_MEMORY_FAULT:
            return False
        self.exit_counts[abi.KVM_EXIT_MEMORY_FAULT] += 1
        gpa = run.memory_fault.gpa
        action = self.host.vcpu_memory_fault(self, gpa, run.memory_fault.size)
        if action is FaultAction.RETRY:
            retries = self._fault_retries + 1 if gpa == self._fault_gpa else 1
            self._fault_gpa, self._fault_retries = gpa, retries
            return retries <= MAX_FAULT_RETRIES
        if action is FaultAction.STOP:
            self._pause_requested = True  # park until the machine resumes us
            return True
        return False

    def run_time_ns(self) -> int:
        """Time this vCPU thread spent on a host CPU (mostly inside KVM_RUN), from schedstat."""
        tid = getattr(self, "native_id", None)
        if tid is None:
            return 0
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return 0

    def _slow_exit(self, reason: int) -> None:
        run = self.fd.run_ptr
        if reason == abi.KVM_EXIT_INTERNAL_ERROR:
            if run.internal.suberror == abi.KVM_INTERNAL_ERROR_EMULATION and self.host.vcpu_emulation_failure(self):
                return
            if run.internal.suberror != abi.KVM_INTERNAL_ERROR_EMULATION:
                data = [hex(run.internal.data[i]) for i in range(min(run.internal.ndata, 16))]
                self.host.vcpu_fatal(self, f"KVM internal error, suberror {run.internal.suberror}, data {data}")
            self._stop = True
        elif reason in (abi.KVM_EXIT_X86_RDMSR, abi.KVM_EXIT_X86_WRMSR):
            self.host.vcpu_msr_exit(self, reason == abi.KVM_EXIT_X86_WRMSR)
        elif reason == abi.KVM_EXIT_SHUTDOWN:
            # A triple fault: real hardware resets the machine.
            self.host.vcpu_request(self, "reset")
        elif reason == abi.KVM_EXIT_SYSTEM_EVENT:
            kind = run.system_event.type
            what = {abi.KVM_SYSTEM_EVENT_SHUTDOWN: "poweroff", abi.KVM_SYSTEM_EVENT_RESET: "reset",
                    abi.KVM_SYSTEM_EVENT_CRASH: "crash"}.get(kind)
            if what:
                self.host.vcpu_request(self, what)
            else:
                log.warning("vCPU %d: unknown system event %d", self.index, kind)
        elif reason == abi.KVM_EXIT_HLT:
            time.sleep(0.001)  # only without an in-kernel irqchip
        elif reason in (abi.KVM_EXIT_INTR, abi.KVM_EXIT_IRQ_WINDOW_OPEN):
            pass
        elif reason == abi.KVM_EXIT_FAIL_ENTRY:
            self.host.vcpu_fatal(self, f"VM entry failed, hardware reason {run.fail_entry.hardware_entry_failure_reason:#x}")
            self._stop = True
        elif reason == abi.KVM_EXIT_MEMORY_FAULT:
            mf = run.memory_fault
            self.host.vcpu_fatal(self, f"guest memory fault at {mf.gpa:#x}+{mf.size:#x} (flags {mf.flags:#x})")
            self._stop = True
        else:
            name = abi.EXIT_REASON_NAMES.get(reason, str(reason))
            self.host.vcpu_fatal(self, f"unhandled KVM exit {name}")
            self._stop = True

    def exit_stats(self) -> dict[str, int]:
        return {abi.EXIT_REASON_NAMES.get(r, str(r)): n for r, n in enumerate(self.exit_counts) if n}
