"""Build the default guest image: kernel, initramfs, and the cache entry
that joins them.

    python -m guest_images.build [--print-dir] [--force] [--clean] [--prune]

Steps (each skipped when its result is already there):
 1. install the Debian build dependencies (apt-get, through sudo if not root);
 2. unpack linux-source-6.12 into the cache (kept pristine);
 3. make a hard-link copy of it and apply guest_images/patches/*.patch;
 4. `make tinyconfig`, merge guest_images/kernel.config, check that every
    option of the fragment really ended up in .config;
 5. `make vmlinux bzImage` (minutes; progress is condensed);
 6. compile memtool, write the uncompressed newc initramfs;
 7. link both into guest/<hash>/ (see recipe.py for the cache layout).
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from . import GuestImage, cpio, image_for, recipe
from .recipe import Inputs

Progress = Callable[[str], None]

WORK_STAMP = ".pyvmm-work.json"
SOURCE_STAMP = ".pyvmm-source-id"
CONFIG_STAMP = ".pyvmm-config-id"
OBJECT_COUNT_STAMP = ".pyvmm-object-count"
LOCK_FILE = ".build.lock"
PROGRESS_INTERVAL_S = 20.0
FAILURE_TAIL_LINES = 40
FRAGMENT_COPY = ".pyvmm-fragment.config"
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}
# Kbuild's quiet output: "  CC      kernel/fork.o"
KBUILD_STEP = re.compile(r"^  ([A-Z0-9_]+)\s+(\S+)")
COMPILE_STEPS = {"CC", "AS"}
CONFIG_SET = re.compile(r"^(CONFIG_\w+)=(.*)$")
CONFIG_UNSET = re.compile(r"^# (CONFIG_\w+) is not set$")
MEMTOOL_CFLAGS = (
    "-static", "-nostdlib", "-O2", "-fno-stack-protector", "-fno-builtin",
    "-Wall", "-Wextra", "-s",
)
# ELF program header type of the dynamic-loader path: a static binary has none.
PT_INTERP = 3
ELF64_MAGIC = b"\x7fELF\x02"


class BuildError(Exception):
    """A build step failed; the message says which and why."""


# ---------------------------------------------------------------- helpers


def _run(cmd: list[str], *, cwd: Path | None = None,
         env: dict[str, str] | None = None, stdin: bytes | None = None) -> str:
    """Run a short command; on failure raise BuildError with its output."""
    full_env = {**os.environ, **(env or {})}
    try:
        feed = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
        done = subprocess.run(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, **feed)
    except FileNotFoundError as e:
        raise BuildError(f"cannot run {cmd[0]}: {e}") from None
    output = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        tail = "\n".join(output.splitlines()[-FAILURE_TAIL_LINES:])
        raise BuildError(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{tail}")
    return output


def _sudo() -> list[str]:
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") is None:
        raise BuildError("not root and no sudo: install the build packages by hand: "
                         + " ".join(recipe.BUILD_PACKAGES))
    return ["sudo"]


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists() or final.is_symlink():
        shutil.rmtree(final)
    tmp.rename(final)


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# ------------------------------------------------------- 1. build packages


def missing_packages(packages: tuple[str, ...] = recipe.BUILD_PACKAGES) -> list[str]:
    """Packages that dpkg does not list as installed."""
    if shutil.which("dpkg-query") is None:
        raise BuildError("not a Debian system (no dpkg-query): install the equivalents of "
                         + " ".join(packages) + " and unpack the kernel source by hand")
    done = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${db:Status-Abbrev}\n", *packages],
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    installed = {line.split()[0] for line in done.stdout.splitlines()
                 if len(line.split()) >= 2 and line.split()[1] == "ii"}
    return [p for p in packages if p not in installed]


def ensure_packages(progress: Progress) -> None:
    missing = missing_packages()
    if not missing:
        return
    progress(f"[packages] installing {' '.join(missing)}")
    install = [*_sudo(), "apt-get", "install", "-y", "--no-install-recommends", *missing]
    try:
        _run(install, env=APT_ENV)
    except BuildError:
        # Usually "Unable to locate package": the package lists are stale.
        progress("[packages] apt-get install failed; running apt-get update and retrying")
        _run([*_sudo(), "apt-get", "update"], env=APT_ENV)
        _run(install, env=APT_ENV)
    still = missing_packages()
    if still:
        raise BuildError(f"packages still missing after apt-get: {' '.join(still)}")


# -------------------------------------------------------- 2. kernel source


def _tree_entry_count(root: Path) -> int:
    """Non-directory entries under root (our stamp files excluded)."""
    count = 0
    for _dirpath, dirnames, filenames in os.walk(root):
        count += len(filenames)
        # symlinks to directories are listed as dirnames by os.walk
        count += sum(1 for d in dirnames if os.path.islink(os.path.join(_dirpath, d)))
    return count - int((root / SOURCE_STAMP).exists())


def _tarball_entry_count(tarball: Path) -> int:
    listing = subprocess.run(["tar", "-tf", str(tarball)], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    if listing.returncode != 0:
        raise BuildError(f"cannot list {tarball}")
    return sum(1 for line in listing.stdout.splitlines() if not line.endswith("/"))


def ensure_source(inputs: Inputs, progress: Progress) -> Path:
    src = recipe.source_dir()
    stamp = src / SOURCE_STAMP
    sid = inputs.source
    tarball = recipe.SOURCE_TARBALL
    if not tarball.is_file():
        raise BuildError(f"{tarball} is missing (package {recipe.SOURCE_PACKAGE})")
    if stamp.is_file() and stamp.read_text().strip() == sid:
        return src
    if (src / "Makefile").is_file() and not stamp.exists():
        # Unpacked by someone else (or by an interrupted run): adopt it only
        # if it holds exactly what the tarball lists.
        progress(f"[source] checking the existing {src} against {tarball.name}")
        if _tree_entry_count(src) == _tarball_entry_count(tarball):
            stamp.write_text(sid + "\n")
            return src
        progress("[source] incomplete; unpacking again")
    progress(f"[source] unpacking {tarball} (about a minute)")
    tmp = _fresh_dir(src.parent / ".unpack-tmp")
    _run(["tar", "-C", str(tmp), "-xf", str(tarball)])
    unpacked = tmp / recipe.SOURCE_PACKAGE
    if not (unpacked / "Makefile").is_file():
        raise BuildError(f"{tarball} did not unpack to {recipe.SOURCE_PACKAGE}/")
    (unpacked / SOURCE_STAMP).write_text(sid + "\n")
    _replace_dir(unpacked, src)
    shutil.rmtree(tmp)
    return src


# ------------------------------------------------- 3. patched work tree


def patch_targets(patch_text: str) -> list[str]:
    """Paths (relative to the tree, i.e. -p1) that a unified diff touches."""
    paths = []
    for line in patch_text.splitlines():
        if not line.startswith(("--- ", "+++ ")):
            continue
        name = line[4:].split("\t")[0].strip()
        if name == "/dev/null":
            continue
        parts = name.split("/", 1)
        if len(parts) != 2 or not parts[1]:
            raise BuildError(f"patch path {name!r} has no leading component to strip")
        rel = parts[1]
        if rel.startswith("/") or ".." in rel.split("/"):
            raise BuildError(f"patch path {name!r} leaves the tree")
        if rel not in paths:
            paths.append(rel)
    return paths


def _restore_pristine(rel: str, src: Path, work: Path) -> None:
    """Give the work tree its own unpatched copy of rel. A copy, not a link,
    so that patching never writes through into the pristine tree; and a
    fresh mtime, so that make rebuilds what depends on it."""
    dst = work / rel
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    if (src / rel).is_file():
        shutil.copyfile(src / rel, dst)
        shutil.copymode(src / rel, dst)


def _read_work_stamp(work: Path) -> dict:
    try:
        return json.loads((work / WORK_STAMP).read_text())
    except (OSError, ValueError):
        return {}


def _write_work_stamp(work: Path, state: dict) -> None:
    tmp = work / (WORK_STAMP + ".tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    tmp.replace(work / WORK_STAMP)


def prepare_work_tree(src: Path, inputs: Inputs, progress: Progress) -> Path:
    work = recipe.work_source_dir()
    sid = inputs.source
    state = _read_work_stamp(work)
    if state.get("source_id") != sid or not (work / "Makefile").is_file():
        progress(f"[tree] making a hard-link copy of the source in {work}")
        for d in (work, recipe.kernel_build_dir()):
            if d.exists():
                shutil.rmtree(d)
        work.parent.mkdir(parents=True, exist_ok=True)
        _run(["cp", "-al", str(src), str(work)])
        (work / SOURCE_STAMP).unlink(missing_ok=True)
        state = {"source_id": sid, "patches_hash": "", "touched": []}
        _write_work_stamp(work, state)

    want = inputs.patches_hash()
    if state.get("patches_hash") == want:
        return work
    touched_now: list[str] = []
    for _name, text in inputs.patches:
        touched_now += [t for t in patch_targets(text.decode()) if t not in touched_now]
    # Record the files first, so that an interrupted run repairs them next time.
    dirty = sorted(set(state.get("touched", [])) | set(touched_now))
    _write_work_stamp(work, {"source_id": sid, "patches_hash": None, "touched": dirty})
    for rel in dirty:
        _restore_pristine(rel, src, work)
    for name, text in inputs.patches:
        progress(f"[tree] applying {name}")
        _run(["patch", "-p1", "--forward", "--batch", "--no-backup-if-mismatch"],
             cwd=work, stdin=text)
    _write_work_stamp(work, {"source_id": sid, "patches_hash": want, "touched": touched_now})
    return work


# ------------------------------------------------------------ 4. config


def parse_config(text: str) -> dict[str, str]:
    """CONFIG_X -> value; "n" for "# CONFIG_X is not set"."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        m = CONFIG_SET.match(line)
        if m:
            out[m[1]] = m[2]
            continue
        m = CONFIG_UNSET.match(line)
        if m:
            out[m[1]] = "n"
    return out


def config_mismatches(fragment: str, final: str) -> list[str]:
    """Options of the fragment whose value did not survive into the final
    .config (typos, unmet dependencies, something else selecting them)."""
    have = parse_config(final)
    problems = []
    for name, want in parse_config(fragment).items():
        got = have.get(name, "n")  # absent from .config means not set
        if got != want:
            problems.append(f"{name}: wanted {want}, got {got if name in have else '(absent)'}")
    return problems


def configure_kernel(work: Path, inputs: Inputs, progress: Progress, force: bool) -> None:
    build = recipe.kernel_build_dir()
    build.mkdir(parents=True, exist_ok=True)
    config = build / recipe.KCONFIG
    stamp = build / CONFIG_STAMP
    want = inputs.kernel_hash()
    if not force and config.is_file() and stamp.is_file() and stamp.read_text().strip() == want:
        return
    progress("[config] make tinyconfig + guest_images/kernel.config")
    stamp.unlink(missing_ok=True)
    make = ["make", "-C", str(work), f"O={build}"]
    fragment = build / FRAGMENT_COPY
    fragment.write_bytes(inputs.fragment)
    _run([*make, "tinyconfig"])
    _run([str(work / "scripts/kconfig/merge_config.sh"), "-m", str(config), str(fragment)],
         cwd=build)
    _run([*make, "olddefconfig"])
    problems = config_mismatches(inputs.fragment.decode(), config.read_text())
    if problems:
        raise BuildError("kernel.config options that did not take effect:\n  "
                         + "\n  ".join(problems))
    progress(f"[config] all {len(parse_config(inputs.fragment.decode()))} "
             "fragment options are in .config")
    stamp.write_text(want + "\n")


# ------------------------------------------------------------- 5. make


def _kbuild_env() -> dict[str, str]:
    # Fixed identity: the same inputs give the same `uname -v`.
    return {"KBUILD_BUILD_USER": "pyvmm", "KBUILD_BUILD_HOST": "pyvmm",
            "KBUILD_BUILD_TIMESTAMP": "pyvmm default guest"}


def _stream(cmd: list[str], env: dict[str, str]) -> Iterator[str]:
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, text=True, errors="replace",
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    try:
        yield from proc.stdout
    finally:
        proc.stdout.close()
        rc = proc.wait()
        if rc != 0:
            raise BuildError(f"exit status {rc}")


def make_kernel(work: Path, progress: Progress) -> None:
    build = recipe.kernel_build_dir()
    count_file = build / OBJECT_COUNT_STAMP
    try:
        expected = int(count_file.read_text())
    except (OSError, ValueError):
        expected = 0
    jobs = os.cpu_count() or 1
    cmd = ["make", "-C", str(work), f"O={build}", f"-j{jobs}", "vmlinux", "bzImage"]
    progress(f"[kernel] make -j{jobs} vmlinux bzImage (a full build takes minutes)")
    compiled, last, tail = 0, "", collections.deque(maxlen=FAILURE_TAIL_LINES)
    started = next_report = time.monotonic()
    next_report += PROGRESS_INTERVAL_S
    try:
        for line in _stream(cmd, _kbuild_env()):
            line = line.rstrip("\n")
            tail.append(line)
            m = KBUILD_STEP.match(line)
            if m:
                if m[1] in COMPILE_STEPS:
                    compiled += 1
                    last = m[2]
            elif "warning:" in line or "error" in line.lower():
                progress(f"[kernel] {line}")
            now = time.monotonic()
            if now >= next_report:
                of = f" of ~{expected}" if expected > compiled else ""
                progress(f"[kernel] still building, {compiled}{of} files compiled "
                         f"({now - started:.0f} s; last {last})")
                next_report = now + PROGRESS_INTERVAL_S
    except BuildError as e:
        raise BuildError("kernel build failed (" + str(e) + "); last lines:\n"
                         + "\n".join(tail)) from None
    progress(f"[kernel] done: {compiled} files compiled in {time.monotonic() - started:.0f} s")
    if compiled > expected:
        count_file.write_text(f"{compiled}\n")


def build_kernel(inputs: Inputs, progress: Progress, force: bool = False) -> Path:
    out = recipe.kernel_dir(inputs)
    if not force and all((out / f).is_file() for f in recipe.KERNEL_OUTPUTS):
        return out
    src = ensure_source(inputs, progress)
    work = prepare_work_tree(src, inputs, progress)
    configure_kernel(work, inputs, progress, force)
    make_kernel(work, progress)
    build = recipe.kernel_build_dir()
    tmp = _fresh_dir(out.with_name(out.name + ".tmp"))
    for name, path in ((recipe.VMLINUX, build / "vmlinux"),
                       (recipe.BZIMAGE, build / "arch/x86/boot/bzImage"),
                       (recipe.SYSTEM_MAP, build / "System.map"),
                       (recipe.KCONFIG, build / ".config")):
        shutil.copyfile(path, tmp / name)
    _replace_dir(tmp, out)
    progress(f"[kernel] {out}")
    return out


# -------------------------------------------------------- 6. initramfs


def is_static_elf(data: bytes) -> bool:
    """True for an ELF64 little-endian executable without PT_INTERP."""
    if not data.startswith(ELF64_MAGIC) or len(data) < 64:
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 4 > len(data):
            return False
        if struct.unpack_from("<I", data, off)[0] == PT_INTERP:
            return False
    return True


def build_memtool(source: bytes, dest: Path, progress: Progress) -> None:
    progress("[initramfs] compiling memtool")
    c_file = dest.with_name("memtool.c")
    c_file.write_bytes(source)
    _run(["gcc", *MEMTOOL_CFLAGS, "-o", str(dest), str(c_file)])
    c_file.unlink()


def initramfs_entries(inputs: Inputs, busybox: bytes, memtool: bytes) -> list[cpio.Entry]:
    """The whole initramfs. Kept tiny: unpacking it is interpreted kernel
    work (about 2 s per MiB), and busybox runs its applets itself, so only
    /bin/sh needs a link."""
    entries = [cpio.directory(d) for d in ("bin", "dev", "etc", "proc", "sys", "tmp", "root")]
    entries += [
        # The kernel opens /dev/console for /init before devtmpfs is mounted.
        cpio.char_device("dev/console", 5, 1),
        cpio.regular("bin/busybox", busybox, 0o755),
        cpio.symlink("bin/sh", "busybox"),
        cpio.regular("bin/memtool", memtool, 0o755),
        cpio.regular("init", inputs.init, 0o755),
        cpio.regular("agent.sh", inputs.agent, 0o644),
        cpio.regular("etc/fstab", inputs.fstab, 0o644),
        cpio.regular("etc/shrc", inputs.shrc, 0o644),
    ]
    return entries


def build_initramfs(inputs: Inputs, progress: Progress, force: bool = False) -> Path:
    out = recipe.initramfs_dir(inputs)
    if not force and all((out / f).is_file() for f in recipe.INITRAMFS_OUTPUTS):
        return out
    busybox = recipe.BUSYBOX_BINARY.read_bytes()
    if not is_static_elf(busybox):
        raise BuildError(f"{recipe.BUSYBOX_BINARY} is not a static x86-64 ELF "
                         f"(install {recipe.BUSYBOX_PACKAGE}, not busybox)")
    tmp = _fresh_dir(out.with_name(out.name + ".tmp"))
    build_memtool(inputs.memtool_c, tmp / recipe.MEMTOOL, progress)
    entries = initramfs_entries(inputs, busybox, (tmp / recipe.MEMTOOL).read_bytes())
    with open(tmp / recipe.INITRAMFS, "wb") as f:
        size = cpio.write_newc(f, entries)
    _replace_dir(tmp, out)
    progress(f"[initramfs] {out / recipe.INITRAMFS} ({size} bytes, uncompressed)")
    return out


# ------------------------------------------------------------- 7. image


def link_image(inputs: Inputs, kdir: Path, idir: Path, progress: Progress) -> GuestImage:
    img = image_for(inputs)
    final = img.directory
    tmp = _fresh_dir(final.with_name(final.name + ".tmp"))
    for name in recipe.KERNEL_OUTPUTS:
        (tmp / name).symlink_to(Path("..") / kdir.name / name)
    for name in recipe.INITRAMFS_OUTPUTS:
        (tmp / name).symlink_to(Path("..") / idir.name / name)
    manifest = {"kernel": kdir.name, "initramfs": idir.name, "source": inputs.source,
                "busybox": inputs.busybox, "compiler": inputs.compiler,
                "patches": [name for name, _ in inputs.patches]}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    _replace_dir(tmp, final)
    progress(f"[image] {final}")
    return img


def build_image(progress: Progress = print, force: bool = False) -> GuestImage:
    """Build what is missing (everything with force) and return the image."""
    root = recipe.cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time per cache
        ensure_packages(progress)
        # Read the inputs once, after the packages (the source id names the
        # installed tarball), and build from those bytes only.
        inputs = recipe.snapshot()
        img = image_for(inputs)
        if not force and all(p.is_file() for p in img.files()):
            return img
        kdir = build_kernel(inputs, progress, force)
        idir = build_initramfs(inputs, progress, force)
        return link_image(inputs, kdir, idir, progress)


def prune_cache(img: GuestImage, progress: Progress) -> None:
    """Remove every cached kernel, initramfs and image but img's."""
    keep = {img.directory.name, img.vmlinux.resolve().parent.name,
            img.initramfs.resolve().parent.name}
    for entry in sorted(recipe.guest_root().iterdir()):
        if entry.is_dir() and not entry.is_symlink() and entry.name not in keep:
            progress(f"[prune] removing {entry}")
            shutil.rmtree(entry)


def clean_work_tree(progress: Progress) -> None:
    for d in (recipe.work_source_dir(), recipe.kernel_build_dir()):
        if d.exists():
            progress(f"[clean] removing {d}")
            shutil.rmtree(d)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m guest_images.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--print-dir", action="store_true",
                    help="print only the image directory on stdout (progress goes to stderr)")
    ap.add_argument("--force", action="store_true",
                    help="rebuild and replace the cached image even if it exists")
    ap.add_argument("--clean", action="store_true",
                    help="also throw away the patched tree and the kernel build directory")
    ap.add_argument("--prune", action="store_true",
                    help="afterwards remove all other cached kernels, initramfs and images")
    args = ap.parse_args(argv)

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr if args.print_dir else sys.stdout, flush=True)

    try:
        if args.clean:
            clean_work_tree(progress)
        img = build_image(progress, force=args.force or args.clean)
        if args.prune:
            prune_cache(img, progress)
    except BuildError as e:
        print(f"guest image build failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if args.print_dir:
        print(img.directory)
    else:
        for p in img.files():
            print(f"  {p.name:11} {p.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
