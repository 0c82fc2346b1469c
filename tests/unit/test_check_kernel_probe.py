"""The static kernel probe of `pyvmm check`: symbols from an ELF's .symtab or a System.map,
the embedded config, strings as proof of absence, and bzImage payloads."""

from __future__ import annotations

import gzip
import lzma
import struct
from pathlib import Path

import pytest

from pyvmm.check import kernel_probe as kp
from tests import stubkernel

VIRTIO_MEM_KIT = [kp.VIRTIO_MMIO, kp.VIRTIO_MEM, kp.MEMORY_HOTPLUG, kp.MEMORY_HOTREMOVE]
ALL_SYMBOLS = ["virtio_mmio_probe", "virtio_mem_driver", "add_memory_driver_managed",
               "offline_and_remove_memory.isra.0", "__vmbus_driver_register", "balloon_onchannelcallback"]

SHT_SYMTAB, SHT_STRTAB = 2, 3
ELF64_SYM_SIZE = 24
ELF64_SHDR_SIZE = 64


def elf_with_symtab(names: list[str], extra: bytes = b"") -> bytes:
    """A small ELF64 with a loadable segment (holding `extra`) and .symtab/.strtab/.shstrtab."""
    base = stubkernel.elf64([(stubkernel.LOAD_ADDR, b"\xf4" + extra, 0x1000)], stubkernel.LOAD_ADDR)
    strtab = b"\0" + b"".join(n.encode() + b"\0" for n in names)
    symtab = bytes(ELF64_SYM_SIZE)  # entry 0 is the null symbol
    offset = 1
    for n in names:
        symtab += struct.pack("<IBBHQQ", offset, 0x12, 0, 1, stubkernel.LOAD_ADDR, 0)
        offset += len(n) + 1
    shstrtab = b"\0.strtab\0.symtab\0.shstrtab\0"
    body = bytearray(base)
    strtab_off = len(body)
    body += strtab
    symtab_off = len(body)
    body += symtab
    shstr_off = len(body)
    body += shstrtab
    while len(body) % 8:
        body += b"\0"
    shoff = len(body)

    def shdr(name, sh_type, off, size, link=0, entsize=0):
        return struct.pack("<IIQQQQIIQQ", name, sh_type, 0, 0, off, size, link, 0, 1, entsize)
    body += bytes(ELF64_SHDR_SIZE)
    body += shdr(1, SHT_STRTAB, strtab_off, len(strtab))                                    # 1 .strtab
    body += shdr(9, SHT_SYMTAB, symtab_off, len(symtab), link=1, entsize=ELF64_SYM_SIZE)   # 2 .symtab
    body += shdr(17, SHT_STRTAB, shstr_off, len(shstrtab))                                 # 3 .shstrtab
    struct.pack_into("<Q", body, 0x28, shoff)          # e_shoff
    struct.pack_into("<HHH", body, 0x3A, ELF64_SHDR_SIZE, 4, 3)  # e_shentsize, e_shnum, e_shstrndx
    return bytes(body)


def bzimage(payload: bytes, setup_sects: int = 4) -> bytes:
    """A bzImage shell: setup sectors with the header fields the probe reads, then the
    payload at payload_offset within the protected-mode part."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[kp.SETUP_SECTS_OFFSET] = setup_sects
    setup[kp.SETUP_HEADER_MAGIC_OFFSET:kp.SETUP_HEADER_MAGIC_OFFSET + 4] = kp.SETUP_HEADER_MAGIC
    payload_offset = 0x100
    struct.pack_into("<II", setup, kp.PAYLOAD_OFFSET_FIELD, payload_offset, len(payload))
    return bytes(setup) + bytes(payload_offset) + payload


def states(report: kp.ProbeReport) -> dict[str, str]:
    return {f.requirement.option: f.state for f in report.findings}


def test_symbols_from_the_elf_symtab(tmp_path: Path) -> None:
    names = [n for n in ALL_SYMBOLS if n != "virtio_mem_driver"]
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(elf_with_symtab(names))
    report = kp.probe_kernel(kernel, VIRTIO_MEM_KIT)
    assert states(report) == {"CONFIG_VIRTIO_MMIO": "present", "CONFIG_VIRTIO_MEM": "missing",
                              "CONFIG_MEMORY_HOTPLUG": "present", "CONFIG_MEMORY_HOTREMOVE": "present"}
    assert report.sources == ["vmlinux's symbol table"]
    text = report.failure_text()
    assert text.splitlines()[0] == "the kernel lacks CONFIG_VIRTIO_MEM"
    assert "virtio_mem_driver" in text


def test_gcc_clone_suffixes_count_as_the_symbol(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(elf_with_symtab(["offline_pages.constprop.0"]))
    report = kp.probe_kernel(kernel, [kp.MEMORY_HOTREMOVE])
    assert states(report) == {"CONFIG_MEMORY_HOTREMOVE": "present"}


def test_system_map_next_to_a_stripped_kernel(tmp_path: Path) -> None:
    kernel = stubkernel.hello_poweroff(tmp_path / "vmlinux")
    (tmp_path / "System.map").write_text(
        "".join(f"ffffffff81000000 T {n}\n" for n in ALL_SYMBOLS if n != "offline_and_remove_memory.isra.0"))
    report = kp.probe_kernel(kernel, VIRTIO_MEM_KIT)
    assert states(report)["CONFIG_MEMORY_HOTREMOVE"] == "missing"
    assert states(report)["CONFIG_VIRTIO_MEM"] == "present"
    assert report.sources == [str(tmp_path / "System.map")]


def test_stub_kernel_clearly_lacks_virtio_mem(tmp_path: Path) -> None:
    report = kp.probe_kernel(stubkernel.hello_poweroff(tmp_path / "stub.elf"), VIRTIO_MEM_KIT)
    assert set(states(report).values()) == {"missing"}
    assert "CONFIG_VIRTIO_MEM" in report.failure_text().splitlines()[0]


def test_strings_only_rule_out_never_in(tmp_path: Path) -> None:
    # No symbols, but the driver's name is in the image: cannot tell, the runtime check decides.
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(stubkernel.elf(b"\xf4" + b"\0virtio_mem\0virtio-mmio\0"))
    report = kp.probe_kernel(kernel, [kp.VIRTIO_MEM, kp.VIRTIO_MMIO, kp.HYPERV])
    assert states(report) == {"CONFIG_VIRTIO_MEM": "unknown", "CONFIG_VIRTIO_MMIO": "unknown",
                              "CONFIG_HYPERV": "missing"}
    assert report.summary() == "the kernel lacks CONFIG_HYPERV"
    unsure = kp.probe_kernel(kernel, [kp.VIRTIO_MEM])
    assert not unsure.failures and unsure.summary() == (
        "undecided statically, left to the runtime check: CONFIG_VIRTIO_MEM [from the vmlinux image's strings]")


def ikconfig(text: str) -> bytes:
    return kp.IKCONFIG_START + gzip.compress(text.encode()) + kp.IKCONFIG_END


def test_embedded_config_tells_a_module_from_missing(tmp_path: Path) -> None:
    config = "CONFIG_VIRTIO_MMIO=y\nCONFIG_VIRTIO_MEM=m\n# CONFIG_MEMORY_HOTREMOVE is not set\nCONFIG_MEMORY_HOTPLUG=y\n"
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(stubkernel.elf(b"\xf4" + ikconfig(config)))
    report = kp.probe_kernel(kernel, VIRTIO_MEM_KIT)
    assert states(report) == {"CONFIG_VIRTIO_MMIO": "present", "CONFIG_VIRTIO_MEM": "module",
                              "CONFIG_MEMORY_HOTPLUG": "present", "CONFIG_MEMORY_HOTREMOVE": "missing"}
    assert report.failure_text().splitlines()[0] == (
        "the kernel lacks CONFIG_VIRTIO_MEM=y (it is =m), CONFIG_MEMORY_HOTREMOVE")


@pytest.mark.parametrize("pack", [
    gzip.compress,
    lambda b: lzma.compress(b, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
    lambda b: lzma.compress(b, format=lzma.FORMAT_ALONE),
], ids=["gzip", "xz", "lzma"])
def test_bzimage_payload_is_unpacked(tmp_path: Path, pack) -> None:
    inner = stubkernel.elf(b"\xf4" + b"\0virtio_mem\0")  # the driver's name, no symbols, no virtio-mmio
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(bzimage(pack(inner) + b"\x00\x10\x00\x00"))  # the kernel appends a size word
    report = kp.probe_kernel(kernel, [kp.VIRTIO_MEM, kp.VIRTIO_MMIO])
    assert report.kind == "bzImage"
    assert states(report) == {"CONFIG_VIRTIO_MEM": "unknown", "CONFIG_VIRTIO_MMIO": "missing"}


def test_bzimage_with_a_system_map(tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(bzimage(gzip.compress(stubkernel.elf(b"\xf4"))))
    (tmp_path / "System.map").write_text("ffffffff81000000 t virtio_mem_probe\n")
    report = kp.probe_kernel(kernel, [kp.VIRTIO_MEM, kp.HYPERV_BALLOON])
    assert states(report) == {"CONFIG_VIRTIO_MEM": "present", "CONFIG_HYPERV_BALLOON": "missing"}


def test_zstd_bzimage_skips_the_static_check(tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(bzimage(kp.ZSTD_MAGIC + bytes(64)))
    report = kp.probe_kernel(kernel, VIRTIO_MEM_KIT)
    assert set(states(report).values()) == {"unknown"} and not report.failures
    assert any("zstd" in note and "skipped" in note for note in report.notes)
    assert "zstd" in report.summary()


def test_unknown_file_kind_is_not_a_failure(tmp_path: Path) -> None:
    kernel = tmp_path / "Image"
    kernel.write_bytes(b"MZ" + bytes(4096))
    report = kp.probe_kernel(kernel, [kp.VIRTIO_MEM])
    assert report.kind == "unknown" and not report.failures


def test_unreadable_kernel_is_a_probe_error(tmp_path: Path) -> None:
    with pytest.raises(kp.ProbeError, match="cannot read kernel"):
        kp.probe_kernel(tmp_path / "missing", [kp.VIRTIO_MEM])


def test_default_guest_has_everything_both_kits_need() -> None:
    import guest_images

    img = guest_images.default_image()
    if not guest_images.is_built(img):
        pytest.skip("the default guest is not built (make guest)")
    reqs = VIRTIO_MEM_KIT + [kp.HYPERV, kp.HYPERV_BALLOON]
    for kernel in (img.vmlinux, img.bzimage):
        report = kp.probe_kernel(kernel, reqs)
        assert set(states(report).values()) == {"present"}, report.summary()
