"""Tests for firmware.acpi: the tables are parsed back with a small parser
written here from the ACPI 6.3 layouts, and the DSDT (and the data tables)
are run through iasl when it is installed."""

import shutil
import struct
import subprocess

import pytest
from hypothesis import given, settings, strategies as st

from firmware import acpi
from firmware.acpi import AcpiConfig, AcpiDevice, AcpiError, InterruptOverride, MemoryAffinity, build_acpi

BASE = 0xE0000
IASL = shutil.which("iasl")
needs_iasl = pytest.mark.skipif(
    IASL is None, reason="iasl not on PATH (install acpica-tools for the AML round trip)")


# --- A small independent parser --------------------------------------------

def at(image, addr, length):
    off = addr - BASE
    assert 0 <= off and off + length <= len(image.blob), f"{addr:#x}+{length} outside blob"
    return image.blob[off:off + length]


def header(table):
    sig, length, rev, csum, oem, oem_tab, oem_rev, creator, creator_rev = struct.unpack_from(
        "<4sIBB6s8sI4sI", table)
    return dict(sig=sig, length=length, rev=rev, oem=oem, oem_table=oem_tab,
                oem_rev=oem_rev, creator=creator, creator_rev=creator_rev)


def table_at(image, addr):
    length = struct.unpack("<I", at(image, addr + 4, 4))[0]
    return at(image, addr, length)


def parse(image):
    """Follow RSDP -> XSDT -> FADT -> DSDT; returns {signature: table bytes}."""
    rsdp = at(image, image.rsdp_addr, 36)
    sig, csum, oem, rev, rsdt, length, xsdt_addr, ext = struct.unpack("<8sB6sBIIQB3x", rsdp)
    assert sig == b"RSD PTR "
    assert rev == 2 and length == 36 and rsdt == 0
    assert sum(rsdp[:20]) % 256 == 0, "RSDP v1 checksum"
    assert sum(rsdp) % 256 == 0, "RSDP extended checksum"
    tables = {"RSDP": rsdp}
    xsdt = table_at(image, xsdt_addr)
    tables["XSDT"] = xsdt
    entries = struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
    for addr in entries:
        assert addr % 16 == 0
        t = table_at(image, addr)
        tables[t[:4].decode()] = t
    fadt = tables["FACP"]
    x_dsdt = struct.unpack_from("<Q", fadt, 140)[0]
    assert struct.unpack_from("<I", fadt, 40)[0] == x_dsdt
    assert x_dsdt % 16 == 0
    tables["DSDT"] = table_at(image, x_dsdt)
    tables["_xsdt_entries"] = entries
    return tables


def gas(table, offset):
    return struct.unpack_from("<BBBBQ", table, offset)


def madt_entries(madt):
    out, off = [], 44
    while off < len(madt):
        etype, elen = madt[off], madt[off + 1]
        assert elen >= 2 and off + elen <= len(madt)
        out.append((etype, madt[off:off + elen]))
        off += elen
    assert off == len(madt)
    return out


def pkg_length(data, off):
    lead = data[off]
    n = lead >> 6
    if n == 0:
        return lead & 0x3F, 1
    value = lead & 0x0F
    for i in range(n):
        value |= data[off + 1 + i] << (4 + 8 * i)
    return value, n + 1


def dsdt_device_names(dsdt):
    """Walk Scope(\\_SB_) { Device(...) ... } and return the device names in order,
    checking that every PkgLength exactly covers its object."""
    body = dsdt[36:]
    assert body[0] == 0x10  # ScopeOp
    scope_len, used = pkg_length(body, 1)
    scope_end = 1 + scope_len
    off = 1 + used
    assert body[off:off + 5] == b"\\_SB_"
    off += 5
    names = []
    while off < scope_end:
        assert body[off:off + 2] == b"\x5b\x82"  # DeviceOp
        dev_len, used = pkg_length(body, off + 2)
        names.append(body[off + 2 + used:off + 2 + used + 4].decode())
        off += 2 + dev_len
    assert off == scope_end
    # After the scope: Name(_S5_, Package(){5, 0, 0, 0})
    assert body[scope_end:] == bytes.fromhex("08 5f 53 35 5f 12 07 04 0a 05 00 00 00")
    return names


def sample_config(**kw):
    devices = [
        AcpiDevice("VR00", "LNRO0005", 0, [(0xD0000000, 0x1000)], [5], cca=True),
        AcpiDevice("VR01", "LNRO0005", 1, [(0xD0001000, 0x1000)], [6], cca=True),
        AcpiDevice("MEM0", "LNRO0005", 2, [(0x5_0000_0000, 0x20_0000)], [7]),
        AcpiDevice("COM1", "PNP0501", 0, io=[(0x3F8, 8)], irqs=[4], sta_method=False),
    ]
    kw.setdefault("devices", devices)
    kw.setdefault("cpus", 2)
    return AcpiConfig(**kw)


# --- Layout, headers, checksums -------------------------------------------

def test_every_table_checksums_to_zero_and_headers():
    image = build_acpi(sample_config(), BASE)
    assert image.rsdp_addr == BASE and image.blob[:8] == b"RSD PTR "
    tables = parse(image)
    expected_rev = {"XSDT": 1, "FACP": 6, "APIC": 5, "DSDT": 2}
    for sig, rev in expected_rev.items():
        t = tables[sig]
        h = header(t)
        assert h["sig"] == sig.encode()
        assert h["length"] == len(t)
        assert h["rev"] == rev
        assert sum(t) % 256 == 0, f"{sig} checksum"
        assert h["oem"] == b"PYVMM " and h["oem_table"] == b"PYVMMACP"
        assert h["creator"] == b"PYVM"
    assert tables["RSDP"][9:15] == b"PYVMM "


def test_xsdt_points_at_fadt_and_madt_and_layout_is_aligned():
    image = build_acpi(sample_config(), BASE)
    tables = parse(image)
    sigs = [at(image, a, 4) for a in tables["_xsdt_entries"]]
    assert sigs == [b"FACP", b"APIC"]
    for sig, addr in image.tables.items():
        assert addr % 16 == 0
        assert at(image, addr, 4) == (b"RSD " if sig == "RSDP" else sig.encode())
    # contiguous: the last table (DSDT) ends the blob
    assert image.tables["DSDT"] - BASE + len(tables["DSDT"]) == len(image.blob)


def test_custom_oem_fields_are_padded():
    image = build_acpi(sample_config(oem_id="ABC", oem_table_id="XY"), BASE)
    tables = parse(image)
    assert header(tables["APIC"])["oem"] == b"ABC   "
    assert header(tables["APIC"])["oem_table"] == b"XY      "


# --- FADT -----------------------------------------------------------------

def test_fadt_fields_at_spec_offsets():
    image = build_acpi(sample_config(), BASE)
    fadt = parse(image)["FACP"]
    assert len(fadt) == 276
    assert fadt[131] == 3  # FADT minor version: ACPI 6.3
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & (1 << 20), "HW_REDUCED_ACPI"
    assert flags & (1 << 10), "RESET_REG_SUP"
    boot_arch = struct.unpack_from("<H", fadt, 109)[0]
    assert boot_arch & (1 << 2), "VGA not present"
    assert not boot_arch & (1 << 3), "MSI must not be disabled"
    assert not boot_arch & (1 << 1), "no 8042 by default"
    assert boot_arch & (1 << 5), "no CMOS RTC by default"
    assert gas(fadt, 116) == (1, 8, 0, 1, 0x602)  # RESET_REG: SystemIO, 8 bit, byte access
    assert fadt[128] == 0x01  # RESET_VALUE
    assert gas(fadt, 244) == (1, 8, 0, 1, 0x600)  # SLEEP_CONTROL_REG
    assert gas(fadt, 256) == (1, 8, 0, 1, 0x601)  # SLEEP_STATUS_REG
    assert fadt[268:276] == b"PYVMM   "  # hypervisor vendor identity
    # No FACS, no SCI, no PM1/PM2/PM timer/GPE blocks (legacy or X_ forms).
    assert struct.unpack_from("<I", fadt, 36)[0] == 0
    assert struct.unpack_from("<H", fadt, 46)[0] == 0
    assert fadt[56:88] == bytes(32)
    assert fadt[132:140] == bytes(8)
    assert fadt[148:244] == bytes(96)


def test_fadt_follows_config():
    cfg = sample_config(sleep_control_port=0x700, sleep_status_port=0x701, reset_port=0xCF9,
                        reset_value=0x06, i8042=True, cmos_rtc=True)
    fadt = parse(build_acpi(cfg, BASE))["FACP"]
    assert gas(fadt, 244)[4] == 0x700 and gas(fadt, 256)[4] == 0x701
    assert gas(fadt, 116)[4] == 0xCF9 and fadt[128] == 0x06
    boot_arch = struct.unpack_from("<H", fadt, 109)[0]
    assert boot_arch & (1 << 1) and not boot_arch & (1 << 5)


def test_dsdt_above_4g_uses_only_x_dsdt():
    base = 0x1_0000_0000
    image = build_acpi(sample_config(), base)
    fadt = image.blob[image.tables["FACP"] - base:][:276]
    assert struct.unpack_from("<I", fadt, 40)[0] == 0
    assert struct.unpack_from("<Q", fadt, 140)[0] == image.tables["DSDT"]


# --- MADT -----------------------------------------------------------------

def test_madt_entries():
    image = build_acpi(sample_config(cpus=3, ioapic_id=2, ioapic_addr=0xFEC01000,
                                     ioapic_gsi_base=0), BASE)
    madt = parse(image)["APIC"]
    lapic_addr, flags = struct.unpack_from("<II", madt, 36)
    assert lapic_addr == 0xFEE00000
    assert flags & 1, "PCAT_COMPAT"
    entries = madt_entries(madt)
    lapics = [struct.unpack("<BBBBI", e) for t, e in entries if t == 0]
    assert [(uid, apic, fl) for _, _, uid, apic, fl in lapics] == [(0, 0, 1), (1, 1, 1), (2, 2, 1)]
    ioapics = [struct.unpack("<BBBBII", e) for t, e in entries if t == 1]
    assert ioapics == [(1, 12, 2, 0, 0xFEC01000, 0)]
    assert not [e for t, e in entries if t == 2], "no overrides under KVM's default routing"
    nmis = [struct.unpack("<BBBHB", e) for t, e in entries if t == 4]
    assert nmis == [(4, 6, 0xFF, 0, 1)]  # all processors, LINT1
    assert not [e for t, e in entries if t in (9, 10)]


def test_madt_interrupt_source_override():
    cfg = sample_config(isa_overrides=[acpi.PIT_IRQ0_TO_GSI2,
                                       InterruptOverride(9, 9, edge=False, active_low=True)])
    madt = parse(build_acpi(cfg, BASE))["APIC"]
    isos = [struct.unpack("<BBBBIH", e) for t, e in madt_entries(madt) if t == 2]
    # IRQ0 -> GSI2 edge/active-high (0b0101); IRQ9 level/active-low (0b1111)
    assert isos == [(2, 10, 0, 0, 2, 0x5), (2, 10, 0, 9, 9, 0xF)]


def test_madt_x2apic_above_254():
    madt = parse(build_acpi(sample_config(cpus=300), BASE))["APIC"]
    entries = madt_entries(madt)
    xapic_ids = [e[3] for t, e in entries if t == 0]
    x2 = [struct.unpack("<BBHIII", e) for t, e in entries if t == 9]
    assert xapic_ids == list(range(255))
    assert [(x[3], x[4], x[5]) for x in x2] == [(i, 1, i) for i in range(255, 300)]
    x2nmi = [struct.unpack("<BBHIB3x", e) for t, e in entries if t == 10]
    assert x2nmi == [(10, 12, 0, 0xFFFFFFFF, 1)]


# --- DSDT -----------------------------------------------------------------

def test_dsdt_structure():
    image = build_acpi(sample_config(), BASE)
    dsdt = parse(image)["DSDT"]
    assert dsdt_device_names(dsdt) == ["VR00", "VR01", "MEM0", "COM1"]
    body = dsdt[36:]
    assert b"\x08_HID\x0dLNRO0005\x00" in body
    assert b"\x08_HID\x0c" + struct.pack("<I", 0x0105D041) in body  # EISAID("PNP0501")
    assert b"\x08_CCA\x01" in body
    assert b"\x08_STA\x0a\x0f" in body  # COM1: Name form
    assert b"\x14\x09_STA\x00\xa4\x0a\x0f" in body  # others: Method form


def test_device_without_resources_or_sta():
    cfg = sample_config(devices=[AcpiDevice("VMBS", "VMBus", sta=None)])
    dsdt = parse(build_acpi(cfg, BASE))["DSDT"]
    assert dsdt_device_names(dsdt) == ["VMBS"]
    assert b"_CRS" not in dsdt and b"_STA" not in dsdt


# --- Validation -----------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"cpus": 0},
    {"cpus": acpi.MAX_CPUS + 1},
    {"oem_id": "TOOLONGID"},
    {"oem_table_id": "caf\u00e9"},
    {"ioapic_id": 256},
    {"reset_value": 0x100},
    {"sleep_control_port": 0x10000},
    {"devices": [AcpiDevice("VR00", "LNRO0005"), AcpiDevice("VR00", "LNRO0005")]},
    {"devices": [AcpiDevice("vr00", "LNRO0005")]},
    {"devices": [AcpiDevice("VR00", "")]},
    {"devices": [AcpiDevice("VR00", "LNRO0005", irqs=[24])]},  # beyond the 24 IOAPIC pins
    {"devices": [AcpiDevice("VR00", "LNRO0005", mmio=[(0xD0000000, 0)])]},
    {"devices": [AcpiDevice("VR00", "LNRO0005", mmio=[0xD0000000])]},
    {"devices": [AcpiDevice("VR00", "LNRO0005", io=[(0xFFFF, 8)])]},
    {"devices": [AcpiDevice("VR00", "LNRO0005", uid=-1)]},
    {"devices": [AcpiDevice("VR00", "LNRO0005", irqs=None)]},
    {"devices": None},
    {"isa_overrides": [InterruptOverride(16, 2)]},
    {"isa_overrides": [InterruptOverride(0, 2), InterruptOverride(0, 3)]},
])
def test_bad_config_is_a_clear_error(kwargs):
    with pytest.raises(AcpiError):
        build_acpi(sample_config(**kwargs), BASE)


def test_base_must_be_aligned():
    with pytest.raises(AcpiError):
        build_acpi(sample_config(), BASE + 8)


# --- Property: random device lists ----------------------------------------

_names = st.from_regex(r"\A[A-Z_][A-Z0-9_]{3}\Z")
_hids = st.one_of(st.sampled_from(["LNRO0005", "VMBus", "PNP0501", "PNP0A06", "ACPI0004"]),
                  st.from_regex(r"\A[A-Z]{3}[0-9A-F]{4}\Z"))
_windows = st.tuples(st.integers(0, (1 << 48) // 4096).map(lambda p: p * 4096),
                     st.integers(1, 1 << 30))
_devices = st.builds(
    AcpiDevice, name=_names, hid=_hids, uid=st.integers(0, 1 << 40),
    mmio=st.lists(_windows, max_size=3), irqs=st.lists(st.integers(0, 23), max_size=3),
    io=st.lists(st.tuples(st.integers(0, 0xFF00), st.integers(1, 0xFF)), max_size=2),
    sta=st.one_of(st.none(), st.integers(0, 0xFF)), cca=st.booleans(),
    irq_edge=st.booleans(), sta_method=st.booleans())


@settings(max_examples=60, deadline=None)
@given(st.lists(_devices, max_size=12, unique_by=lambda d: d.name), st.integers(1, 300))
def test_random_devices_build_valid_tables(devices, cpus):
    image = build_acpi(AcpiConfig(cpus=cpus, devices=devices), BASE)
    tables = parse(image)
    for sig in ("XSDT", "FACP", "APIC", "DSDT"):
        assert sum(tables[sig]) % 256 == 0
    assert dsdt_device_names(tables["DSDT"]) == [d.name for d in devices]
    cpu_entries = [e for t, e in madt_entries(tables["APIC"]) if t in (0, 9)]
    assert len(cpu_entries) == cpus


# --- iasl round trip ------------------------------------------------------

def _run_iasl(args, cwd):
    proc = subprocess.run([IASL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr


def _disassemble(tmp_path, name, table):
    (tmp_path / f"{name}.dat").write_bytes(table)
    rc, out = _run_iasl(["-d", f"{name}.dat"], tmp_path)
    assert rc == 0, out
    for bad in ("Error", "Warning", "Incorrect checksum"):
        assert bad not in out, out
    dsl = (tmp_path / f"{name}.dsl").read_text()
    assert "Incorrect checksum" not in dsl
    return dsl


@needs_iasl
def test_iasl_disassembles_dsdt(tmp_path):
    cfg = sample_config()
    cfg.devices = list(cfg.devices) + [AcpiDevice("VMBS", "VMBus", sta=None, empty_crs=True)]
    dsdt = parse(build_acpi(cfg, BASE))["DSDT"]
    dsl = _disassemble(tmp_path, "dsdt", dsdt)
    for name in ("VR00", "VR01", "MEM0", "COM1", "VMBS"):
        assert f"Device ({name})" in dsl
    assert dsl.count('Name (_HID, "LNRO0005")') == 3
    assert 'Name (_HID, "VMBus")' in dsl
    # The VMBus device's _CRS is an empty resource template, only an End Tag with its
    # checksum (Linux fails without a _CRS); iasl shows that as a two-byte buffer.
    vmbs = dsl[dsl.index("Device (VMBS)"):dsl.index("Device (VMBS)") + 400]
    assert "Name (_CRS, Buffer (0x02)" in vmbs and "0x79, 0x87" in vmbs
    assert 'EisaId ("PNP0501")' in dsl
    assert "0xD0000000,         // Address Base" in dsl
    assert "0xD0001000,         // Address Base" in dsl
    assert "QWordMemory (ResourceConsumer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite" in dsl
    assert "0x0000000500000000, // Range Minimum" in dsl
    assert "0x00000005001FFFFF, // Range Maximum" in dsl
    assert dsl.count("Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )") == 4
    for gsi in (4, 5, 6, 7):
        assert f"0x{gsi:08X}," in dsl
    assert "IO (Decode16,\n                    0x03F8," in dsl
    assert "Name (_CCA, One)" in dsl
    assert "Name (_S5, Package (0x04)" in dsl


@needs_iasl
def test_iasl_recompiles_dsdt_to_the_same_bytes(tmp_path):
    """Disassemble, compile the ASL back without optimisations and compare:
    only the header checksum/compiler fields and the End Tag checksums (iasl
    writes 0 there, we write the real sum) may differ."""
    ours = parse(build_acpi(sample_config(), BASE))["DSDT"]
    _disassemble(tmp_path, "dsdt", ours)
    rc, out = _run_iasl(["-oa", "-p", "again", "dsdt.dsl"], tmp_path)
    assert rc == 0 and "0 Errors, 0 Warnings" in out, out
    theirs = (tmp_path / "again.aml").read_bytes()
    assert len(theirs) == len(ours)
    assert theirs[:9] == ours[:9] and theirs[10:28] == ours[10:28]
    diffs = [i for i in range(36, len(ours)) if ours[i] != theirs[i]]
    assert len(diffs) == 4  # one End Tag per _CRS
    for i in diffs:
        assert theirs[i - 1] == ours[i - 1] == 0x79 and theirs[i] == 0


@needs_iasl
def test_iasl_decodes_fadt_madt_xsdt(tmp_path):
    cfg = sample_config(cpus=2, isa_overrides=[acpi.PIT_IRQ0_TO_GSI2])
    image = build_acpi(cfg, BASE)
    tables = parse(image)
    fadt = _disassemble(tmp_path, "facp", tables["FACP"])
    assert "Hardware Reduced (V5) : 1" in fadt
    assert "Reset Register Supported (V2) : 1" in fadt
    assert "FADT Minor Revision : 03" in fadt
    assert "Address : 0000000000000600" in fadt and "Address : 0000000000000601" in fadt
    assert "Address : 0000000000000602" in fadt
    assert f"DSDT Address : {image.tables['DSDT']:016X}" in fadt
    madt = _disassemble(tmp_path, "apic", tables["APIC"])
    assert madt.count("[Processor Local APIC]") == 2
    assert "[I/O APIC]" in madt and "Address : FEC00000" in madt
    assert "[Interrupt Source Override]" in madt and "Interrupt : 00000002" in madt
    xsdt = _disassemble(tmp_path, "xsdt", tables["XSDT"])
    assert xsdt.count("ACPI Table Address") == 2
    for name in ("facp", "apic", "xsdt"):  # iasl's data-table compiler accepts them back
        rc, out = _run_iasl(["-p", f"{name}2", f"{name}.dsl"], tmp_path)
        assert rc == 0 and "0 Errors, 0 Warnings" in out, out


# --- SRAT (NUMA affinity, for virtio-mem node=) ------------------------------

NUMA = [MemoryAffinity(0, 0x1000_0000, 0), MemoryAffinity(0x1_4000_0000, 0x8000_0000, 1, hotpluggable=True)]


def test_no_srat_without_memory_affinity():
    image = build_acpi(sample_config(), BASE)
    assert "SRAT" not in image.tables and "SRAT" not in parse(image)


def test_srat_lists_cpus_in_domain_0_and_the_memory_ranges():
    image = build_acpi(sample_config(cpus=3, memory_affinity=NUMA), BASE)
    tables = parse(image)
    srat = tables["SRAT"]
    assert [at(image, a, 4) for a in tables["_xsdt_entries"]] == [b"FACP", b"APIC", b"SRAT"]
    assert header(srat)["rev"] == 3 and sum(srat) % 256 == 0 and header(srat)["length"] == len(srat)
    assert struct.unpack_from("<I", srat, 36)[0] == 1  # the compatibility "reserved" field
    off, cpus, mems = 48, [], []
    while off < len(srat):
        kind, length = srat[off], srat[off + 1]
        if kind == 0:
            dom_lo, apic, flags, _eid, dom_hi = struct.unpack_from("<BBIB3s", srat, off + 2)
            cpus.append((apic, dom_lo | int.from_bytes(dom_hi, "little") << 8, flags))
        elif kind == 1:
            dom, _, base, size, _, flags = struct.unpack_from("<IHQQII", srat, off + 2)
            mems.append((base, size, dom, flags))
        off += length
    assert off == len(srat)
    assert cpus == [(0, 0, 1), (1, 0, 1), (2, 0, 1)]
    assert mems == [(0, 0x1000_0000, 0, 1), (0x1_4000_0000, 0x8000_0000, 1, 0b11)]


def test_bad_memory_affinity_is_a_clear_error():
    with pytest.raises(AcpiError, match="memory affinity size"):
        build_acpi(sample_config(memory_affinity=[MemoryAffinity(0, 0, 0)]), BASE)
    with pytest.raises(AcpiError, match="memory affinity node"):
        build_acpi(sample_config(memory_affinity=[MemoryAffinity(0, 4096, -1)]), BASE)


@needs_iasl
def test_iasl_decodes_srat(tmp_path):
    tables = parse(build_acpi(sample_config(cpus=2, memory_affinity=NUMA), BASE))
    srat = _disassemble(tmp_path, "srat", tables["SRAT"])
    assert srat.count("[Processor Local APIC/SAPIC Affinity]") == 2
    assert srat.count("[Memory Affinity]") == 2
    assert "Base Address : 0000000140000000" in srat and "Address Length : 0000000080000000" in srat
    assert "Hot Pluggable : 1" in srat
    rc, out = _run_iasl(["-p", "srat2", "srat.dsl"], tmp_path)
    assert rc == 0 and "0 Errors, 0 Warnings" in out, out
