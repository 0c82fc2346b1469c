"""Boot a stock Debian kernel (linux-image-cloud-amd64) under pyvmm: the record in docs/benchmarks.md.

Downloads the package with apt, builds an uncompressed initramfs holding busybox, the
kernel's virtio/virtio-mem/Hyper-V modules and an /init that prints a marker, then runs
`pyvmm run --kernel vmlinuz` and reports when the kernel reached /init and which emulation
assists it needed. Not part of CI: on a PVM host it takes many minutes.

usage: python tools/stock_kernel.py [--workdir DIR] [--timeout SECONDS] [--cpu-features SPEC] [--append ARGS]

On a PVM host, the run recorded in docs/benchmarks.md reached /init with
`--cpu-features default,-ssse3,-sse4_1,-sse4_2,-aes,-pclmulqdq --append cryptomgr.notests`.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from guest_images import cpio  # noqa: E402

MODULE_DIRS = ("kernel/drivers/virtio", "kernel/drivers/hv")
INIT = b"""#!/bin/sh
/bin/busybox echo 'stock-init: reached'
/bin/busybox poweroff -f
"""


def fetch(workdir: Path) -> tuple[Path, Path, str]:
    workdir.mkdir(parents=True, exist_ok=True)
    dep = subprocess.run(["apt-cache", "depends", "linux-image-cloud-amd64"], capture_output=True, text=True, check=True)
    pkg = re.search(r"Depends: (linux-image-[0-9]\S+)", dep.stdout).group(1)
    root = workdir / "root"
    if not root.exists():
        subprocess.run(["apt-get", "download", pkg], cwd=workdir, check=True)
        deb = next(workdir.glob(f"{pkg}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    kver = pkg[len("linux-image-"):]
    return root / "boot" / f"vmlinuz-{kver}", root / "lib" / "modules" / kver, pkg


def build_initramfs(modules: Path, out: Path) -> Path:
    entries = [cpio.directory(d) for d in ("bin", "dev", "proc", "sys", "lib", "lib/modules")]
    entries.append(cpio.char_device("dev/console", 5, 1))
    entries.append(cpio.regular("bin/busybox", Path("/bin/busybox").read_bytes(), 0o755))
    entries.append(cpio.regular("init", INIT, 0o755))
    seen_dirs = set()
    for sub in MODULE_DIRS:
        for ko in sorted((modules / sub).rglob("*.ko*")):
            rel = Path("lib/modules") / modules.name / ko.relative_to(modules)
            for parent in reversed(rel.parents[:-1]):
                if str(parent) not in seen_dirs and str(parent) not in ("lib", "lib/modules"):
                    seen_dirs.add(str(parent))
                    entries.append(cpio.directory(str(parent)))
            entries.append(cpio.regular(str(rel), ko.read_bytes()))
    with open(out, "wb") as f:
        cpio.write_newc(f, entries)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "pyvmm" / "stock")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--append", default="", help="more kernel parameters")
    ap.add_argument("--cpu-features", help="pyvmm's --cpu-features for this run")
    args = ap.parse_args()
    vmlinuz, modules, pkg = fetch(args.workdir)
    initrd = build_initramfs(modules, args.workdir / "initramfs")
    system_map = vmlinuz.parent / vmlinuz.name.replace("vmlinuz", "System.map")
    argv = [sys.executable, "-m", "pyvmm.cli", "run", "--kernel", str(vmlinuz), "--initrd", str(initrd),
            "--memory", "512M", "--system-map", str(system_map), "--qmp", f"unix:{args.workdir}/qmp.sock",
            # Without KASLR the System.map addresses are the running ones, so assist reports name symbols.
            "--append", "nokaslr " + args.append] + (["--cpu-features", args.cpu_features] if args.cpu_features else [])
    print(f"{pkg}: booting {vmlinuz.name} with {initrd.stat().st_size >> 10} KiB initramfs", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    reached = None
    log = open(args.workdir / "console.log", "wb")
    stats = None
    while True:
        line = proc.stdout.readline()
        if not line:
            break
        log.write(line)
        log.flush()
        if b"Run /init as init process" in line and reached is None:
            reached = time.monotonic() - t0
            print(f"reached /init after {reached:.0f} s", flush=True)
            from pyvmm.qmp.client import QmpClient

            with QmpClient(str(args.workdir / "qmp.sock")) as q:
                stats = q.execute("query-vm-stats")
                q.execute("quit")
        if time.monotonic() - t0 > args.timeout:
            proc.kill()
            break
    proc.wait()
    print(f"pyvmm exit status {proc.returncode}; assists: {stats and stats['assists']}")
    return 0 if reached is not None else 1


if __name__ == "__main__":
    sys.exit(main())
