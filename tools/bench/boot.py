"""Boot time: launch-to-init and launch-to-exit, pyvmm against QEMU on the same guest.

Both boot the default guest's vmlinux with the default initramfs plus a one-file overlay
whose /init prints a marker and powers off at once, and with pyvmm's own kernel command
line. QEMU (microvm, qboot, `-accel kvm`) has no emulation assist, so on a host where KVM
cannot emulate `int3`/`fwait` it also gets the two guest-kernel boot parameters that avoid
them (`no_int3_selftest skip_fpu_drop_fwait`; both are no-ops for pyvmm's assisted run).
"""

from __future__ import annotations

import io
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import guest_images  # noqa: E402
from guest_images import cpio  # noqa: E402

INIT_MARKER = b"pyvmm-init: started"
BENCH_INIT = b"#!/bin/sh\necho 'pyvmm-init: started'\n/bin/busybox poweroff -f\n"
QEMU_ONLY_PARAMS = "no_int3_selftest skip_fpu_drop_fwait"
TIMEOUT = 900


def bench_initramfs(base: Path, out: Path) -> Path:
    """The default initramfs with /init replaced (a later cpio member wins)."""
    overlay = io.BytesIO()
    cpio.write_newc(overlay, [cpio.regular("init", BENCH_INIT, 0o755)])
    out.write_bytes(base.read_bytes() + overlay.getvalue())
    return out


def timed_boot(argv: list[str]) -> tuple[float, float, bytes]:
    """(seconds to the init marker, seconds to process exit, console bytes)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = b""
    t_init = float("nan")
    while True:
        chunk = proc.stdout.read1(65536)
        if not chunk:
            break
        out += chunk
        if t_init != t_init and INIT_MARKER in out:
            t_init = time.monotonic() - t0
        if time.monotonic() - t0 > TIMEOUT:
            proc.kill()
            break
    proc.wait()
    t_exit = time.monotonic() - t0
    if proc.returncode != 0 or t_init != t_init:
        raise RuntimeError(f"{argv[0]} failed (status {proc.returncode}); console tail:\n"
                           + out[-1500:].decode(errors="replace"))
    return t_init, t_exit, out


def pyvmm_argv(img, initrd: Path) -> list[str]:
    return [sys.executable, "-m", "pyvmm.cli", "run", "--kernel", str(img.vmlinux), "--initrd", str(initrd),
            "--memory", "256M"]


def qemu_argv(img, initrd: Path, cmdline: str) -> list[str]:
    return ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off,acpi=on",
            "-bios", "/usr/share/qemu/qboot.rom", "-accel", "kvm", "-cpu", "host,-arch-capabilities",
            "-m", "256M", "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
            "-kernel", str(img.vmlinux), "-initrd", str(initrd), "-append", f"{cmdline} {QEMU_ONLY_PARAMS}"]


def run(repeat: int = 2) -> dict:
    img = guest_images.default_image()
    with tempfile.TemporaryDirectory() as d:
        initrd = bench_initramfs(img.initramfs, Path(d) / "bench-initramfs")
        results: dict[str, list[tuple[float, float]]] = {"pyvmm": [], "qemu": []}
        cmdline = None
        for _ in range(repeat):
            t_init, t_exit, out = timed_boot(pyvmm_argv(img, initrd))
            results["pyvmm"].append((t_init, t_exit))
            if cmdline is None:
                m = re.search(rb"Command line: (.*?)\r?\n", out)
                cmdline = m.group(1).decode()
            t_init, t_exit, _ = timed_boot(qemu_argv(img, initrd, cmdline))
            results["qemu"].append((t_init, t_exit))
    summary = {}
    for who, runs in results.items():
        summary[who] = {"init": statistics.median(r[0] for r in runs), "exit": statistics.median(r[1] for r in runs),
                        "runs": runs}
    summary["cmdline"] = cmdline
    return summary


if __name__ == "__main__":
    s = run(1)
    for who in ("pyvmm", "qemu"):
        print(f"{who}: init {s[who]['init']:.1f} s, exit {s[who]['exit']:.1f} s")
