"""guest_images: cpio writer, config check, patch parsing, input hashing, and
the kernel patches themselves (against the unpacked source, when present)."""

from __future__ import annotations

import dataclasses
import io
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

import guest_images
from guest_images import build, cpio, recipe

NEWC_HEADER_LEN = 110


def parse_newc(data: bytes) -> list[tuple[str, int, bytes, int, int]]:
    """Independent reader: (name, mode, data, rdevmajor, rdevminor) per member."""
    out, off = [], 0
    while True:
        assert data[off:off + 6] == b"070701"
        f = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name_start = off + NEWC_HEADER_LEN
        name = data[name_start:name_start + namesize - 1].decode()
        assert data[name_start + namesize - 1] == 0
        body = name_start + namesize + (-(NEWC_HEADER_LEN + namesize) % 4)
        content = data[body:body + filesize]
        off = body + filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            assert off == len(data)
            return out
        out.append((name, f[1], content, f[9], f[10]))


def test_cpio_roundtrip():
    entries = [cpio.directory("bin"), cpio.regular("bin/x", b"abcde", 0o755),
               cpio.symlink("bin/sh", "x"), cpio.char_device("dev/console", 5, 1),
               cpio.regular("empty", b"")]
    buf = io.BytesIO()
    size = cpio.write_newc(buf, entries)
    data = buf.getvalue()
    assert size == len(data) and size % 4 == 0
    members = parse_newc(data)
    assert [m[0] for m in members] == ["bin", "bin/x", "bin/sh", "dev/console", "empty"]
    assert members[1][1:3] == (stat.S_IFREG | 0o755, b"abcde")
    assert stat.S_ISLNK(members[2][1]) and members[2][2] == b"x"
    assert stat.S_ISCHR(members[3][1]) and members[3][3:] == (5, 1)


@pytest.mark.skipif(shutil.which("cpio") is None, reason="needs cpio(1)")
def test_cpio_is_readable_by_gnu_cpio():
    buf = io.BytesIO()
    cpio.write_newc(buf, [cpio.directory("d"), cpio.regular("d/f", b"hi\n")])
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=buf.getvalue(),
                             stdout=subprocess.PIPE, check=True).stdout.decode().split()
    assert listing == ["d", "d/f"]


def test_cpio_rejects_duplicates():
    with pytest.raises(ValueError):
        cpio.write_newc(io.BytesIO(), [cpio.directory("a"), cpio.directory("a")])


def test_config_mismatches():
    fragment = ("CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_N=2\nCONFIG_TYPO=y\n"
                "# comment\nCONFIG_GONE=n\n")
    final = "CONFIG_A=y\nCONFIG_B=y\nCONFIG_N=1\n"
    assert build.config_mismatches(fragment, final) == [
        "CONFIG_B: wanted n, got y",
        "CONFIG_N: wanted 2, got 1",
        "CONFIG_TYPO: wanted y, got (absent)",
    ]
    assert build.config_mismatches("CONFIG_A=y\n", "CONFIG_A=y\n") == []


def test_patch_targets():
    text = ("--- a/x/y.c\t2020\n+++ b/x/y.c\n@@ -1 +1 @@\n-a\n+b\n"
            "--- /dev/null\n+++ b/new.c\n--- a/gone.c\n+++ /dev/null\n")
    assert build.patch_targets(text) == ["x/y.c", "new.c", "gone.c"]
    with pytest.raises(build.BuildError):
        build.patch_targets("--- a/../etc/passwd\n+++ b/../etc/passwd\n")


def test_static_elf_check():
    assert build.is_static_elf(b"not an elf") is False
    if Path("/bin/busybox").is_file():
        assert build.is_static_elf(Path("/bin/busybox").read_bytes()) is True
    dynamic = Path("/bin/ls").read_bytes()
    assert build.is_static_elf(dynamic) is False


def test_hashes_separate_kernel_and_initramfs():
    base = recipe.snapshot()
    agent_changed = dataclasses.replace(base, agent=base.agent + b"\n# edit\n")
    fragment_changed = dataclasses.replace(base, fragment=base.fragment + b"CONFIG_X=y\n")
    assert agent_changed.kernel_hash() == base.kernel_hash()
    assert agent_changed.initramfs_hash() != base.initramfs_hash()
    assert fragment_changed.kernel_hash() != base.kernel_hash()
    assert fragment_changed.initramfs_hash() == base.initramfs_hash()
    assert len({base.image_hash(), agent_changed.image_hash(), fragment_changed.image_hash()}) == 3


def test_default_image_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("PYVMM_CACHE_DIR", str(tmp_path))
    img = guest_images.default_image()
    assert img.directory.parent == tmp_path / "guest"
    assert [p.name for p in img.files()] == ["vmlinux", "bzImage", "initramfs", "System.map", ".config"]
    assert guest_images.is_built(img) is False


def test_fragment_has_no_duplicate_or_malformed_options():
    seen = set()
    for line in recipe.KERNEL_FRAGMENT.read_text().splitlines():
        if not line.strip() or (line.startswith("#") and "is not set" not in line):
            continue
        assert build.CONFIG_SET.match(line) or build.CONFIG_UNSET.match(line), line
        name = line.split("=")[0].replace("# ", "").split()[0]
        assert name not in seen, f"{name} twice"
        seen.add(name)


@pytest.mark.skipif(shutil.which("patch") is None or not (recipe.source_dir() / "Makefile").is_file(),
                    reason="needs patch(1) and the unpacked kernel source")
def test_patches_apply_to_pristine_source(tmp_path):
    src = recipe.source_dir()
    targets = []
    for p in recipe.patch_files():
        targets += build.patch_targets(p.read_text())
    for rel in targets:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, tmp_path / rel)
    for p in recipe.patch_files():
        subprocess.run(["patch", "-p1", "--batch", "--forward", "-s", "-i", str(p)],
                       cwd=tmp_path, check=True)
    fault = (tmp_path / "arch/x86/mm/fault.c").read_text()
    assert 'early_param("pvm_user_syscall"' in fault
    assert "FIX_EFLAGS) | X86_EFLAGS_IF" in fault  # never IOPL: only user-changeable flags
    assert 'early_param("no_int3_selftest"' in (tmp_path / "arch/x86/kernel/alternative.c").read_text()
    assert 'early_param("skip_fpu_drop_fwait"' in (tmp_path / "arch/x86/kernel/fpu/core.c").read_text()
