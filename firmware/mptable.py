"""The Intel MultiProcessor Specification (1.4) table: an MP floating pointer and a
configuration table listing the CPUs, the ISA bus, the IOAPIC and the ISA interrupt routes.

Linux uses ACPI's MADT when it is there, but it looks for the MP floating pointer early in
boot either way, and without one it scans 64 KiB of the BIOS area in 16-byte steps, mapping
and unmapping the rest of the area at every step. Where the guest kernel is interpreted
(PVM) that scan costs several seconds; found in the first place it looks (the last KiB of
conventional memory, where the machine puts this table), it costs nothing. A guest booted
with `acpi=off` also gets its CPUs and IOAPIC from here.
"""

from __future__ import annotations

import struct

MPF_SIGNATURE = b"_MP_"
MPC_SIGNATURE = b"PCMP"
MP_SPEC_REV = 4  # version 1.4
MPF_LEN = 16
MPF_LENGTH_PARAGRAPHS = 1  # the floating pointer's length field counts 16-byte units
MPC_HEADER_LEN = 44

MP_PROCESSOR = 0
MP_BUS = 1
MP_IOAPIC = 2
MP_INTSRC = 3
MP_LINTSRC = 4

CPU_ENABLED = 1 << 0
CPU_BOOTPROCESSOR = 1 << 1
IOAPIC_ENABLED = 1 << 0
LAPIC_VERSION = 0x14  # integrated local APIC
IOAPIC_VERSION = 0x11
# CPUID.1 signature and feature flags the entries carry; Linux reads neither.
CPU_SIGNATURE = 0x600
CPU_FEATURES = (1 << 0) | (1 << 9)  # FPU, APIC

MP_INT = 0
MP_NMI = 1
MP_EXTINT = 3
MP_IRQ_CONFORMING = 0  # polarity and trigger "conform to the bus" (ISA: active high, edge)
MP_ALL_LAPICS = 0xFF
ISA_BUS_ID = 0
ISA_IRQS = 16

OEM_ID = b"PYVMM   "
PRODUCT_ID = b"PYVMM MPTAB "


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def build_mptable(base: int, cpus: int, ioapic_id: int, ioapic_addr: int, lapic_addr: int) -> bytes:
    """The floating pointer at `base`, the configuration table right after it.

    ISA IRQ n goes to IOAPIC pin n (KVM's default GSI routing, as the MADT says), and the
    local interrupts are the usual ones: ExtINT on LINT0, NMI on LINT1.
    """
    if not 1 <= cpus <= 254:
        raise ValueError(f"an MP table holds 1 to 254 CPUs, not {cpus}")
    entries = bytearray()
    for cpu in range(cpus):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0)
        entries += struct.pack("<BBBBII8x", MP_PROCESSOR, cpu, LAPIC_VERSION, flags, CPU_SIGNATURE, CPU_FEATURES)
    entries += struct.pack("<BB6s", MP_BUS, ISA_BUS_ID, b"ISA   ")
    entries += struct.pack("<BBBBI", MP_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED, ioapic_addr)
    for irq in range(ISA_IRQS):
        entries += struct.pack("<BBHBBBB", MP_INTSRC, MP_INT, MP_IRQ_CONFORMING, ISA_BUS_ID, irq, ioapic_id, irq)
    entries += struct.pack("<BBHBBBB", MP_LINTSRC, MP_EXTINT, MP_IRQ_CONFORMING, ISA_BUS_ID, 0, MP_ALL_LAPICS, 0)
    entries += struct.pack("<BBHBBBB", MP_LINTSRC, MP_NMI, MP_IRQ_CONFORMING, ISA_BUS_ID, 0, MP_ALL_LAPICS, 1)
    count = cpus + 2 + ISA_IRQS + 2
    header = bytearray(struct.pack("<4sHBB8s12sIHHIHBB", MPC_SIGNATURE, MPC_HEADER_LEN + len(entries), MP_SPEC_REV,
                                   0, OEM_ID, PRODUCT_ID, 0, 0, count, lapic_addr, 0, 0, 0))
    header[7] = _checksum(header + entries)
    mpf = bytearray(struct.pack("<4sIBBB5x", MPF_SIGNATURE, base + MPF_LEN, MPF_LENGTH_PARAGRAPHS, MP_SPEC_REV, 0))
    mpf[10] = _checksum(mpf)
    return bytes(mpf + header + entries)
