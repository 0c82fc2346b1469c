"""The MP table parsed back as Linux's arch/x86/kernel/mpparse.c reads it: floating pointer,
checksums, and the entries (CPUs, bus, IOAPIC, ISA interrupt routes, local interrupts)."""

from __future__ import annotations

import struct

import pytest

from firmware.mptable import build_mptable

BASE = 0x9FC00


def parse(blob: bytes) -> tuple[dict, list[tuple]]:
    sig, physptr, length, spec, _csum, feature1 = struct.unpack_from("<4sIBBBB", blob)
    assert sig == b"_MP_" and length == 1 and spec == 4 and feature1 == 0
    assert sum(blob[:16]) % 256 == 0
    table = blob[physptr - BASE:]
    sig, size, spec, _csum, oem, product, _, _, count, lapic = struct.unpack_from("<4sHBB8s12sIHHI", table)
    assert sig == b"PCMP" and spec == 4 and sum(table[:size]) % 256 == 0 and physptr - BASE + size == len(blob)
    entries, off = [], 44
    for _ in range(count):
        kind = table[off]
        if kind == 0:
            _, apic, ver, flags, _, _ = struct.unpack_from("<BBBBII", table, off)
            entries.append(("cpu", apic, flags))
            off += 20
        else:
            entries.append((kind, table[off + 1:off + 8]))
            off += 8
    assert off == size
    return {"lapic": lapic, "oem": oem}, entries


@pytest.mark.parametrize("cpus", [1, 2, 8])
def test_mptable_lists_every_cpu_the_ioapic_and_the_isa_routes(cpus: int) -> None:
    header, entries = parse(build_mptable(BASE, cpus, ioapic_id=0, ioapic_addr=0xFEC00000, lapic_addr=0xFEE00000))
    assert header["lapic"] == 0xFEE00000
    cpu_entries = [e for e in entries if e[0] == "cpu"]
    assert cpu_entries == [("cpu", 0, 3)] + [("cpu", i, 1) for i in range(1, cpus)]  # enabled, cpu 0 boots
    [bus] = [e for e in entries if e[0] == 1]
    assert bus[1][1:] == b"ISA   "
    [ioapic] = [e for e in entries if e[0] == 2]
    assert struct.unpack("<BBBI", ioapic[1]) == (0, 0x11, 1, 0xFEC00000)
    routes = [struct.unpack("<BHBBBB", e[1]) for e in entries if e[0] == 3]
    assert [(r[3], r[5]) for r in routes] == [(irq, irq) for irq in range(16)]  # ISA IRQ n -> pin n
    lints = [struct.unpack("<BHBBBB", e[1]) for e in entries if e[0] == 4]
    assert [(r[0], r[5]) for r in lints] == [(3, 0), (1, 1)]  # ExtINT on LINT0, NMI on LINT1


def test_mptable_fits_the_ebda_kilobyte_at_the_most_cpus() -> None:
    assert len(build_mptable(BASE, 8, 0, 0xFEC00000, 0xFEE00000)) <= 1024
    with pytest.raises(ValueError):
        build_mptable(BASE, 0, 0, 0xFEC00000, 0xFEE00000)
