"""Static kernel probe: is what a kit needs built into this kernel, before anything boots?

The evidence, strongest first:
1. symbols: the ELF vmlinux's own symbol table (pyelftools), else a System.map next to the
   kernel file. A driver that is built in has its driver object and probe function there.
2. the embedded config (CONFIG_IKCONFIG: a gzip'd .config between "IKCFG_ST" and "IKCFG_ED"),
   which also tells a module (=m) from a missing option.
3. strings, for absence only: a built-in driver always carries its name (KBUILD_MODNAME) in
   the image, so an image without the string "virtio_mem" cannot contain the driver. Finding
   the string proves nothing, so that case stays "unknown" and the runtime check decides.

A bzImage is unpacked first when its payload is gzip, xz, lzma or bzip2 (all in the stdlib).
Its payload is a stripped ELF, so the symbols come from a System.map or nowhere.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

ELF_MAGIC = b"\x7fELF"
SYSTEM_MAP = "System.map"

# bzImage setup header (Documentation/arch/x86/boot.rst).
SETUP_SECTS_OFFSET = 0x1F1
SETUP_HEADER_MAGIC_OFFSET = 0x202
SETUP_HEADER_MAGIC = b"HdrS"
PAYLOAD_OFFSET_FIELD = 0x248  # u32, from the start of the protected-mode code
PAYLOAD_LENGTH_FIELD = 0x24C
DEFAULT_SETUP_SECTS = 4
SECTOR = 512

# Compressed-payload signatures (the first bytes of each format).
GZIP_MAGIC = b"\x1f\x8b"
XZ_MAGIC = b"\xfd7zXZ\x00"
LZMA_MAGIC = b"\x5d\x00\x00"
BZIP2_MAGIC = b"BZh"
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

IKCONFIG_START = b"IKCFG_ST"
IKCONFIG_END = b"IKCFG_ED"

PRESENT, MODULE, MISSING, UNKNOWN = "present", "module", "missing", "unknown"


@dataclass(frozen=True)
class Requirement:
    """A kernel option a kit needs, and how to recognise it in a built kernel.

    `symbols`: any one of them in the symbol table means the code is built in (chosen from
    the guest kernel's own source: driver objects and exported functions, which the
    compiler cannot inline away). `strings`: if none occurs anywhere in the image, the code
    is certainly not built in.
    """
    option: str
    what: str
    symbols: tuple[str, ...]
    strings: tuple[bytes, ...]


@dataclass(frozen=True)
class Finding:
    requirement: Requirement
    state: str      # PRESENT, MODULE, MISSING or UNKNOWN
    evidence: str

    def message(self) -> str:
        req = self.requirement
        if self.state == MISSING:
            return f"{req.option} is not enabled in this kernel ({req.what}): {self.evidence}"
        if self.state == MODULE:
            return (f"{req.option}=m: {req.what} is a module, and the check's initramfs loads no "
                    f"modules; build it in (=y), or pass --no-probe with an initrd that loads it")
        return f"{req.option}: {self.state} ({self.evidence})"


@dataclass
class ProbeReport:
    kernel: Path
    kind: str                      # "vmlinux", "bzImage" or "unknown"
    sources: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.state in (MISSING, MODULE)]

    @property
    def unknown(self) -> list[Finding]:
        return [f for f in self.findings if f.state == UNKNOWN]

    def failure_text(self) -> str:
        """A headline naming every missing option, then one line of evidence per option."""
        head = "the kernel lacks " + ", ".join(
            f.requirement.option + ("=y (it is =m)" if f.state == MODULE else "") for f in self.failures)
        return "\n".join([head] + [f.message() for f in self.failures])

    def summary(self) -> str:
        """One line for the progress output."""
        if self.failures:
            return self.failure_text().splitlines()[0]
        names = ", ".join(f.requirement.option for f in self.findings if f.state == PRESENT)
        unknown = ", ".join(f.requirement.option for f in self.unknown)
        used = " + ".join(self.sources) or "nothing readable"
        parts = []
        if names:
            parts.append(f"built in: {names}")
        if unknown:
            parts.append(f"undecided statically, left to the runtime check: {unknown}")
        text = "; ".join(parts) + f" [from {used}]"
        if self.notes:
            text += "; " + "; ".join(self.notes)
        return text


# ---------------------------------------------------------------- the options the kits need
VIRTIO_MMIO = Requirement(
    "CONFIG_VIRTIO_MMIO", "the virtio-mmio transport pyvmm's virtio devices sit on",
    ("virtio_mmio_driver", "virtio_mmio_probe"), (b"virtio-mmio",))
VIRTIO_MEM = Requirement(
    "CONFIG_VIRTIO_MEM", "the virtio-mem driver",
    ("virtio_mem_driver", "virtio_mem_probe", "virtio_mem_id_table"), (b"virtio_mem",))
MEMORY_HOTPLUG = Requirement(
    "CONFIG_MEMORY_HOTPLUG", "memory hotplug",
    ("add_memory_driver_managed", "add_memory_resource", "online_pages"),
    (b"auto_online_blocks", b"memhp_default_state="))
MEMORY_HOTREMOVE = Requirement(
    "CONFIG_MEMORY_HOTREMOVE", "memory hot-remove (unplug)",
    ("offline_and_remove_memory", "offline_pages", "__remove_memory"),
    (b"removing memory fails, because memory",))
HYPERV = Requirement(
    "CONFIG_HYPERV", "Hyper-V guest support with the VMBus driver, hv_vmbus",
    ("__vmbus_driver_register", "vmbus_device_register", "hv_acpi_init"), (b"hv_vmbus",))
HYPERV_BALLOON = Requirement(
    "CONFIG_HYPERV_BALLOON", "the Hyper-V Dynamic Memory driver, hv_balloon",
    ("balloon_onchannelcallback", "init_balloon_drv", "hot_add_req", "dm_thread_func"),
    (b"hv_balloon",))


# ---------------------------------------------------------------- reading the kernel file
class ProbeError(Exception):
    """The file cannot be read at all (one line)."""


def _symbol_base(name: str) -> str:
    # GCC clones keep the source name before the first dot: foo.isra.0, foo.constprop.1, foo.cold
    return name.split(".", 1)[0]


def elf_symbols(data: bytes) -> set[str] | None:
    """Names in the ELF's .symtab, or None when it has none (stripped, or not an ELF)."""
    try:
        elf = ELFFile(io.BytesIO(data))
        symtab = elf.get_section_by_name(".symtab")
        if symtab is None or symtab["sh_type"] != "SHT_SYMTAB":
            return None
        # The linked string table holds exactly the symbol names: reading it whole is far
        # faster than walking tens of thousands of symbol entries in Python.
        strtab = elf.get_section(symtab["sh_link"]).data()
    except (ELFError, ValueError, struct.error, IndexError):
        return None
    names = {_symbol_base(n.decode(errors="replace")) for n in strtab.split(b"\0") if n}
    return names or None


def system_map_symbols(path: Path) -> set[str] | None:
    """Names in a System.map ("address type name" lines), or None if unreadable or empty."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    names = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            names.add(_symbol_base(fields[2]))
    return names or None


def embedded_config(image: bytes) -> dict[str, str] | None:
    """The .config embedded with CONFIG_IKCONFIG, as {option: value}, or None."""
    start = image.find(IKCONFIG_START)
    if start < 0:
        return None
    end = image.find(IKCONFIG_END, start)
    if end < 0:
        return None
    try:
        text = gzip.decompress(image[start + len(IKCONFIG_START):end]).decode(errors="replace")
    except (OSError, EOFError, zlib.error):
        return None
    return parse_config(text)


def parse_config(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith("CONFIG_"):
            out[key] = value
    return out


def _decompress(payload: bytes) -> tuple[bytes | None, str]:
    """Unpack a bzImage payload; (None, why) when the stdlib cannot."""
    try:
        if payload.startswith(GZIP_MAGIC):
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload), "gzip"
        if payload.startswith(XZ_MAGIC):
            return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(payload), "xz"
        if payload.startswith(LZMA_MAGIC):
            return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(payload), "lzma"
        if payload.startswith(BZIP2_MAGIC):
            return bz2.BZ2Decompressor().decompress(payload), "bzip2"
    except (lzma.LZMAError, zlib.error, OSError, EOFError) as e:
        return None, f"its payload does not unpack ({e})"
    if payload.startswith(ZSTD_MAGIC):
        return None, "its payload is zstd-compressed, which Python's standard library cannot unpack"
    if payload.startswith(LZ4_LEGACY_MAGIC):
        return None, "its payload is lz4-compressed, which Python's standard library cannot unpack"
    return None, "its payload is in an unrecognised compression format"


def bzimage_payload(data: bytes) -> tuple[bytes | None, str]:
    """The decompressed kernel inside a bzImage, and how it was packed (or why not)."""
    if len(data) < PAYLOAD_LENGTH_FIELD + 4:
        return None, "the file is too short for a bzImage"
    setup_sects = data[SETUP_SECTS_OFFSET] or DEFAULT_SETUP_SECTS
    pm_start = (setup_sects + 1) * SECTOR
    offset, length = struct.unpack_from("<II", data, PAYLOAD_OFFSET_FIELD)
    payload = data[pm_start + offset:pm_start + offset + length]
    if not length or len(payload) != length:
        return None, "its boot header names no compressed payload (boot protocol before 2.08?)"
    return _decompress(payload)


def is_bzimage(data: bytes) -> bool:
    return data[SETUP_HEADER_MAGIC_OFFSET:SETUP_HEADER_MAGIC_OFFSET + 4] == SETUP_HEADER_MAGIC


# ---------------------------------------------------------------- deciding
def _from_symbols(req: Requirement, names: set[str], source: str) -> Finding:
    for sym in req.symbols:
        if sym in names:
            return Finding(req, PRESENT, f"symbol {sym} in {source}")
    return Finding(req, MISSING, f"none of the symbols {', '.join(req.symbols)} is in {source}")


def _from_config(req: Requirement, config: dict[str, str]) -> Finding:
    value = config.get(req.option)
    if value == "y":
        return Finding(req, PRESENT, f"{req.option}=y in the embedded config")
    if value == "m":
        return Finding(req, MODULE, f"{req.option}=m in the embedded config")
    return Finding(req, MISSING, f"the embedded config does not set {req.option}")


def _from_strings(req: Requirement, image: bytes, what: str) -> Finding:
    if any(s in image for s in req.strings):
        return Finding(req, UNKNOWN, f"{what} has no symbol table; its strings do not rule it out")
    names = " or ".join(repr(s.decode()) for s in req.strings)
    return Finding(req, MISSING, f"{what} has no symbol table and no string {names}, "
                                 "which the built-in code always carries")


def probe_kernel(path: Path, requirements: list[Requirement], system_map: Path | None = None) -> ProbeReport:
    """Check `requirements` against the kernel file at `path` without booting it."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ProbeError(f"cannot read kernel {path}: {e.strerror or e}") from None
    report = ProbeReport(path, "unknown")
    image: bytes | None = None
    names: set[str] | None = None
    names_source = ""
    if data.startswith(ELF_MAGIC):
        report.kind, image = "vmlinux", data
        names = elf_symbols(data)
        if names is not None:
            names_source = f"{path.name}'s symbol table"
            report.sources.append(names_source)
    elif is_bzimage(data):
        report.kind = "bzImage"
        image, how = bzimage_payload(data)
        if image is None:
            report.notes.append(f"static check of the bzImage skipped: {how}")
        else:
            report.sources.append(f"bzImage ({how} payload)")
    else:
        report.notes.append("not an ELF vmlinux or a bzImage: static check skipped")
    map_path = system_map if system_map is not None else path.parent / SYSTEM_MAP
    if names is None and map_path.is_file():
        names = system_map_symbols(map_path)
        if names is not None:
            names_source = str(map_path)
            report.sources.append(names_source)
    config = embedded_config(image) if image is not None else None
    if config is not None:
        report.sources.append("embedded config (IKCONFIG)")
    elif names is None and image is not None:
        report.sources.append(f"the {report.kind} image's strings")
    for req in requirements:
        if config is not None:
            finding = _from_config(req, config)
        elif names is not None:
            finding = _from_symbols(req, names, names_source)
        elif image is not None:
            finding = _from_strings(req, image, f"the {report.kind} image")
        else:
            finding = Finding(req, UNKNOWN, "nothing readable to check")
        report.findings.append(finding)
    return report
