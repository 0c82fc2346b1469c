"""Thin, typed wrappers over the /dev/kvm, VM and vCPU file descriptors.

Every ioctl goes through `_ioctl`, which turns -1/errno into `KvmError` naming the ioctl.
The vCPU's `run()` is the hot path: it calls libc `ioctl` through cffi ABI mode with a
pre-cast argument and no per-call allocation (see docs/benchmarks.md for the measurement).
"""

from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass

from vmm import kvm_abi as abi
from vmm.kvm_abi import ffi, libc

_NULL = ffi.NULL


class KvmError(OSError):
    """An ioctl on a KVM file descriptor failed."""


class KvmUnavailable(Exception):
    """/dev/kvm is missing, unreadable, or lacks a capability pyvmm needs (one-line message)."""


def _ioctl(fd: int, request: int, arg=_NULL, what: str = "") -> int:
    ret = libc.ioctl(fd, request, arg)
    if ret < 0:
        err = ffi.errno
        raise KvmError(err, f"{what or hex(request)}: {os.strerror(err)}")
    return ret


def _int_arg(value: int):
    return ffi.cast("void *", value)


# Capabilities pyvmm cannot run without, with the reason shown to the user.
REQUIRED_CAPS = {
    abi.KVM_CAP_IRQCHIP: "in-kernel interrupt controller",
    abi.KVM_CAP_USER_MEMORY: "user memory regions",
    abi.KVM_CAP_IRQFD: "irqfd interrupt delivery",
    abi.KVM_CAP_IOEVENTFD: "ioeventfd queue notification",
    abi.KVM_CAP_IMMEDIATE_EXIT: "immediate exit (stopping vCPUs)",
}

# Capabilities reported by `pyvmm run --trace-exits`/stats; absent ones only disable features.
REPORTED_CAPS = {
    "IRQCHIP": abi.KVM_CAP_IRQCHIP,
    "SPLIT_IRQCHIP": abi.KVM_CAP_SPLIT_IRQCHIP,
    "IRQFD": abi.KVM_CAP_IRQFD,
    "IOEVENTFD": abi.KVM_CAP_IOEVENTFD,
    "SIGNAL_MSI": abi.KVM_CAP_SIGNAL_MSI,
    "IRQ_ROUTING": abi.KVM_CAP_IRQ_ROUTING,
    "PIT2": abi.KVM_CAP_PIT2,
    "READONLY_MEM": abi.KVM_CAP_READONLY_MEM,
    "NR_MEMSLOTS": abi.KVM_CAP_NR_MEMSLOTS,
    "MAX_VCPUS": abi.KVM_CAP_MAX_VCPUS,
    "X86_USER_SPACE_MSR": abi.KVM_CAP_X86_USER_SPACE_MSR,
    "X86_MSR_FILTER": abi.KVM_CAP_X86_MSR_FILTER,
    "MEMORY_FAULT_INFO": abi.KVM_CAP_MEMORY_FAULT_INFO,
    "IMMEDIATE_EXIT": abi.KVM_CAP_IMMEDIATE_EXIT,
    "GET_TSC_KHZ": abi.KVM_CAP_GET_TSC_KHZ,
    "TSC_CONTROL": abi.KVM_CAP_TSC_CONTROL,
    "TSC_DEADLINE_TIMER": abi.KVM_CAP_TSC_DEADLINE_TIMER,
    "HYPERV": abi.KVM_CAP_HYPERV,
    "HYPERV_SYNIC": abi.KVM_CAP_HYPERV_SYNIC,
}


class Kvm:
    """The /dev/kvm system file descriptor."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(
                f"{path} does not exist: load the kvm module (modprobe kvm_intel or kvm_amd) "
                "or run on a host with virtualization enabled"
            ) from None
        except PermissionError:
            raise KvmUnavailable(
                f"{path} is not accessible: add yourself to the 'kvm' group "
                f"(sudo usermod -aG kvm $USER, then log in again) or run as root"
            ) from None
        version = _ioctl(self.fd, abi.KVM_GET_API_VERSION, what="KVM_GET_API_VERSION")
        if version != abi.KVM_API_VERSION:
            raise KvmUnavailable(f"KVM API version {version}, expected {abi.KVM_API_VERSION}")
        for cap, why in REQUIRED_CAPS.items():
            if not self.check_extension(cap):
                raise KvmUnavailable(f"the host KVM lacks a required capability: {why}")
        self.vcpu_mmap_size = _ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE, what="KVM_GET_VCPU_MMAP_SIZE")

    def check_extension(self, cap: int) -> int:
        ret = libc.ioctl(self.fd, abi.KVM_CHECK_EXTENSION, _int_arg(cap))
        return max(ret, 0)

    def capabilities(self) -> dict[str, int]:
        return {name: self.check_extension(cap) for name, cap in REPORTED_CAPS.items()}

    def supported_cpuid(self) -> list[dict[str, int]]:
        nent = 256
        while True:
            raw = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2") + nent * ffi.sizeof("struct kvm_cpuid_entry2"))
            hdr = ffi.cast("struct kvm_cpuid2 *", raw)
            hdr.nent = nent
            try:
                _ioctl(self.fd, abi.KVM_GET_SUPPORTED_CPUID, hdr, "KVM_GET_SUPPORTED_CPUID")
            except KvmError as e:
                if e.errno == errno.E2BIG and nent < 4096:
                    nent *= 2
                    continue
                raise
            return [cpuid_entry_to_dict(hdr.entries[i]) for i in range(hdr.nent)]

    def msr_index_list(self) -> list[int]:
        n = 1024
        raw = ffi.new("char[]", 4 + 4 * n)
        lst = ffi.cast("struct kvm_msr_list *", raw)
        lst.nmsrs = n
        _ioctl(self.fd, abi.KVM_GET_MSR_INDEX_LIST, lst, "KVM_GET_MSR_INDEX_LIST")
        return [lst.indices[i] for i in range(lst.nmsrs)]

    def create_vm(self) -> "VmFd":
        fd = _ioctl(self.fd, abi.KVM_CREATE_VM, _int_arg(0), "KVM_CREATE_VM")
        return VmFd(self, fd)

    def close(self) -> None:
        os.close(self.fd)


CPUID_FIELDS = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")


def cpuid_entry_to_dict(entry) -> dict[str, int]:
    return {f: getattr(entry, f) for f in CPUID_FIELDS}


class VmFd:
    """A KVM virtual machine file descriptor."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self._region = ffi.new("struct kvm_userspace_memory_region *")
        self._irq_level = ffi.new("struct kvm_irq_level *")
        self._msi = ffi.new("struct kvm_msi *")

    def check_extension(self, cap: int) -> int:
        ret = libc.ioctl(self.fd, abi.KVM_CHECK_EXTENSION, _int_arg(cap))
        return max(ret, 0)

    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0) -> None:
        r = self._region
        r.slot, r.flags, r.guest_phys_addr, r.memory_size, r.userspace_addr = slot, flags, gpa, size, host_addr
        _ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, r, "KVM_SET_USER_MEMORY_REGION")

    def set_tss_addr(self, addr: int) -> None:
        _ioctl(self.fd, abi.KVM_SET_TSS_ADDR, _int_arg(addr), "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int) -> None:
        v = ffi.new("uint64_t *", addr)
        _ioctl(self.fd, abi.KVM_SET_IDENTITY_MAP_ADDR, v, "KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self) -> None:
        _ioctl(self.fd, abi.KVM_CREATE_IRQCHIP, what="KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        cfg = ffi.new("struct kvm_pit_config *", {"flags": abi.KVM_PIT_SPEAKER_DUMMY})
        _ioctl(self.fd, abi.KVM_CREATE_PIT2, cfg, "KVM_CREATE_PIT2")

    def get_irqchip(self, chip_id: int) -> bytes:
        chip = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        _ioctl(self.fd, abi.KVM_GET_IRQCHIP, chip, "KVM_GET_IRQCHIP")
        return bytes(ffi.buffer(chip))

    def set_irqchip(self, state: bytes) -> None:
        chip = ffi.new("struct kvm_irqchip *")
        ffi.buffer(chip)[:] = state
        _ioctl(self.fd, abi.KVM_SET_IRQCHIP, chip, "KVM_SET_IRQCHIP")

    def irq_line(self, gsi: int, level: bool) -> None:
        lv = self._irq_level
        lv.irq, lv.level = gsi, 1 if level else 0
        _ioctl(self.fd, abi.KVM_IRQ_LINE, lv, "KVM_IRQ_LINE")

    def irqfd(self, eventfd: int, gsi: int, deassign: bool = False, resample_fd: int | None = None) -> None:
        flags = abi.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        if resample_fd is not None:
            flags |= abi.KVM_IRQFD_FLAG_RESAMPLE
        req = ffi.new("struct kvm_irqfd *", {"fd": eventfd, "gsi": gsi, "flags": flags,
                                              "resamplefd": resample_fd or 0})
        _ioctl(self.fd, abi.KVM_IRQFD, req, "KVM_IRQFD")

    def ioeventfd(self, eventfd: int, addr: int, length: int, datamatch: int | None = None,
                  pio: bool = False, deassign: bool = False) -> None:
        flags = 0
        if datamatch is not None:
            flags |= abi.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= abi.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= abi.KVM_IOEVENTFD_FLAG_DEASSIGN
        req = ffi.new("struct kvm_ioeventfd *", {"datamatch": datamatch or 0, "addr": addr, "len": length,
                                                  "fd": eventfd, "flags": flags})
        _ioctl(self.fd, abi.KVM_IOEVENTFD, req, "KVM_IOEVENTFD")

    def signal_msi(self, address: int, data: int) -> int:
        m = self._msi
        m.address_lo, m.address_hi, m.data, m.flags, m.devid = address & 0xFFFFFFFF, address >> 32, data, 0, 0
        return _ioctl(self.fd, abi.KVM_SIGNAL_MSI, m, "KVM_SIGNAL_MSI")

    def enable_cap(self, cap: int, *args: int) -> None:
        req = ffi.new("struct kvm_enable_cap *", {"cap": cap})
        for i, a in enumerate(args):
            req.args[i] = a
        _ioctl(self.fd, abi.KVM_ENABLE_CAP, req, "KVM_ENABLE_CAP")

    def set_msr_filter(self, ranges: list[tuple[int, int, int, bytes]], default_deny: bool = False) -> None:
        """ranges: (flags, base, nmsrs, bitmap); a set bit in the bitmap *allows* in-kernel handling."""
        flt = ffi.new("struct kvm_msr_filter *")
        flt.flags = abi.KVM_MSR_FILTER_DEFAULT_DENY if default_deny else abi.KVM_MSR_FILTER_DEFAULT_ALLOW
        keep = []
        for i, (flags, base, nmsrs, bitmap) in enumerate(ranges):
            bm = ffi.new("uint8_t[]", bitmap)
            keep.append(bm)
            flt.ranges[i].flags, flt.ranges[i].base, flt.ranges[i].nmsrs = flags, base, nmsrs
            flt.ranges[i].bitmap = bm
        _ioctl(self.fd, abi.KVM_X86_SET_MSR_FILTER, flt, "KVM_X86_SET_MSR_FILTER")

    def get_clock(self) -> int:
        """The kvmclock value (ns) the guest sees now."""
        data = ffi.new("struct kvm_clock_data *")
        _ioctl(self.fd, abi.KVM_GET_CLOCK, data, "KVM_GET_CLOCK")
        return data.clock

    def set_clock(self, clock: int) -> None:
        data = ffi.new("struct kvm_clock_data *", {"clock": clock})
        _ioctl(self.fd, abi.KVM_SET_CLOCK, data, "KVM_SET_CLOCK")

    def create_vcpu(self, index: int) -> "VcpuFd":
        fd = _ioctl(self.fd, abi.KVM_CREATE_VCPU, _int_arg(index), "KVM_CREATE_VCPU")
        return VcpuFd(self, fd, index)

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class MsrValue:
    index: int
    data: int


class VcpuFd:
    """A vCPU file descriptor plus its mmap'ed `struct kvm_run`."""

    def __init__(self, vm: VmFd, fd: int, index: int) -> None:
        self.vm = vm
        self.fd = fd
        self.index = index
        self._mm = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._mm_ptr = ffi.from_buffer(self._mm)
        self.run_mapping = self._mm
        self.run_ptr = ffi.cast("struct kvm_run *", self._mm_ptr)
        # The PIO data area lives inside the same mapping at run.io.data_offset.
        self.run_base = self._mm_ptr
        self._regs = ffi.new("struct kvm_regs *")
        self._sregs = ffi.new("struct kvm_sregs *")

    # --- the hot path ---
    def run(self) -> int:
        """One KVM_RUN; returns 0, or -errno for EINTR/EAGAIN (a signal kicked the vCPU)."""
        ret = libc.ioctl(self.fd, abi.KVM_RUN, _NULL)
        if ret < 0:
            err = ffi.errno
            if err in (errno.EINTR, errno.EAGAIN):
                return -err
            raise KvmError(err, f"KVM_RUN: {os.strerror(err)}")
        return ret

    # --- state access ---
    def get_regs(self):
        _ioctl(self.fd, abi.KVM_GET_REGS, self._regs, "KVM_GET_REGS")
        return self._regs

    def set_regs(self, regs=None) -> None:
        _ioctl(self.fd, abi.KVM_SET_REGS, regs if regs is not None else self._regs, "KVM_SET_REGS")

    def get_sregs(self):
        _ioctl(self.fd, abi.KVM_GET_SREGS, self._sregs, "KVM_GET_SREGS")
        return self._sregs

    def set_sregs(self, sregs=None) -> None:
        _ioctl(self.fd, abi.KVM_SET_SREGS, sregs if sregs is not None else self._sregs, "KVM_SET_SREGS")

    def get_fpu(self):
        fpu = ffi.new("struct kvm_fpu *")
        _ioctl(self.fd, abi.KVM_GET_FPU, fpu, "KVM_GET_FPU")
        return fpu

    def set_fpu(self, fpu) -> None:
        _ioctl(self.fd, abi.KVM_SET_FPU, fpu, "KVM_SET_FPU")

    def get_xsave(self) -> bytearray:
        """The legacy 4 KiB XSAVE image (MXCSR lives here: KVM_GET_FPU leaves it zero on some hosts)."""
        buf = ffi.new("struct kvm_xsave *")
        _ioctl(self.fd, abi.KVM_GET_XSAVE, buf, "KVM_GET_XSAVE")
        return bytearray(ffi.buffer(buf))

    def set_xsave(self, image: bytes) -> None:
        buf = ffi.new("struct kvm_xsave *")
        ffi.buffer(buf)[:] = image
        _ioctl(self.fd, abi.KVM_SET_XSAVE, buf, "KVM_SET_XSAVE")

    def get_lapic(self) -> bytes:
        st = ffi.new("struct kvm_lapic_state *")
        _ioctl(self.fd, abi.KVM_GET_LAPIC, st, "KVM_GET_LAPIC")
        return bytes(ffi.buffer(st))

    def set_lapic(self, state: bytes) -> None:
        st = ffi.new("struct kvm_lapic_state *")
        ffi.buffer(st)[:] = state
        _ioctl(self.fd, abi.KVM_SET_LAPIC, st, "KVM_SET_LAPIC")

    def get_vcpu_events(self):
        ev = ffi.new("struct kvm_vcpu_events *")
        _ioctl(self.fd, abi.KVM_GET_VCPU_EVENTS, ev, "KVM_GET_VCPU_EVENTS")
        return ev

    def set_vcpu_events(self, ev) -> None:
        _ioctl(self.fd, abi.KVM_SET_VCPU_EVENTS, ev, "KVM_SET_VCPU_EVENTS")

    def get_mp_state(self) -> int:
        st = ffi.new("struct kvm_mp_state *")
        _ioctl(self.fd, abi.KVM_GET_MP_STATE, st, "KVM_GET_MP_STATE")
        return st.mp_state

    def set_mp_state(self, state: int) -> None:
        st = ffi.new("struct kvm_mp_state *", {"mp_state": state})
        _ioctl(self.fd, abi.KVM_SET_MP_STATE, st, "KVM_SET_MP_STATE")

    def set_cpuid(self, entries: list[dict[str, int]]) -> None:
        n = len(entries)
        raw = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2") + n * ffi.sizeof("struct kvm_cpuid_entry2"))
        hdr = ffi.cast("struct kvm_cpuid2 *", raw)
        hdr.nent = n
        for i, e in enumerate(entries):
            for f in CPUID_FIELDS:
                setattr(hdr.entries[i], f, e[f])
        _ioctl(self.fd, abi.KVM_SET_CPUID2, hdr, "KVM_SET_CPUID2")

    def get_msrs(self, indices: list[int]) -> list[MsrValue]:
        n = len(indices)
        raw = ffi.new("char[]", 8 + 16 * n)
        msrs = ffi.cast("struct kvm_msrs *", raw)
        msrs.nmsrs = n
        for i, idx in enumerate(indices):
            msrs.entries[i].index = idx
        got = _ioctl(self.fd, abi.KVM_GET_MSRS, msrs, "KVM_GET_MSRS")
        return [MsrValue(msrs.entries[i].index, msrs.entries[i].data) for i in range(got)]

    def set_msrs(self, values: list[MsrValue] | list[tuple[int, int]]) -> int:
        n = len(values)
        raw = ffi.new("char[]", 8 + 16 * n)
        msrs = ffi.cast("struct kvm_msrs *", raw)
        msrs.nmsrs = n
        for i, v in enumerate(values):
            idx, data = (v.index, v.data) if isinstance(v, MsrValue) else v
            msrs.entries[i].index, msrs.entries[i].data = idx, data
        return _ioctl(self.fd, abi.KVM_SET_MSRS, msrs, "KVM_SET_MSRS")

    def get_tsc_offset(self) -> int:
        value = ffi.new("uint64_t *")
        attr = ffi.new("struct kvm_device_attr *", {"group": abi.KVM_VCPU_TSC_CTRL, "attr": abi.KVM_VCPU_TSC_OFFSET,
                                                     "addr": int(ffi.cast("uintptr_t", value))})
        _ioctl(self.fd, abi.KVM_GET_DEVICE_ATTR, attr, "KVM_GET_DEVICE_ATTR(TSC_OFFSET)")
        return value[0]

    def set_tsc_offset(self, offset: int) -> None:
        value = ffi.new("uint64_t *", offset & 0xFFFFFFFFFFFFFFFF)
        attr = ffi.new("struct kvm_device_attr *", {"group": abi.KVM_VCPU_TSC_CTRL, "attr": abi.KVM_VCPU_TSC_OFFSET,
                                                     "addr": int(ffi.cast("uintptr_t", value))})
        _ioctl(self.fd, abi.KVM_SET_DEVICE_ATTR, attr, "KVM_SET_DEVICE_ATTR(TSC_OFFSET)")

    def get_tsc_khz(self) -> int:
        return _ioctl(self.fd, abi.KVM_GET_TSC_KHZ, what="KVM_GET_TSC_KHZ")

    def close(self) -> None:
        del self.run_ptr, self.run_base, self._mm_ptr
        self._mm.close()
        os.close(self.fd)
