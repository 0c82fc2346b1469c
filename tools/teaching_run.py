"""The real run behind docs/teaching.md: a short virtio-mem story, traced and plotted.

Boots the default guest with one 2 GiB virtio-mem device and `--trace`, then over QMP:
plug 512 MiB, shrink to 256 MiB, grow by one guest sub-block at a time, unplug everything.
Prints `info virtio-mem vm0` after each step and `pyvmm trace summary` at the end, and draws
the picture with `pyvmm plot`.

    python tools/teaching_run.py [--out docs/img/virtio-mem-walkthrough.png]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pyvmm  # noqa: E402

MiB = 1 << 20
BOOT_TIMEOUT = 600.0
PLUG_TIMEOUT = 600.0
# Linux 6.12 plugs in sub-blocks of at least a pageblock (4 MiB on x86-64).
GUEST_STEP = 4 * MiB


def step(vm: pyvmm.VM, size: int, what: str) -> None:
    vm.virtio_mem["vm0"].request(size)
    vm.virtio_mem["vm0"].wait_plugged(size, PLUG_TIMEOUT)
    print(f"\n## {what}: requested-size {size // MiB} MiB\n")
    print(vm.qmp.hmp("info virtio-mem vm0").replace("\r\n", "\n").rstrip())
    slots = [s for s in vm.qmp.execute("query-memslots") if s["owner"] == "virtio-mem:vm0"]
    print(f"memslots of vm0: {len(slots)}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs/img/virtio-mem-walkthrough.png")
    ap.add_argument("--trace", type=Path, help="keep the trace here (default: a temporary file)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        trace = args.trace or Path(d) / "walkthrough.jsonl"
        with pyvmm.VM(memory="256M", boot_timeout=BOOT_TIMEOUT, trace=trace,
                      virtio_mem=["id=vm0,size=2G"]) as vm:
            vm.agent.wait_ready(BOOT_TIMEOUT)
            step(vm, 512 * MiB, "plug")
            step(vm, 256 * MiB, "shrink")
            for n in range(1, 3):
                step(vm, 256 * MiB + n * GUEST_STEP, "grow by one guest sub-block")
            step(vm, 0, "unplug everything")
            vm.powerdown(timeout=BOOT_TIMEOUT)
        print("\n## pyvmm trace summary\n", flush=True)
        subprocess.run([sys.executable, "-m", "pyvmm.cli", "trace", "summary", str(trace)], check=True, cwd=REPO)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pyvmm.cli", "plot", str(trace), "-o", str(args.out)], check=True,
                       cwd=REPO)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
