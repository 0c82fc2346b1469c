"""ACPI tables for a pyvmm guest, built in Python and written to guest memory.

``build_acpi`` lays out RSDP, XSDT, FADT, MADT and DSDT as one contiguous,
16-byte-aligned blob with the RSDP first (pyvmm puts it at 0xE0000 so a
kernel scanning the BIOS area finds it, and also passes its address in
boot_params).

The platform is *hardware-reduced* ACPI: there are no PM1/GPE blocks, no SCI
and no FACS.  Power-off goes through the FADT sleep control register (Linux
writes ``SLP_TYPa << 2 | SLP_EN`` with SLP_TYPa taken from ``\\_S5_``), reset
through the FADT reset register.  Field layouts follow the ACPI 6.3
specification (FADT 6.3, MADT revision 5).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Sequence

from firmware import aml

# --- Generic table header (ACPI 6.3, 5.2.6) ---
HEADER_LEN = 36
CREATOR_ID = b"PYVM"
CREATOR_REVISION = 1
OEM_REVISION = 1
OEM_ID_LEN = 6
OEM_TABLE_ID_LEN = 8
TABLE_ALIGN = 16  # each table starts on a 16-byte boundary; the RSDP must

# --- RSDP (5.2.5.3) ---
RSDP_SIGNATURE = b"RSD PTR "
RSDP_REVISION = 2  # ACPI 2.0+ RSDP, carries the XSDT address
RSDP_V1_LEN = 20  # the part covered by the first checksum
RSDP_LEN = 36

# --- Table revisions ---
XSDT_REVISION = 1
FADT_REVISION = 6
FADT_MINOR_REVISION = 3  # ACPI 6.3
FADT_LEN = 276  # ACPI 6.x FADT, up to and including the hypervisor vendor id
MADT_REVISION = 5  # ACPI 6.3
DSDT_REVISION = 2  # >= 2: AML integers are 64 bits wide
SRAT_REVISION = 3  # ACPI 6.x
SRAT_TABLE_REVISION = 1  # the body's first (reserved) field must be 1 for compatibility

# --- FADT field offsets (5.2.9, table 5.34) ---
FADT_FIRMWARE_CTRL = 36
FADT_DSDT = 40
FADT_PREFERRED_PM_PROFILE = 45
FADT_SCI_INT = 46
FADT_IAPC_BOOT_ARCH = 109
FADT_FLAGS = 112
FADT_RESET_REG = 116
FADT_RESET_VALUE = 128
FADT_MINOR_VERSION = 131
FADT_X_FIRMWARE_CTRL = 132
FADT_X_DSDT = 140
FADT_SLEEP_CONTROL_REG = 244
FADT_SLEEP_STATUS_REG = 256
FADT_HYPERVISOR_VENDOR_ID = 268
HYPERVISOR_VENDOR_ID = b"PYVMM".ljust(8)

# FADT Flags (table 5.35).
FADT_F_PWR_BUTTON = 1 << 4  # no fixed-feature power button
FADT_F_SLP_BUTTON = 1 << 5  # no fixed-feature sleep button
FADT_F_RESET_REG_SUP = 1 << 10
FADT_F_HW_REDUCED_ACPI = 1 << 20

# IA-PC boot architecture flags (table 5.36).
IAPC_BOOT_ARCH_LEGACY_DEVICES = 1 << 0
IAPC_BOOT_ARCH_8042 = 1 << 1
IAPC_BOOT_ARCH_VGA_NOT_PRESENT = 1 << 2
IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED = 1 << 3
IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT = 1 << 5

# --- Generic Address Structure (5.2.3.2) ---
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1
GAS_LEN = 12

# --- MADT (5.2.12) ---
MADT_PCAT_COMPAT = 1 << 0  # dual 8259s are present (KVM's in-kernel PIC)
MADT_TYPE_LOCAL_APIC = 0
MADT_TYPE_IO_APIC = 1
MADT_TYPE_INTERRUPT_OVERRIDE = 2
MADT_TYPE_LOCAL_APIC_NMI = 4
MADT_TYPE_LOCAL_X2APIC = 9
MADT_TYPE_LOCAL_X2APIC_NMI = 10
MADT_LAPIC_ENABLED = 1 << 0
MADT_MAX_XAPIC_ID = 254  # 0xFF is the broadcast id; higher ids need x2APIC entries
MADT_ALL_PROCESSORS_UID = 0xFF
MADT_ALL_PROCESSORS_X2UID = 0xFFFFFFFF
LINT1 = 1  # LINT1 carries NMI on PC platforms
# MPS INTI flags: polarity bits 1-0, trigger mode bits 3-2.
MPS_INTI_POLARITY_ACTIVE_HIGH = 0b01
MPS_INTI_POLARITY_ACTIVE_LOW = 0b11
MPS_INTI_TRIGGER_EDGE = 0b01 << 2
MPS_INTI_TRIGGER_LEVEL = 0b11 << 2

# --- Platform limits ---
ISA_IRQS = 16
KVM_IOAPIC_NUM_PINS = 24
MAX_CPUS = 4096  # KVM_MAX_VCPUS on x86

# --- Sleep states ---
# \_S5_ SLP_TYPa; the VMM treats a sleep-control write of
# (5 << 2) | SLP_EN as power-off.
S5_SLP_TYP = 5


# SRAT (System Resource Affinity Table) structures, ACPI 6.3 section 5.2.16.
SRAT_TYPE_LOCAL_APIC_AFFINITY = 0
SRAT_TYPE_MEMORY_AFFINITY = 1
SRAT_TYPE_LOCAL_X2APIC_AFFINITY = 2
SRAT_LOCAL_APIC_AFFINITY_LEN = 16
SRAT_MEMORY_AFFINITY_LEN = 40
SRAT_LOCAL_X2APIC_AFFINITY_LEN = 24
SRAT_F_ENABLED = 1 << 0
SRAT_MEM_F_HOT_PLUGGABLE = 1 << 1
MAX_PROXIMITY_DOMAIN = 0xFFFFFFFF


class AcpiError(ValueError):
    """The configuration cannot be turned into valid ACPI tables."""


@dataclass
class AcpiDevice:
    """One device in the DSDT, under ``\\_SB_``."""

    name: str  # 4-char AML name, e.g. "VR00"
    hid: str  # "LNRO0005" (virtio-mmio), "VMBus"; "PNP0501"-style ids use EISAID
    uid: int = 0
    mmio: Sequence[tuple[int, int]] = ()  # (base, size); above 4 GiB -> QWordMemory
    irqs: Sequence[int] = ()  # GSIs, one Extended Interrupt descriptor
    io: Sequence[tuple[int, int]] = ()  # (port, length)
    sta: int | None = 0x0F  # _STA value; None omits _STA (present by default)
    cca: bool = False  # _CCA = 1: DMA is cache coherent (virtio-mmio sets it)
    irq_edge: bool = True  # Edge (virtio-mmio, ISA) or Level
    irq_active_low: bool = False
    sta_method: bool = True  # _STA as Method() { Return(sta) } or as Name()
    extra: Sequence[aml.AmlObject] = ()  # more terms, e.g. a GED's _EVT method
    empty_crs: bool = False  # a _CRS even with no resources (Linux's VMBus driver walks it)


@dataclass(frozen=True)
class InterruptOverride:
    """An MADT Interrupt Source Override: ISA ``source_irq`` arrives on ``gsi``."""

    source_irq: int
    gsi: int
    edge: bool = True
    active_low: bool = False


# The PC convention "PIT IRQ0 is wired to IOAPIC pin 2".  Only correct if the
# VMM routes GSI 2 to the PIT (KVM_SET_GSI_ROUTING: GSI 0 -> IOAPIC pin 2, as
# QEMU does).  KVM's default routing maps GSI n to IOAPIC pin n, so with the
# default routing the MADT must *not* carry this override.
PIT_IRQ0_TO_GSI2 = InterruptOverride(source_irq=0, gsi=2)


@dataclass(frozen=True)
class MemoryAffinity:
    """An SRAT memory range in NUMA proximity domain ``node``; device memory (virtio-mem)
    is ``hotpluggable``, so the guest reserves room for it without treating it as RAM."""

    base: int
    size: int
    node: int
    hotpluggable: bool = False


@dataclass
class AcpiConfig:
    """Everything ``build_acpi`` needs to know about the machine."""

    cpus: int  # APIC ids and ACPI processor UIDs are 0..cpus-1
    ioapic_addr: int = 0xFEC00000
    ioapic_id: int = 0
    ioapic_gsi_base: int = 0
    ioapic_pins: int = KVM_IOAPIC_NUM_PINS
    lapic_addr: int = 0xFEE00000
    sleep_control_port: int = 0x600
    sleep_status_port: int = 0x601
    reset_port: int = 0x602
    reset_value: int = 0x01
    devices: Sequence[AcpiDevice] = ()
    # Non-empty: an SRAT is built, every CPU in domain 0 and these memory ranges.
    memory_affinity: Sequence[MemoryAffinity] = ()
    isa_overrides: Sequence[InterruptOverride] = ()
    i8042: bool = False  # IAPC_BOOT_ARCH "8042" flag: keyboard controller present
    cmos_rtc: bool = False  # clear -> "CMOS RTC Not Present"
    oem_id: str = "PYVMM "
    oem_table_id: str = "PYVMMACP"


@dataclass(frozen=True)
class AcpiImage:
    """The built tables: ``blob`` goes at guest-physical ``base``."""

    rsdp_addr: int
    blob: bytes
    tables: dict[str, int] = field(default_factory=dict)  # signature -> address


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def checksum(data: bytes) -> int:
    """The byte that makes ``data`` plus itself sum to zero modulo 256."""
    return (-sum(data)) & 0xFF


def _align(value: int, alignment: int = TABLE_ALIGN) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


def _ascii_field(text: str, length: int, what: str) -> bytes:
    if not isinstance(text, str) or len(text) > length or not text.isascii() \
            or not text.isprintable():
        raise AcpiError(f"{what} {text!r} must be up to {length} printable ASCII characters")
    return text.ljust(length).encode("ascii")


def _table(signature: bytes, revision: int, body: bytes, config: AcpiConfig) -> bytes:
    """Prefix ``body`` with a standard header and fix up the checksum."""
    length = HEADER_LEN + len(body)
    header = struct.pack(
        "<4sIBB6s8sI4sI", signature, length, revision, 0,
        _ascii_field(config.oem_id, OEM_ID_LEN, "oem_id"),
        _ascii_field(config.oem_table_id, OEM_TABLE_ID_LEN, "oem_table_id"),
        OEM_REVISION, CREATOR_ID, CREATOR_REVISION)
    table = bytearray(header + body)
    table[9] = checksum(table)  # header offset 9 is the checksum byte
    return bytes(table)


def _gas_io8(port: int) -> bytes:
    """An 8-bit SystemIO Generic Address Structure at ``port``."""
    return struct.pack("<BBBBQ", GAS_SYSTEM_IO, 8, 0, GAS_ACCESS_BYTE, port)


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------

def _check_int(value: object, lo: int, hi: int, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise AcpiError(f"{what} {value!r} out of range {lo:#x}..{hi:#x}")


def _validate(config: AcpiConfig) -> None:
    _check_int(config.cpus, 1, MAX_CPUS, "cpus")
    _check_int(config.ioapic_addr, 0, 0xFFFFFFFF, "ioapic_addr")
    _check_int(config.ioapic_id, 0, 0xFF, "ioapic_id")
    _check_int(config.ioapic_pins, 1, 240, "ioapic_pins")
    _check_int(config.ioapic_gsi_base, 0, 0xFFFFFFFF - config.ioapic_pins, "ioapic_gsi_base")
    _check_int(config.lapic_addr, 0, 0xFFFFFFFF, "lapic_addr")
    for what in ("sleep_control_port", "sleep_status_port", "reset_port"):
        _check_int(getattr(config, what), 1, 0xFFFF, what)
    _check_int(config.reset_value, 0, 0xFF, "reset_value")
    _ascii_field(config.oem_id, OEM_ID_LEN, "oem_id")
    _ascii_field(config.oem_table_id, OEM_TABLE_ID_LEN, "oem_table_id")

    for what in ("devices", "isa_overrides", "memory_affinity"):
        if not isinstance(getattr(config, what), (list, tuple)):
            raise AcpiError(f"{what} must be a list or tuple")
    gsi_lo = config.ioapic_gsi_base
    gsi_hi = gsi_lo + config.ioapic_pins - 1
    seen_sources: set[int] = set()
    for ovr in config.isa_overrides:
        if not isinstance(ovr, InterruptOverride):
            raise AcpiError(f"isa_overrides: expected InterruptOverride, got {ovr!r}")
        _check_int(ovr.source_irq, 0, ISA_IRQS - 1, "override source_irq")
        _check_int(ovr.gsi, gsi_lo, gsi_hi, f"override of IRQ{ovr.source_irq}: gsi")
        if ovr.source_irq in seen_sources:
            raise AcpiError(f"two interrupt source overrides for IRQ{ovr.source_irq}")
        seen_sources.add(ovr.source_irq)

    for ma in config.memory_affinity:
        if not isinstance(ma, MemoryAffinity):
            raise AcpiError(f"memory_affinity: expected MemoryAffinity, got {ma!r}")
        _check_int(ma.size, 1, 1 << 64, "memory affinity size")
        _check_int(ma.base, 0, (1 << 64) - ma.size, "memory affinity base")
        _check_int(ma.node, 0, MAX_PROXIMITY_DOMAIN, "memory affinity node")

    seen_names: set[bytes] = set()
    for dev in config.devices:
        if not isinstance(dev, AcpiDevice):
            raise AcpiError(f"devices: expected AcpiDevice, got {dev!r}")
        try:
            seg = aml.name_seg(dev.name)
        except aml.AmlError as exc:
            raise AcpiError(f"device name: {exc}") from None
        if seg in seen_names:
            raise AcpiError(f"two devices named {dev.name!r}")
        seen_names.add(seg)
        where = f"device {dev.name}"
        if not isinstance(dev.hid, str) or not dev.hid or not dev.hid.isascii() \
                or not dev.hid.isprintable():
            raise AcpiError(f"{where}: _HID {dev.hid!r} must be non-empty printable ASCII")
        _check_int(dev.uid, 0, aml.UINT64_MAX, f"{where}: _UID")
        for what in ("mmio", "irqs", "io"):
            if not isinstance(getattr(dev, what), (list, tuple)):
                raise AcpiError(f"{where}: {what} must be a list or tuple")
        if dev.sta is not None:
            _check_int(dev.sta, 0, 0xFFFFFFFF, f"{where}: _STA")
        for entry in dev.mmio:
            if not (isinstance(entry, tuple) and len(entry) == 2):
                raise AcpiError(f"{where}: mmio entries are (base, size) tuples, got {entry!r}")
            base, size = entry
            _check_int(size, 1, 1 << 64, f"{where}: mmio size")
            _check_int(base, 0, (1 << 64) - size, f"{where}: mmio base")
        for gsi in dev.irqs:
            _check_int(gsi, gsi_lo, gsi_hi, f"{where}: GSI (outside the IOAPIC's pins)")
        if len(dev.irqs) > aml.MAX_EXTENDED_IRQS:
            raise AcpiError(f"{where}: at most {aml.MAX_EXTENDED_IRQS} interrupts")
        for entry in dev.io:
            if not (isinstance(entry, tuple) and len(entry) == 2):
                raise AcpiError(f"{where}: io entries are (port, length) tuples, got {entry!r}")
            port, length = entry
            _check_int(length, 1, 0xFF, f"{where}: io length")
            _check_int(port, 0, 0x10000 - length, f"{where}: io port")


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------

def _device_aml(dev: AcpiDevice) -> aml.Device:
    hid: aml.AmlObject = aml.EisaId(dev.hid) if aml.is_eisa_id(dev.hid) else aml.String(dev.hid)
    terms: list[aml.AmlObject] = [aml.Name("_HID", hid), aml.Name("_UID", aml.Integer(dev.uid))]
    if dev.cca:
        terms.append(aml.Name("_CCA", aml.ONE))
    resources: list[aml.ResourceDescriptor] = []
    for base, size in dev.mmio:
        if base + size <= 1 << 32:
            resources.append(aml.Memory32Fixed(base, size))
        else:
            resources.append(aml.QWordMemory(base, size))
    for port, length in dev.io:
        resources.append(aml.Io(port, length))
    if dev.irqs:
        resources.append(aml.ExtendedInterrupt(dev.irqs, edge=dev.irq_edge,
                                               active_low=dev.irq_active_low))
    if resources or dev.empty_crs:
        terms.append(aml.Name("_CRS", aml.ResourceTemplate(resources)))
    terms.extend(dev.extra)
    if dev.sta is not None:
        if dev.sta_method:
            terms.append(aml.Method("_STA", [aml.Return(aml.Integer(dev.sta))]))
        else:
            terms.append(aml.Name("_STA", aml.Integer(dev.sta)))
    return aml.Device(dev.name, terms)


def build_dsdt(config: AcpiConfig) -> bytes:
    """The DSDT: the devices under ``\\_SB_`` and ``\\_S5_`` for power-off."""
    system_bus = aml.Scope("\\_SB_", [_device_aml(d) for d in config.devices])
    # Package {SLP_TYPa, SLP_TYPb, reserved, reserved}; a hardware-reduced
    # platform only uses SLP_TYPa, written to the sleep control register.
    s5 = aml.Name("_S5_", aml.Package([S5_SLP_TYP, 0, 0, 0]))
    return _table(b"DSDT", DSDT_REVISION, system_bus.encode() + s5.encode(), config)


def build_madt(config: AcpiConfig) -> bytes:
    """The MADT: one local APIC per CPU, the IOAPIC, overrides, LINT1 NMI."""
    body = bytearray(struct.pack("<II", config.lapic_addr, MADT_PCAT_COMPAT))
    uses_x2apic = False
    for cpu in range(config.cpus):
        if cpu <= MADT_MAX_XAPIC_ID:
            body += struct.pack("<BBBBI", MADT_TYPE_LOCAL_APIC, 8, cpu, cpu, MADT_LAPIC_ENABLED)
        else:
            uses_x2apic = True
            body += struct.pack("<BBHIII", MADT_TYPE_LOCAL_X2APIC, 16, 0, cpu,
                                MADT_LAPIC_ENABLED, cpu)
    body += struct.pack("<BBBBII", MADT_TYPE_IO_APIC, 12, config.ioapic_id, 0,
                        config.ioapic_addr, config.ioapic_gsi_base)
    for ovr in config.isa_overrides:
        # Always explicit polarity/trigger, never "conforms to bus": a
        # hardware-reduced FADT has SCI_INT = 0, and Linux treats an override
        # of IRQ0 as the SCI's, turning a conforming polarity into active-low.
        flags = (MPS_INTI_POLARITY_ACTIVE_LOW if ovr.active_low else MPS_INTI_POLARITY_ACTIVE_HIGH)
        flags |= MPS_INTI_TRIGGER_EDGE if ovr.edge else MPS_INTI_TRIGGER_LEVEL
        body += struct.pack("<BBBBIH", MADT_TYPE_INTERRUPT_OVERRIDE, 10, 0,
                            ovr.source_irq, ovr.gsi, flags)
    # LINT1 is the NMI input on every CPU (flags 0: conforms to the bus).
    body += struct.pack("<BBBHB", MADT_TYPE_LOCAL_APIC_NMI, 6, MADT_ALL_PROCESSORS_UID, 0, LINT1)
    if uses_x2apic:
        body += struct.pack("<BBHIB3x", MADT_TYPE_LOCAL_X2APIC_NMI, 12, 0,
                            MADT_ALL_PROCESSORS_X2UID, LINT1)
    return _table(b"APIC", MADT_REVISION, bytes(body), config)


def build_srat(config: AcpiConfig) -> bytes:
    """The SRAT: every CPU in proximity domain 0, then the configured memory ranges."""
    body = bytearray(struct.pack("<IQ", SRAT_TABLE_REVISION, 0))
    for cpu in range(config.cpus):
        if cpu <= MADT_MAX_XAPIC_ID:
            # The domain is split: bits 7:0 here, bits 31:8 after the SAPIC EID (all 0).
            body += struct.pack("<BBBBIB3sI", SRAT_TYPE_LOCAL_APIC_AFFINITY, SRAT_LOCAL_APIC_AFFINITY_LEN,
                                0, cpu, SRAT_F_ENABLED, 0, bytes(3), 0)
        else:
            body += struct.pack("<BBHIIII4x", SRAT_TYPE_LOCAL_X2APIC_AFFINITY, SRAT_LOCAL_X2APIC_AFFINITY_LEN,
                                0, 0, cpu, SRAT_F_ENABLED, 0)
    for ma in config.memory_affinity:
        flags = SRAT_F_ENABLED | (SRAT_MEM_F_HOT_PLUGGABLE if ma.hotpluggable else 0)
        body += struct.pack("<BBIHQQIIQ", SRAT_TYPE_MEMORY_AFFINITY, SRAT_MEMORY_AFFINITY_LEN, ma.node, 0,
                            ma.base, ma.size, 0, flags, 0)
    return _table(b"SRAT", SRAT_REVISION, bytes(body), config)


def build_fadt(config: AcpiConfig, dsdt_addr: int) -> bytes:
    """The FADT of a hardware-reduced platform pointing at the DSDT."""
    fadt = bytearray(FADT_LEN - HEADER_LEN)

    def put(offset: int, fmt: str, *values: object) -> None:
        struct.pack_into(fmt, fadt, offset - HEADER_LEN, *values)

    # No FACS (optional when hardware-reduced), no SCI, no PM blocks: those
    # fields stay zero.
    put(FADT_DSDT, "<I", dsdt_addr if dsdt_addr < 1 << 32 else 0)
    put(FADT_X_DSDT, "<Q", dsdt_addr)
    boot_arch = IAPC_BOOT_ARCH_VGA_NOT_PRESENT
    if config.i8042:
        boot_arch |= IAPC_BOOT_ARCH_8042
    if not config.cmos_rtc:
        boot_arch |= IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT
    put(FADT_IAPC_BOOT_ARCH, "<H", boot_arch)
    put(FADT_FLAGS, "<I", FADT_F_HW_REDUCED_ACPI | FADT_F_RESET_REG_SUP
        | FADT_F_PWR_BUTTON | FADT_F_SLP_BUTTON)
    put(FADT_RESET_REG, f"<{GAS_LEN}s", _gas_io8(config.reset_port))
    put(FADT_RESET_VALUE, "<B", config.reset_value)
    put(FADT_MINOR_VERSION, "<B", FADT_MINOR_REVISION)
    put(FADT_SLEEP_CONTROL_REG, f"<{GAS_LEN}s", _gas_io8(config.sleep_control_port))
    put(FADT_SLEEP_STATUS_REG, f"<{GAS_LEN}s", _gas_io8(config.sleep_status_port))
    put(FADT_HYPERVISOR_VENDOR_ID, "<8s", HYPERVISOR_VENDOR_ID)
    return _table(b"FACP", FADT_REVISION, bytes(fadt), config)


def build_xsdt(config: AcpiConfig, table_addrs: Sequence[int]) -> bytes:
    """The XSDT listing the given tables (the DSDT is reached via the FADT)."""
    return _table(b"XSDT", XSDT_REVISION,
                  b"".join(struct.pack("<Q", a) for a in table_addrs), config)


def build_rsdp(config: AcpiConfig, xsdt_addr: int) -> bytes:
    """A revision-2 RSDP with both checksums; no RSDT (its address is 0)."""
    oem_id = _ascii_field(config.oem_id, OEM_ID_LEN, "oem_id")
    rsdp = bytearray(struct.pack("<8sB6sBIIQB3x", RSDP_SIGNATURE, 0, oem_id, RSDP_REVISION,
                                 0, RSDP_LEN, xsdt_addr, 0))
    rsdp[8] = checksum(rsdp[:RSDP_V1_LEN])
    rsdp[32] = checksum(rsdp)  # extended checksum over all 36 bytes
    return bytes(rsdp)


def build_acpi(config: AcpiConfig, base: int) -> AcpiImage:
    """Build every table for ``config`` as one blob to be placed at ``base``.

    Layout: RSDP, XSDT, FADT, MADT, [SRAT,] DSDT, each 16-byte aligned.  Raises
    :class:`AcpiError` on an invalid configuration.
    """
    _check_int(base, 0, (1 << 64) - 1, "base")
    if base % TABLE_ALIGN:
        raise AcpiError(f"base {base:#x} must be {TABLE_ALIGN}-byte aligned (RSDP rule)")
    _validate(config)
    try:
        dsdt = build_dsdt(config)
    except aml.AmlError as exc:  # validation should have caught it; keep it an AcpiError
        raise AcpiError(f"DSDT: {exc}") from None
    madt = build_madt(config)
    srat = build_srat(config) if config.memory_affinity else b""

    xsdt_off = _align(RSDP_LEN)
    xsdt_len = HEADER_LEN + 8 * (3 if srat else 2)
    fadt_off = _align(xsdt_off + xsdt_len)
    madt_off = _align(fadt_off + FADT_LEN)
    srat_off = _align(madt_off + len(madt))
    dsdt_off = _align(srat_off + len(srat))
    end = dsdt_off + len(dsdt)
    if base + end > 1 << 64:
        raise AcpiError("ACPI tables would run past the end of the address space")

    fadt = build_fadt(config, base + dsdt_off)
    xsdt = build_xsdt(config, [base + fadt_off, base + madt_off] + ([base + srat_off] if srat else []))
    rsdp = build_rsdp(config, base + xsdt_off)

    blob = bytearray(end)
    for off, table in ((0, rsdp), (xsdt_off, xsdt), (fadt_off, fadt),
                       (madt_off, madt), (srat_off, srat), (dsdt_off, dsdt)):
        blob[off:off + len(table)] = table
    tables = {"RSDP": base, "XSDT": base + xsdt_off, "FACP": base + fadt_off,
              "APIC": base + madt_off, "DSDT": base + dsdt_off}
    if srat:
        tables["SRAT"] = base + srat_off
    return AcpiImage(rsdp_addr=base, blob=bytes(blob), tables=tables)
