"""The virtual machine: KVM VM, vCPUs, memory, buses, devices, firmware, boot, lifecycle.

`Machine` is what the CLI runs and what the control plane (QMP) drives through its small
public API (status, pause, resume, powerdown, reset, quit, stats, events). Lifecycle
requests from vCPU threads (guest poweroff, reset, panic) are queued to the thread that
called `run()`, which performs them with every vCPU parked.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bus import Bus, BusOverlapError
from devices.acpi_pm import AcpiPmRegisters, I8042ResetPort
from devices.hyperv import hv_abi
from devices.hyperv.cpuid import with_hyperv_leaves
from devices.hyperv.hypercalls import HV_HYPERCALL_PORT, HV_HYPERCALL_PORT_SIZE
from devices.hyperv.balloon import HvBalloon
from devices.hyperv.balloon_memory import HotAddSlots, MemslotDiscard
from devices.hyperv.partition import HyperV
from devices.vmbus import VmBus
from devices.pvpanic import PVPANIC_ACPI_HID, PVPANIC_PORT, PvPanic
from devices.serial import Serial16550
from firmware import aml
from firmware.acpi import AcpiConfig, AcpiDevice, MemoryAffinity, build_acpi
from firmware.mptable import build_mptable
from vmm import assist as assist_mod
from vmm import cpuid
from vmm import kvm_abi as abi
from vmm.boot import cpu_setup
from vmm.boot.bootparams import E820_RAM, E820_RESERVED, E820Entry, build_boot_params, initrd_max_addr
from vmm.boot.kernel import LoadedKernel, load_kernel
from vmm.hostinfo import host_kernel_params
from vmm.hostmem import PAGE_SIZE, HostMapping, format_size
from vmm.kvm import Kvm, KvmError, MsrValue, VcpuFd
from vmm.kvm_abi import ffi
from vmm.device_options import HvBalloonOptions, VirtioMemOptions
from vmm.memory import MMIO_HOLE_END, STABLE_OWNER, GuestMemory, ram_end, ram_layout
from vmm.memslots import MemslotManager
from vmm.msr import MsrDispatch, MsrFault, deny_filter_range
from vmm.symbols import Symbols
from vmm.tracing import NULL_TRACER, AnyTracer
from vmm.virtio_placement import PlacementError, VirtioPlacement
from vmm.vcpu import KICK_SIGNAL, FaultAction, Vcpu

log = logging.getLogger("pyvmm.machine")

VERSION = (0, 1, 0)

COM1_PORT, COM1_IRQ = 0x3F8, 4
COM2_PORT, COM2_IRQ = 0x2F8, 3
UART_PORTS = 8
UART_ACPI_HID = "PNP0501"  # 16550A-compatible COM port
ACPI_PM_PORT = 0x600
I8042_COMMAND_PORT = 0x64
ACPI_TABLES_ADDR = 0xE0000
EBDA_START = 0x9FC00
HIGH_MEMORY = 0x100000
TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000
MAX_CPUS = 8
# Device memory regions start above RAM on this boundary: Linux hot-plugs memory in
# 128 MiB blocks on x86-64 and refuses a region that does not start on one.
MEMORY_DEVICE_ALIGN = 128 << 20

# Local APIC MSI address: 0xFEE00000 | destination APIC id << 12 (physical mode, no hint).
MSI_ADDRESS_BASE = 0xFEE00000
MSI_DEST_ID_SHIFT = 12

# The ACPI Generic Event Device signals the power button on this IOAPIC pin (above the ISA
# range, so no legacy device or PIC routing can collide with it).
GED_GSI = 23
GED_HID = "ACPI0013"
POWER_BUTTON_HID = "PNP0C0C"
VMBUS_ACPI_HID = "VMBus"  # what Linux's hv_vmbus matches (also "VMBUS")
ACPI_NOTIFY_BUTTON_PRESSED = 0x80

EXIT_OK = 0
EXIT_GUEST_ERROR = 1


CPU_STATE_REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12",
                  "r13", "r14", "r15", "rip", "rflags")
CPU_STATE_SREGS = ("cr0", "cr2", "cr3", "cr4", "efer")


class MachineError(Exception):
    """The machine could not be built or started (one-line message)."""


@dataclass
class MachineConfig:
    kernel: Path
    initrd: Path | None = None
    memory: int = 256 << 20
    cpus: int = 1
    backend: str = "anon"
    cpu_features: str | None = None
    cmdline: str | None = None          # replaces the default command line whole
    append: str = ""                    # added to the default command line
    serial1: str | None = None          # unix socket path for ttyS1
    no_reboot: bool = False
    trace_exits: bool = False           # log every vCPU exit at debug level (slow)
    tracer: AnyTracer = NULL_TRACER     # the event trace (--trace FILE); the caller closes it
    system_map: Path | None = None
    console_output: Callable[[bytes], None] | None = None
    virtio_mem: list[VirtioMemOptions] = field(default_factory=list)
    hv_balloon: HvBalloonOptions | None = None   # needs hyperv
    mem_prealloc: bool = False          # fault all of RAM in at start and after each reset
    hyperv: bool = False                # the Hyper-V synthetic layer (devices/hyperv), in user space


class KvmIrqLine:
    """A GSI of the in-kernel IOAPIC/PIC, driven with KVM_IRQ_LINE."""

    def __init__(self, vm, gsi: int) -> None:
        self._vm = vm
        self.gsi = gsi

    def set_level(self, level: bool) -> None:
        self._vm.irq_line(self.gsi, level)

    def pulse(self) -> None:
        self._vm.irq_line(self.gsi, True)
        self._vm.irq_line(self.gsi, False)


@dataclass
class _VcpuInitialState:
    regs: bytes
    sregs: bytes
    fpu: bytes
    lapic: bytes
    events: bytes
    mp_state: int
    msrs: list[MsrValue]


class Machine:
    def __init__(self, config: MachineConfig) -> None:
        if not 1 <= config.cpus <= MAX_CPUS:
            raise MachineError(f"--cpus must be between 1 and {MAX_CPUS}")
        self.config = config
        self._status = "prelaunch"
        self._listeners: list[Callable[[str, dict | None], None]] = []
        self._requests: queue.Queue[tuple[str, str]] = queue.Queue()
        self._assist_lock = threading.Lock()
        self.assist_stats = assist_mod.AssistStats()
        self.reset_count = 0
        self.last_error: str | None = None
        self._reset_hooks: list[Callable[[], None]] = []
        self._frozen_tsc: list[int] | None = None
        self._frozen_clock: int | None = None
        # False once a resume could not put the clock back: the kvmclock (the default guest's
        # clocksource) and the raw TSC (a guest on clocksource=tsc) are checked apart.
        self.guest_clock_freeze = True
        self.guest_tsc_freeze = True
        self.msrs = MsrDispatch()
        self.msr_handlers = self.msrs.single  # index -> (read(vp), write(vp, value))
        self.hyperv: HyperV | None = None
        self._symbols = Symbols.load(config.system_map) if config.system_map else None
        self.started_at = time.monotonic()

        self.kvm = Kvm()
        self.kvm_capabilities = self.kvm.capabilities()
        log.debug("KVM capabilities: %s", self.kvm_capabilities)
        self.vm = self.kvm.create_vm()
        self._setup_vm()
        self.tracer = config.tracer
        self.slots = MemslotManager(self.vm, self.kvm.check_extension(abi.KVM_CAP_NR_MEMSLOTS) or 32764)
        self.slots.tracer = self.tracer
        self.memory = GuestMemory(self.slots)
        self.ram = HostMapping(config.memory, config.backend, "ram")
        if config.mem_prealloc:
            self.ram.populate(0, self.ram.size)
        for r in ram_layout(config.memory):
            try:
                self.slots.add(r.gpa, r.size, self.ram, r.offset, owner=STABLE_OWNER)
            except KvmError as e:
                raise MachineError(f"KVM cannot map {format_size(config.memory)} of guest RAM "
                                   f"({os.strerror(e.errno)}): ask for less --memory") from None
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self._build_devices()
        self.virtio = VirtioPlacement(self.vm, self.mmio, self.memory)
        self.virtio_mem: dict = {}
        self._build_memory_devices()
        self._cpuid_template, self._hidden_features = self._cpuid_template_for(config)
        self.vmbus: VmBus | None = None
        self.hv_balloon: HvBalloon | None = None
        if config.hyperv:
            self.hyperv = self._build_hyperv()
            self._cpuid_template = with_hyperv_leaves(self._cpuid_template, self.hyperv.cpuid_leaves())
            self.vmbus = VmBus(self.hyperv.synic, self.hyperv.connections, self.memory)
            self.vmbus.tracer = self.tracer
            if config.hv_balloon is not None:
                self.hv_balloon = self._build_hv_balloon(config.hv_balloon)
            # Linux's hv_vmbus binds to this ACPI device and walks its (empty) _CRS.
            self.acpi_devices.append(AcpiDevice(name="VMBS", hid=VMBUS_ACPI_HID, empty_crs=True))
        self.vcpus: list[Vcpu] = []
        self._initial: list[_VcpuInitialState] = []
        self._msr_indices = self.kvm.msr_index_list()
        for i in range(config.cpus):
            fd = self.vm.create_vcpu(i)
            fd.set_cpuid(cpuid.for_vcpu(self._cpuid_template, i, config.cpus))
            self.vcpus.append(Vcpu(fd, self, self.pio, self.mmio, trace_exits=config.trace_exits))
            self._initial.append(self._capture_initial_state(fd))
        self._irqchip_initial = [self.vm.get_irqchip(chip) for chip in
                                 (abi.KVM_IRQCHIP_PIC_MASTER, abi.KVM_IRQCHIP_PIC_SLAVE, abi.KVM_IRQCHIP_IOAPIC)]
        self.kernel_info: LoadedKernel | None = None
        self.cmdline = self._build_cmdline()
        self._load_guest()

    # ------------------------------------------------------------------ build
    def _setup_vm(self) -> None:
        vm = self.vm
        try:
            vm.set_tss_addr(TSS_ADDR)
            vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        except KvmError as e:  # only VMX needs these; other KVMs may refuse them
            log.debug("TSS/identity-map setup not accepted: %s", e)
        vm.create_irqchip()
        if self.kvm.check_extension(abi.KVM_CAP_PIT2):
            vm.create_pit2()

    def _build_devices(self) -> None:
        cfg = self.config
        out = cfg.console_output or _stdout_writer()
        self.serial0 = Serial16550(KvmIrqLine(self.vm, COM1_IRQ), out, name="ttyS0")
        self.pio.register(COM1_PORT, UART_PORTS, self.serial0, "ttyS0")
        # ttyS1 exists only when something listens on it: Linux probes every UART it finds,
        # which costs about a second of interpreted kernel code on a PVM host, and the default
        # /init starts the agent only when ttyS1 has a UART behind it.
        self.serial1_port = None
        self.serial1: Serial16550 | None = None
        if cfg.serial1:
            from devices.console import UnixSocketPort

            self.serial1_port = UnixSocketPort(cfg.serial1)
            self.serial1 = Serial16550(KvmIrqLine(self.vm, COM2_IRQ), self.serial1_port.write, name="ttyS1")
            self.serial1_port.start(self.serial1.feed)
            self.pio.register(COM2_PORT, UART_PORTS, self.serial1, "ttyS1")
        self.acpi_pm = AcpiPmRegisters(on_poweroff=lambda: self.request("poweroff", "guest"),
                                       on_reset=lambda: self.request("reset", "guest"))
        self.pio.register(ACPI_PM_PORT, AcpiPmRegisters.SIZE, self.acpi_pm, "acpi-pm")
        self.pio.register(I8042_COMMAND_PORT, 1, I8042ResetPort(lambda: self.request("reset", "guest")), "i8042")
        self.pvpanic = PvPanic(lambda events: self.request("panic", f"pvpanic events {events:#x}"))
        self.pio.register(PVPANIC_PORT, 1, self.pvpanic, "pvpanic")
        self.ged_irq = KvmIrqLine(self.vm, GED_GSI)
        self.acpi_devices: list[AcpiDevice] = [
            # A hardware-reduced ACPI guest sets up no legacy PIC, so Linux maps ISA IRQs only
            # for devices the DSDT describes: the UARTs must be listed with their interrupts.
            AcpiDevice(name="COM1", hid=UART_ACPI_HID, uid=1, io=[(COM1_PORT, UART_PORTS)], irqs=[COM1_IRQ]),
            AcpiDevice(name="PEVT", hid=PVPANIC_ACPI_HID, io=[(PVPANIC_PORT, 1)]),
            AcpiDevice(name="PWRB", hid=POWER_BUTTON_HID),
            # One event: every GED interrupt is a power-button press.
            AcpiDevice(name="GED0", hid=GED_HID, irqs=[GED_GSI], extra=[
                aml.Method("_EVT", [aml.Notify("\\_SB_.PWRB", ACPI_NOTIFY_BUTTON_PRESSED)], args=1)]),
        ]
        if self.serial1 is not None:
            self.acpi_devices.insert(1, AcpiDevice(name="COM2", hid=UART_ACPI_HID, uid=2,
                                                   io=[(COM2_PORT, UART_PORTS)], irqs=[COM2_IRQ]))

    def _build_memory_devices(self) -> None:
        from devices.virtio.mem import VirtioMem

        # Above RAM and above the 32-bit MMIO hole, as QEMU's device-memory area.
        next_addr = _align_up(max(ram_end(self.config.memory), MMIO_HOLE_END), MEMORY_DEVICE_ALIGN)
        for opt in self.config.virtio_mem:
            if opt.id in self.virtio_mem:
                raise MachineError(f"two memory devices are called {opt.id!r}")
            addr = _align_up(next_addr, max(MEMORY_DEVICE_ALIGN, opt.block_size))
            try:
                dev = VirtioMem(opt.id, addr, opt.size, memslots=self.slots, block_size=opt.block_size,
                                node=opt.node, memslot_size=opt.memslot_size, backend=opt.backend,
                                prealloc=opt.prealloc, requested_size=opt.requested_size)
            except ValueError as e:
                raise MachineError(str(e)) from None
            dev.size_change_listener = lambda data: self.emit("MEMORY_DEVICE_SIZE_CHANGE", data)
            dev.tracer = self.tracer
            dev.trace_description()
            dev.unplugged_access_listener = lambda data: self.emit("PYVMM_UNPLUGGED_MEMORY_ACCESS", data)
            try:
                self.virtio.add(dev, f"virtio-mem-{opt.id}")
                self.mmio.register(addr, opt.size, dev.trap, f"virtio-mem-{opt.id}-region")
            except (PlacementError, BusOverlapError) as e:
                raise MachineError(f"cannot place virtio-mem {opt.id}: {e}") from None
            self.virtio_mem[opt.id] = dev
            next_addr = addr + opt.size
        self._memory_devices_end = next_addr  # hv-balloon's hot-add region goes above

    def _cpuid_template_for(self, cfg: MachineConfig) -> tuple[list[dict], list[str]]:
        policy = cpuid.CpuidPolicy.parse(cfg.cpu_features)
        supported = self.kvm.supported_cpuid()
        tsc_khz = 0
        if self.kvm.check_extension(abi.KVM_CAP_GET_TSC_KHZ):
            tsc_khz = self._probe_tsc_khz()
        self._tsc_khz = tsc_khz
        return cpuid.apply_policy(supported, policy, tsc_khz=tsc_khz,
                                  tsc_deadline=bool(self.kvm.check_extension(abi.KVM_CAP_TSC_DEADLINE_TIMER)))

    def _build_hyperv(self) -> HyperV:
        """The user-space Hyper-V partition. Its MSRs always exit to pyvmm (the MSR filter
        denies them to KVM), so a KVM with its own Hyper-V emulation never answers them."""
        for cap, name in ((abi.KVM_CAP_X86_USER_SPACE_MSR, "KVM_CAP_X86_USER_SPACE_MSR"),
                          (abi.KVM_CAP_X86_MSR_FILTER, "KVM_CAP_X86_MSR_FILTER")):
            if not self.kvm.check_extension(cap):
                raise MachineError(f"--hyperv needs {name}, which this host KVM lacks")
        try:
            self.vm.enable_cap(abi.KVM_CAP_X86_USER_SPACE_MSR,
                               abi.KVM_MSR_EXIT_REASON_FILTER | abi.KVM_MSR_EXIT_REASON_UNKNOWN)
            self.vm.set_msr_filter([deny_filter_range(hv_abi.HV_MSR_RANGE_FIRST, hv_abi.HV_MSR_RANGE_LAST,
                                                      abi.KVM_MSR_FILTER_READ | abi.KVM_MSR_FILTER_WRITE)])
        except KvmError as e:
            raise MachineError(f"--hyperv: the host KVM refused user-space MSR exits ({e})") from None
        self._msi_lock = threading.Lock()
        hyperv = HyperV(vp_count=self.config.cpus, memory=self.memory, raise_interrupt=self._signal_vp,
                        on_guest_crash=self._hyperv_crash, tsc_hz=self._tsc_khz * 1000,
                        apic_hz=cpuid.KVM_APIC_BUS_KHZ * 1000, hypercall_port=HV_HYPERCALL_PORT)
        self.msrs.add_range(hv_abi.HV_MSR_RANGE_FIRST, hv_abi.HV_MSR_RANGE_LAST, hyperv)
        self.pio.register(HV_HYPERCALL_PORT, HV_HYPERCALL_PORT_SIZE, hyperv.hypercall_device, "hv-hypercall")
        return hyperv

    def _build_hv_balloon(self, opt: HvBalloonOptions) -> HvBalloon:
        """The Dynamic Memory device on VMBus. Its hot-add region sits above RAM and every
        virtio-mem region; only the part the guest has been given is mapped, in slots."""
        hot_add = None
        gpa = _align_up(self._memory_devices_end, MEMORY_DEVICE_ALIGN)
        if opt.memdev_size:
            if opt.memdev_size % MEMORY_DEVICE_ALIGN:
                raise MachineError(f"--hv-balloon: memdev-size must be a multiple of "
                                   f"{format_size(MEMORY_DEVICE_ALIGN)} (the guest's memory block)")
            mapping = HostMapping(opt.memdev_size, "anon", f"hv-balloon:{opt.id}")  # address space only
            hot_add = HotAddSlots(self.slots, mapping, gpa, owner=f"hv-balloon:{opt.id}")  # as virtio-mem:<id>
            self._memory_devices_end = gpa + opt.memdev_size
        dev = HvBalloon(opt.id, boot_ram=ram_layout(self.config.memory),
                        memory=MemslotDiscard(self.slots), hot_add_gpa=gpa if opt.memdev_size else None,
                        hot_add_size=opt.memdev_size, hot_add=hot_add)
        if opt.status_report:
            dev.status_listener = lambda report: self.emit("HV_BALLOON_STATUS_REPORT", report)
        dev.actual_listener = lambda actual: self.emit("BALLOON_CHANGE", {"actual": actual})
        dev.tracer = self.tracer
        dev.trace_description()
        self.vmbus.add_device(dev)
        return dev

    def _signal_vp(self, vp: int, vector: int) -> None:
        """A fixed, edge-triggered interrupt to VP `vp` (its APIC id is its vCPU index)."""
        with self._msi_lock:  # VmFd.signal_msi reuses one request struct
            self.vm.signal_msi(MSI_ADDRESS_BASE | vp << MSI_DEST_ID_SHIFT, vector)

    def _hyperv_crash(self, params: tuple[int, ...]) -> None:
        self.request("panic", "Hyper-V crash MSRs P0-P4 " + " ".join(f"{p:#x}" for p in params))

    def _probe_tsc_khz(self) -> int:
        # KVM_GET_TSC_KHZ is a vCPU ioctl; a throwaway VM avoids consuming a vCPU id here.
        vm = self.kvm.create_vm()
        try:
            v = vm.create_vcpu(0)
            try:
                return v.get_tsc_khz()
            finally:
                v.close()
        except KvmError:
            return 0
        finally:
            vm.close()

    def _capture_initial_state(self, fd: VcpuFd) -> _VcpuInitialState:
        msrs = fd.get_msrs(self._msr_indices)
        lapic = fd.get_lapic()
        if fd.index == 0:
            lapic = cpu_setup.lapic_with_lint(lapic)
        return _VcpuInitialState(
            regs=bytes(ffi.buffer(fd.get_regs())), sregs=bytes(ffi.buffer(fd.get_sregs())),
            fpu=bytes(ffi.buffer(fd.get_fpu())), lapic=lapic,
            events=bytes(ffi.buffer(fd.get_vcpu_events())), mp_state=fd.get_mp_state(), msrs=msrs)

    def _build_cmdline(self) -> str:
        cfg = self.config
        if cfg.cmdline is not None:
            return cfg.cmdline
        # kvm-clock, not the TSC, so that a paused guest's clock stops: KVM_SET_CLOCK moves it
        # back on every KVM, while rewinding the raw TSC is not possible on all (PVM).
        # tsc=reliable still spares the slow clocksource watchdog. A Hyper-V guest sees no KVM
        # signature, hence no kvm-clock: it runs on the TSC (a pause shows where the TSC cannot
        # be rewound).
        clock = [] if cfg.hyperv else ["clocksource=kvm-clock"]
        parts = ["console=ttyS0", "reboot=acpi", *clock, "tsc=reliable", "memhp_default_state=online_movable"]
        parts += host_kernel_params()
        explicit = frozenset(self._hidden_features) - frozenset(cpuid.DEFAULT_MASK)
        names, dropped = cpuid.clearcpuid_names(self._hidden_features, first=explicit)
        if names:
            parts.append("clearcpuid=" + ",".join(names))
        if dropped:
            log.info("clearcpuid= has no room for %s: they are hidden in CPUID only", ",".join(dropped))
        if cfg.append:
            parts.append(cfg.append)
        if "acpi=off" in cfg.append.split():
            # Without ACPI the guest finds virtio-mmio devices only on its command line.
            parts[-1:-1] = self.virtio.cmdline_entries()
        return " ".join(parts)

    # ------------------------------------------------------------------ boot
    def _memory_affinity(self) -> list[MemoryAffinity]:
        """SRAT ranges, only when a virtio-mem device names a NUMA node (it then offers
        VIRTIO_MEM_F_ACPI_PXM, and its node_id must be a proximity domain the SRAT defines):
        boot RAM in domain 0, each device region hot-pluggable in its domain."""
        devices = [d for d in self.virtio_mem.values() if d.node is not None]
        if not devices:
            return []
        ranges = [MemoryAffinity(r.gpa, r.size, 0) for r in ram_layout(self.config.memory)]
        ranges += [MemoryAffinity(d.addr, d.region_size, d.node, hotpluggable=True) for d in devices]
        return ranges

    def _load_guest(self) -> None:
        """Write kernel, initrd, boot structures and ACPI tables; set the vCPUs' boot state."""
        cfg = self.config
        low_end = ram_layout(cfg.memory)[0].end
        write = self.memory.write
        kernel = load_kernel(cfg.kernel, write, low_end)
        self.kernel_info = kernel
        initrd_addr = initrd_size = 0
        if cfg.initrd:
            try:
                initrd = Path(cfg.initrd).read_bytes()
            except OSError as e:
                raise MachineError(f"cannot read initrd {cfg.initrd}: {e.strerror}") from None
            initrd_size = len(initrd)
            top = min(low_end, initrd_max_addr(kernel.setup_header))
            initrd_addr = (top - initrd_size) & ~(PAGE_SIZE - 1)
            if initrd_addr < kernel.end:
                raise MachineError(f"the initrd ({initrd_size >> 20} MiB) does not fit in guest RAM above the "
                                   f"kernel: give the guest more --memory")
            write(initrd_addr, initrd)
        cmdline = self.cmdline.encode() + b"\0"
        if len(cmdline) > cpu_setup.CMDLINE_MAX:
            raise MachineError(f"kernel command line is too long ({len(cmdline)} bytes)")
        write(cpu_setup.CMDLINE_ADDR, cmdline)
        acpi_config = AcpiConfig(cpus=cfg.cpus, devices=self.acpi_devices + self.virtio.acpi_devices(),
                                 memory_affinity=self._memory_affinity())
        acpi = build_acpi(acpi_config, ACPI_TABLES_ADDR)
        write(ACPI_TABLES_ADDR, acpi.blob)
        # In the EBDA's kilobyte, the second place Linux looks for it (reserved in the e820).
        write(EBDA_START, build_mptable(EBDA_START, cfg.cpus, acpi_config.ioapic_id, acpi_config.ioapic_addr,
                                        acpi_config.lapic_addr))
        e820 = [E820Entry(0, EBDA_START, E820_RAM),
                E820Entry(EBDA_START, HIGH_MEMORY - EBDA_START, E820_RESERVED),
                E820Entry(HIGH_MEMORY, low_end - HIGH_MEMORY, E820_RAM)]
        for r in ram_layout(cfg.memory)[1:]:
            e820.append(E820Entry(r.gpa, r.size, E820_RAM))
        write(cpu_setup.BOOT_PARAMS_ADDR, build_boot_params(
            e820=e820, cmdline_addr=cpu_setup.CMDLINE_ADDR, cmdline_len=len(cmdline),
            initrd_addr=initrd_addr, initrd_size=initrd_size, rsdp_addr=acpi.rsdp_addr,
            setup_header=kernel.setup_header))
        write(cpu_setup.GDT_ADDR, cpu_setup.gdt_bytes())
        for addr, data in cpu_setup.page_tables():
            write(addr, data)
        self._set_boot_cpu_state()

    def _set_boot_cpu_state(self) -> None:
        for vcpu, init in zip(self.vcpus, self._initial):
            fd = vcpu.fd
            fd.set_fpu(ffi.from_buffer("struct kvm_fpu *", bytearray(init.fpu)))
            fd.set_msrs(init.msrs)
            fd.set_lapic(init.lapic)
            fd.set_vcpu_events(ffi.from_buffer("struct kvm_vcpu_events *", bytearray(init.events)))
            sregs = ffi.from_buffer("struct kvm_sregs *", bytearray(init.sregs))
            regs = ffi.from_buffer("struct kvm_regs *", bytearray(init.regs))
            if vcpu.index == 0:
                cpu_setup.setup_long_mode_sregs(sregs)
                cpu_setup.setup_boot_regs(regs, self.kernel_info.entry)
                fd.set_msrs(list(cpu_setup.BOOT_MSRS))
            fd.set_sregs(sregs)
            fd.set_regs(regs)
            fd.set_mp_state(init.mp_state)

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        """Boot and serve lifecycle requests until the machine ends; returns the exit code."""
        self._install_kick_handler()
        self.virtio.start()
        self._set_status("running")
        for v in self.vcpus:
            v.start()
        try:
            while True:
                what, why = self._requests.get()
                code = self._handle_request(what, why)
                if code is not None:
                    return code
        finally:
            self._stop_vcpus()

    def _handle_request(self, what: str, why: str) -> int | None:
        if what == "poweroff":
            self._pause_vcpus()
            self._set_status("shutdown")
            self.emit("SHUTDOWN", {"guest": why == "guest", "reason": "guest-shutdown" if why == "guest" else why})
            return EXIT_OK
        if what == "quit":
            self._pause_vcpus()
            self._set_status("shutdown")
            self.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
            return EXIT_OK
        if what == "reset":
            if self.config.no_reboot:
                self._pause_vcpus()
                self._set_status("shutdown")
                self.emit("SHUTDOWN", {"guest": why == "guest", "reason": "guest-reset"})
                return EXIT_OK
            self._reset(why)
            return None
        if what == "panic":
            self._pause_vcpus()
            self._set_status("guest-panicked")
            self.emit("GUEST_PANICKED", {"action": "pause", "info": why})
            log.error("guest kernel panic (%s)", why)
            self.last_error = f"guest kernel panic ({why})"
            return EXIT_GUEST_ERROR
        if what == "fatal":
            self._pause_vcpus()
            self._set_status("internal-error")
            log.error("%s", why)
            self.last_error = why
            return EXIT_GUEST_ERROR
        if what == "stop":
            log.warning("%s: the VM is stopped (QMP 'cont' resumes it)", why)
            self.pause()
            return None
        log.warning("unknown machine request %s", what)
        return None

    def _reset(self, why: str) -> None:
        """Reboot in place: every vCPU and device back to power-on state, the kernel reloaded."""
        self._pause_vcpus()
        self.reset_count += 1
        for state in self._irqchip_initial:
            self.vm.set_irqchip(state)
        self.serial0.reset()
        if self.serial1 is not None:
            self.serial1.reset()
        self.virtio.reset()
        for dev in self.virtio_mem.values():
            dev.system_reset()  # a machine reset unplugs everything (a device reset must not)
        if self.vmbus is not None:
            self.vmbus.reset()  # channels closed, GPADLs dropped: the next kernel connects anew
        if self.hv_balloon is not None:
            self.hv_balloon.reset()  # back to the boot size, hot-add slots dropped
        if self.hyperv is not None:
            self.hyperv.reset()
        for cb in list(self._reset_hooks):
            cb()
        self.ram.discard(0, self.ram.size)
        if self.config.mem_prealloc:
            self.ram.populate(0, self.ram.size)
        self._load_guest()
        self.emit("RESET", {"guest": why == "guest", "reason": "guest-reset" if why == "guest" else why})
        self._resume_vcpus()
        self._set_status("running")

    def add_reset_hook(self, cb: Callable[[], None]) -> None:
        """Devices register their power-on reset here (called with vCPUs parked)."""
        self._reset_hooks.append(cb)

    def _install_kick_handler(self) -> None:
        if threading.current_thread() is threading.main_thread():
            # A handler (not SIG_DFL/SIG_IGN) is what makes KVM_RUN return EINTR on a kick.
            signal.signal(KICK_SIGNAL, lambda signum, frame: None)

    def _pause_vcpus(self) -> None:
        for v in self.vcpus:
            v.pause()

    def _resume_vcpus(self) -> None:
        for v in self.vcpus:
            v.resume()

    def _stop_vcpus(self) -> None:
        for v in self.vcpus:
            v.stop()
        for v in self.vcpus:
            v.join(2.0)

    # ------------------------------------------------------------------ requests
    def request(self, what: str, why: str = "") -> None:
        """Queue a lifecycle request; safe from any thread (vCPU, QMP, device)."""
        self._requests.put((what, why))

    # VcpuHost
    def vcpu_request(self, vcpu: Vcpu, what: str) -> None:
        self.request(what, "guest")
        vcpu.pause()  # park this vCPU at once: it must not run past a reset/poweroff request

    def vcpu_fatal(self, vcpu: Vcpu, reason: str) -> None:
        self.request("fatal", reason)

    def vcpu_memory_fault(self, vcpu: Vcpu, gpa: int, size: int) -> FaultAction:
        """A guest access KVM could not back with host memory, in a virtio-mem region: an
        unplugged block is reported and the VM stopped (resuming would only fault again); a
        plugged block raced with its PLUG's host work, now done, and the access is retried."""
        for dev in self.virtio_mem.values():
            if not dev.region_contains(gpa):
                continue
            if dev.on_unplugged_access(gpa, "fault") is not None:
                self.request("stop", f"vCPU {vcpu.index} touched unplugged memory at {gpa:#x}")
                return FaultAction.STOP
            if dev.settle_fault(gpa):
                return FaultAction.RETRY
            self.request("stop", f"vCPU {vcpu.index} touched plugged memory at {gpa:#x} that the host "
                         "could not make accessible")
            return FaultAction.STOP
        return FaultAction.UNHANDLED

    def vcpu_msr_exit(self, vcpu: Vcpu, is_write: bool) -> None:
        msr = vcpu.fd.run_ptr.msr
        try:
            if is_write:
                self.msrs.write(vcpu.index, msr.index, msr.data)
            else:
                msr.data = self.msrs.read(vcpu.index, msr.index)
            msr.error = 0
        except MsrFault:
            msr.error = 1  # #GP, as real hardware does for an MSR it lacks

    def vcpu_emulation_failure(self, vcpu: Vcpu) -> bool:
        fd = vcpu.fd
        run = fd.run_ptr
        internal = run.internal
        failure = assist_mod.EmulationFailure(
            internal.suberror, internal.ndata, tuple(internal.data[i] for i in range(min(internal.ndata, 16))))
        with self._assist_lock:
            regs = fd.get_regs()
            sregs = fd.get_sregs()
            cpu = assist_mod.CpuState.from_kvm(regs, sregs, bytes(fd.get_xsave()))
            try:
                action = assist_mod.assist(failure, cpu, self.memory, self._symbols)
            except assist_mod.AssistFailure as e:
                self.assist_stats.record_failure(e)
                self.request("fatal", f"vCPU {vcpu.index}: emulation failure the assist cannot complete: {e}")
                return False
            self._apply_assist(fd, regs, sregs, action)
            self.assist_stats.record(action)
        return True

    def _apply_assist(self, fd: VcpuFd, regs, sregs, action) -> None:
        for gpa, data in action.mem_writes:
            self.memory.write(gpa, data)
        if action.set_regs:
            for name, value in action.set_regs.items():
                setattr(regs, name, value)
            fd.set_regs(regs)
        if action.set_mxcsr is not None:
            xsave = fd.get_xsave()
            assist_mod.set_mxcsr_in_xsave(xsave, action.set_mxcsr)
            fd.set_xsave(xsave)
        if action.set_cr2 is not None:
            sregs.cr2 = action.set_cr2
            fd.set_sregs(sregs)
        if action.inject_exception is not None:
            vector, error_code = action.inject_exception
            ev = fd.get_vcpu_events()
            ev.exception.injected = 1
            ev.exception.nr = vector
            ev.exception.has_error_code = 1 if error_code is not None else 0
            ev.exception.error_code = error_code or 0
            ev.flags = 0
            fd.set_vcpu_events(ev)

    # ------------------------------------------------------------------ control API
    def status(self) -> str:
        return self._status

    def _set_status(self, status: str) -> None:
        self._status = status

    def pause(self) -> None:
        if self._status == "running":
            self._pause_vcpus()
            self._freeze_guest_time()
            self._set_status("paused")
            self.emit("STOP", None)

    def resume(self) -> None:
        if self._status == "paused":
            self._thaw_guest_time()
            self._resume_vcpus()
            self._set_status("running")
            self.emit("RESUME", None)

    def cpu_state(self) -> list[dict]:
        """Each vCPU's registers, for `info registers` / `query-cpus-fast`. A running VM is
        held for the read (KVM_GET_REGS waits for KVM_RUN to return) without a STOP event."""
        running = self._status == "running"
        if running:
            self._pause_vcpus()
        try:
            out = []
            for v in self.vcpus:
                regs, sregs = v.fd.get_regs(), v.fd.get_sregs()
                state = {"cpu-index": v.index, "thread-id": v.native_id or 0}
                state.update({name: getattr(regs, name) for name in CPU_STATE_REGS})
                state.update({name: getattr(sregs, name) for name in CPU_STATE_SREGS})
                state["cpl"] = sregs.cs.selector & 3
                state["symbol"] = self._symbols.lookup(regs.rip) if self._symbols else None
                out.append(state)
            return out
        finally:
            if running:
                self._resume_vcpus()

    def _freeze_guest_time(self) -> None:
        """Remember each vCPU's TSC and the kvmclock, so a paused guest sees no time pass."""
        try:
            self._frozen_tsc = [v.fd.get_msrs([abi.MSR_IA32_TSC])[0].data for v in self.vcpus]
            self._frozen_clock = self.vm.get_clock() if self.kvm.check_extension(abi.KVM_CAP_ADJUST_CLOCK) else None
        except (KvmError, IndexError) as e:
            log.warning("cannot save guest time on pause: %s", e)
            self._frozen_tsc, self._frozen_clock = None, None

    def _thaw_guest_time(self) -> None:
        """Put the kvmclock back where the pause found it, and rewind each TSC by the paused
        time (the TSC-offset attribute, else an MSR write); then check what took: some KVMs
        (PVM) keep the raw guest TSC running, while KVM_SET_CLOCK works everywhere."""
        if self._frozen_tsc is None:
            return
        tolerance_ns = 500_000_000
        tsc_held = clock_held = True
        try:
            for v, frozen in zip(self.vcpus, self._frozen_tsc):
                fd = v.fd
                now = fd.get_msrs([abi.MSR_IA32_TSC])[0].data
                try:
                    fd.set_tsc_offset(fd.get_tsc_offset() - (now - frozen))
                except KvmError:
                    fd.set_msrs([(abi.MSR_IA32_TSC, frozen)])
                ticks = fd.get_msrs([abi.MSR_IA32_TSC])[0].data - frozen
                tsc_held &= ticks < max(self._tsc_khz, 1_000_000) * tolerance_ns // 1_000_000
            if self._frozen_clock is None:
                clock_held = False
            else:
                self.vm.set_clock(self._frozen_clock)
                clock_held = self.vm.get_clock() - self._frozen_clock < tolerance_ns
        except (KvmError, IndexError) as e:
            log.warning("cannot restore guest time on resume: %s", e)
            tsc_held = clock_held = False
        if not tsc_held and self.guest_tsc_freeze:
            log.info("this KVM does not let pyvmm rewind the guest TSC: a paused guest on "
                     "clocksource=tsc sees the pause as elapsed time (kvm-clock does not)")
        if not clock_held and self.guest_clock_freeze:
            log.warning("this KVM did not take KVM_SET_CLOCK: the paused time shows in the guest clock")
        self.guest_tsc_freeze, self.guest_clock_freeze = tsc_held, clock_held
        self._frozen_tsc = None

    def reset(self) -> None:
        self.request("reset", "host-qmp-system-reset")

    def quit(self) -> None:
        self.request("quit", "host")

    def powerdown(self) -> None:
        """Press the ACPI power button; the guest decides how to shut down (as on QEMU)."""
        self.emit("POWERDOWN", None)
        self.ged_irq.pulse()

    def version(self) -> tuple[int, int, int]:
        return VERSION

    def add_event_listener(self, cb: Callable[[str, dict | None], None]) -> None:
        self._listeners.append(cb)

    def emit(self, event: str, data: dict | None) -> None:
        for cb in list(self._listeners):
            try:
                cb(event, data)
            except Exception:
                log.exception("event listener failed on %s", event)

    def stats(self) -> dict:
        exits: dict[str, int] = {}
        for v in self.vcpus:
            for name, n in v.exit_stats().items():
                exits[name] = exits.get(name, 0) + n
        return {
            "exits": exits,
            "assists": self.assist_stats.as_dict(),
            "pio": self.pio.stats(),
            "mmio": self.mmio.stats(),
            "vcpu-run-ns": [v.run_time_ns() for v in self.vcpus],
            "memslots": {"count": len(self.slots.slots()), "adds": self.slots.stats.adds,
                         "removes": self.slots.stats.removes},
            "resets": self.reset_count,
            "uptime-s": round(time.monotonic() - self.started_at, 3),
            "hidden-cpu-features": list(self._hidden_features),
            "kvm-capabilities": self.kvm_capabilities,
            "guest-time-frozen-on-pause": {"kvm-clock": self.guest_clock_freeze, "tsc": self.guest_tsc_freeze},
            "virtio": self.virtio.stats(),
            "virtio-mem": {i: d.stats() for i, d in self.virtio_mem.items()},
            "msrs": self.msrs.stats(),
            "hyperv": self.hyperv.stats() if self.hyperv is not None else None,
            "vmbus": self.vmbus.stats() if self.vmbus is not None else None,
            "hv-balloon": self.hv_balloon.stats() if self.hv_balloon is not None else None,
            "trace": self.tracer.stats(),
        }

    def close(self) -> None:
        self._stop_vcpus()
        self.virtio.close()
        for dev in self.virtio_mem.values():
            dev.close()
        if self.serial1_port is not None:
            self.serial1_port.close()
        for v in self.vcpus:
            v.fd.close()
        self.vm.close()
        self.kvm.close()
        self.ram.close()


def _stdout_writer() -> Callable[[bytes], None]:
    fd = 1

    def write(data: bytes) -> None:
        try:
            os.write(fd, data)
        except OSError:
            pass

    return write


def _align_up(value: int, align: int) -> int:
    return -(-value // align) * align
