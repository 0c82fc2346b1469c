"""Exit-loop cost: µs per port-I/O exit, pyvmm's Python vCPU loop against a C loop.

Both run the same guest code (tests/stubkernel.py) in the same 64-bit boot state. pyvmm's
cost is measured in-process from `Machine.run()` and made independent of start-up by
subtracting a short run from a long one; the C peer times its loop directly.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.stubkernel import pio_loop_code, poweroff_code, write_stub  # noqa: E402

UNCLAIMED_PORT = 0x80


def _pyvmm_run_seconds(kernel: Path) -> float:
    from vmm.machine import Machine, MachineConfig

    m = Machine(MachineConfig(kernel=kernel, memory=64 << 20, console_output=lambda b: None))
    try:
        t0 = time.perf_counter()
        code = m.run()
        elapsed = time.perf_counter() - t0
    finally:
        m.close()
    if code != 0:
        raise RuntimeError(f"stub exited with {code}")
    return elapsed


def pyvmm_us_per_exit(exits: int, repeat: int) -> list[float]:
    with tempfile.TemporaryDirectory() as d:
        long = write_stub(Path(d) / "long.elf", pio_loop_code(UNCLAIMED_PORT, exits) + poweroff_code())
        short = write_stub(Path(d) / "short.elf", pio_loop_code(UNCLAIMED_PORT, 1) + poweroff_code())
        out = []
        for _ in range(repeat):
            t_long = _pyvmm_run_seconds(long)
            t_short = _pyvmm_run_seconds(short)
            out.append((t_long - t_short) / (exits - 1) * 1e6)
        return out


def c_us_per_exit(exits: int, repeat: int) -> list[float]:
    with tempfile.TemporaryDirectory() as d:
        binary = Path(d) / "pio_loop"
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(Path(__file__).with_name("pio_loop.c"))], check=True)
        code = Path(d) / "loop.bin"
        code.write_bytes(pio_loop_code(UNCLAIMED_PORT, exits) + poweroff_code())
        out = []
        for _ in range(repeat):
            res = subprocess.run([str(binary), str(code), str(exits)], capture_output=True, text=True, check=True)
            out.append(float(res.stdout.split("us_per_exit")[1]))
        return out


def run(exits: int = 100_000, repeat: int = 3) -> dict:
    # Interleave the two so that host noise hits both alike.
    py, c = [], []
    for _ in range(repeat):
        c += c_us_per_exit(exits, 1)
        py += pyvmm_us_per_exit(exits, 1)
    return {"exits": exits, "repeat": repeat, "pyvmm": py, "c": c,
            "pyvmm_median": statistics.median(py), "c_median": statistics.median(c),
            "ratio": statistics.median(py) / statistics.median(c)}


if __name__ == "__main__":
    r = run()
    print(f"pyvmm {r['pyvmm_median']:.2f} µs/exit, C {r['c_median']:.2f} µs/exit, ratio {r['ratio']:.2f}")
