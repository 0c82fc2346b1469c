"""What the default guest image is made of: input files, cache paths, hashes.

Cheap to import and to call (hashlib and stat only, no subprocesses), so that
`guest_images.default_image()` can be used anywhere. The build itself lives
in `guest_images.build`.

Cache layout (root: $PYVMM_CACHE_DIR, else ~/.cache/pyvmm):
    src/linux-source-6.12/     pristine unpacked Debian source, never modified
    work/linux-6.12/           hard-link copy of it with our patches applied
    work/build-6.12/           out-of-tree kernel build (make O=...)
    guest/kernel-<hk>/         vmlinux, bzImage, System.map, .config
    guest/initramfs-<hi>/      initramfs (uncompressed newc cpio), memtool
    guest/<h>/                 symlinks to both: the image as one directory
The kernel hash <hk> and the initramfs hash <hi> are separate, so changing
the agent never rebuilds the kernel; <h> covers both.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
KERNEL_FRAGMENT = PACKAGE_DIR / "kernel.config"
PATCH_DIR = PACKAGE_DIR / "patches"
INITRAMFS_DIR = PACKAGE_DIR / "initramfs"
MEMTOOL_SOURCE = PACKAGE_DIR / "memtool.c"
INIT_SCRIPT = INITRAMFS_DIR / "init"
AGENT_SCRIPT = INITRAMFS_DIR / "agent.sh"
FSTAB = INITRAMFS_DIR / "fstab"
SHRC = INITRAMFS_DIR / "shrc"

SOURCE_PACKAGE = "linux-source-6.12"
SOURCE_TARBALL = Path("/usr/src") / f"{SOURCE_PACKAGE}.tar.xz"
BUSYBOX_PACKAGE = "busybox-static"
BUSYBOX_BINARY = Path("/bin/busybox")
# Debian packages the build needs (kernel build, memtool, busybox).
BUILD_PACKAGES = (
    SOURCE_PACKAGE, "build-essential", "flex", "bison", "bc", "libelf-dev",
    "libssl-dev", "cpio", BUSYBOX_PACKAGE,
)

# Bump when build.py changes how the kernel or the initramfs is produced,
# so that caches made by the old recipe are not reused.
KERNEL_RECIPE_VERSION = 1
INITRAMFS_RECIPE_VERSION = 1

HASH_CHARS = 16

VMLINUX = "vmlinux"
BZIMAGE = "bzImage"
SYSTEM_MAP = "System.map"
KCONFIG = ".config"
INITRAMFS = "initramfs"
MEMTOOL = "memtool"
KERNEL_OUTPUTS = (VMLINUX, BZIMAGE, SYSTEM_MAP, KCONFIG)
INITRAMFS_OUTPUTS = (INITRAMFS, MEMTOOL)


def cache_root() -> Path:
    env = os.environ.get("PYVMM_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "pyvmm"


def source_dir() -> Path:
    return cache_root() / "src" / SOURCE_PACKAGE


def work_source_dir() -> Path:
    return cache_root() / "work" / "linux-6.12"


def kernel_build_dir() -> Path:
    return cache_root() / "work" / "build-6.12"


def guest_root() -> Path:
    return cache_root() / "guest"


def _file_id(path: Path) -> str:
    """Identity of a large installed file without reading it."""
    try:
        st = path.stat()
    except OSError:
        return f"{path}:missing"
    return f"{path}:{st.st_size}:{int(st.st_mtime)}"


def source_id() -> str:
    """Identifies the kernel source: the Debian tarball's size and mtime
    (they change with every package version)."""
    return _file_id(SOURCE_TARBALL)


def patch_files() -> list[Path]:
    return sorted(PATCH_DIR.glob("*.patch"))


def _digest(parts: list[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for name, data in parts:
        h.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()[:HASH_CHARS]


def _compiler_id() -> str:
    # /usr/bin/gcc -> gcc-12: the compiler version without running it
    return os.path.realpath("/usr/bin/gcc")


@dataclass(frozen=True)
class Inputs:
    """Everything the image is built from, read once. The build uses these
    bytes, not the files, so that an edit made while a build runs can never
    end up in a cache entry named after other contents."""

    source: str
    compiler: str
    busybox: str
    fragment: bytes
    patches: tuple[tuple[str, bytes], ...]  # (file name, contents), in order
    init: bytes
    agent: bytes
    fstab: bytes
    shrc: bytes
    memtool_c: bytes

    def patches_hash(self) -> str:
        return _digest(list(self.patches))

    def kernel_hash(self) -> str:
        parts = [
            ("recipe", str(KERNEL_RECIPE_VERSION).encode()),
            ("source", self.source.encode()),
            ("compiler", self.compiler.encode()),
            ("fragment", self.fragment),
        ]
        return _digest(parts + [(f"patch:{n}", d) for n, d in self.patches])

    def initramfs_hash(self) -> str:
        return _digest([
            ("recipe", str(INITRAMFS_RECIPE_VERSION).encode()),
            ("busybox", self.busybox.encode()),
            ("compiler", self.compiler.encode()),
            ("init", self.init), ("agent", self.agent), ("fstab", self.fstab),
            ("shrc", self.shrc),
            ("memtool.c", self.memtool_c),
        ])

    def image_hash(self) -> str:
        return _digest([("kernel", self.kernel_hash().encode()),
                        ("initramfs", self.initramfs_hash().encode())])


def snapshot() -> Inputs:
    return Inputs(
        source=source_id(),
        compiler=_compiler_id(),
        busybox=_file_id(BUSYBOX_BINARY),
        fragment=KERNEL_FRAGMENT.read_bytes(),
        patches=tuple((p.name, p.read_bytes()) for p in patch_files()),
        init=INIT_SCRIPT.read_bytes(),
        agent=AGENT_SCRIPT.read_bytes(),
        fstab=FSTAB.read_bytes(),
        shrc=SHRC.read_bytes(),
        memtool_c=MEMTOOL_SOURCE.read_bytes(),
    )


def kernel_dir(inputs: Inputs) -> Path:
    return guest_root() / f"kernel-{inputs.kernel_hash()}"


def initramfs_dir(inputs: Inputs) -> Path:
    return guest_root() / f"initramfs-{inputs.initramfs_hash()}"


def image_dir(inputs: Inputs) -> Path:
    return guest_root() / inputs.image_hash()
