"""The benchmark's handler floor answers like a virtio-mem device, in Python and in C."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tools.bench import handler_floor
from tools.bench.handler_floor import ACK, ERROR, PLUG, UNPLUG, USED_AT, USED_ELEM, _Ring


def test_python_handler_answers_plug_unplug_and_errors() -> None:
    ring = _Ring()
    assert ring.handle() == (-1, 0)  # nothing offered: nothing taken
    ring.offer(PLUG, 64)
    assert ring.handle()[0] == ACK
    assert ring.bitmap[64:128].all() and ring.bitmap.count() == 64
    ring.offer(PLUG, 64)  # already plugged
    assert ring.handle()[0] == ERROR
    ring.offer(UNPLUG, 64)
    assert ring.handle()[0] == ACK
    assert ring.bitmap.count() == 0
    ring.offer(UNPLUG, 64)  # nothing plugged there any more
    assert ring.handle()[0] == ERROR
    assert ring.used16[1] == 4
    # The used ring names the chains in order: heads 0, 2, 4, 6 (two descriptors each).
    assert [USED_ELEM.unpack_from(ring.ram, USED_AT + 4 + 8 * i)[0] for i in range(4)] == [0, 2, 4, 6]


def test_python_floor_is_timed() -> None:
    assert handler_floor.handler_floor_us(0.0, requests=8) > 0


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_c_twin_builds_runs_and_rejects_bad_arguments(tmp_path: Path) -> None:
    assert handler_floor.c_handler_floor_us(0.0, requests=8) > 0
    binary = tmp_path / "floor"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(Path(handler_floor.__file__).with_suffix(".c")),
                    "-lpthread"], check=True)
    bad = subprocess.run([str(binary), "0", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "REQUESTS" in bad.stderr
