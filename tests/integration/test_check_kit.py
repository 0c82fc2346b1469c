"""`pyvmm check` end to end, as a kernel developer runs it: both kits pass on the default
guest, and a broken guest fails clearly and fast.

Broken guests: (a) a kernel without CONFIG_VIRTIO_MEM (the stub kernel of
tests/stubkernel.py) fails at the static probe, without booting; (b) the default kernel
booted with memhp_default_state=online_kernel onlines hot-plugged memory to ZONE_NORMAL,
which the movable-onlining scenario must name.

Each test is one `pyvmm check` process with one guest (two boots for virtio-mem: its
reboot scenario boots again). Measured on the 2-core PVM host: virtio-mem 455 s, hv-balloon
187 s, the online_kernel variant 77 s, the stub under a second: 12 minutes for the module,
up to twice that while other guests compete for the cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pyvmm.check.registry import REGISTRY
from tests import stubkernel
from tests.integration.guest_support import require_guest

pytestmark = [pytest.mark.guest, require_guest()]

REPO = Path(__file__).resolve().parents[2]
# Whole-run bounds: the kit's own timeouts end every wait well before these.
KIT_RUN_TIMEOUT = 1800
SHORT_RUN_TIMEOUT = 900
PROBE_FAILURE_MAX_S = 20.0  # no boot: reading the kernel file and printing


def run_check(*args: str, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pyvmm.cli", "check", *args], cwd=REPO, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def junit_cases(path: Path) -> dict[str, tuple[str, str]]:
    """{testcase name: (PASS|FAIL|SKIP, message)} from the JUnit file."""
    suite = ET.parse(path).getroot().find("testsuite")
    out = {}
    for case in suite.findall("testcase"):
        failure, skipped = case.find("failure"), case.find("skipped")
        if failure is not None:
            out[case.get("name")] = ("FAIL", failure.text or "")
        elif skipped is not None:
            out[case.get("name")] = ("SKIP", skipped.get("message", ""))
        else:
            out[case.get("name")] = ("PASS", "")
    return out


def assert_kit_passed(kit: str, proc: subprocess.CompletedProcess, report: Path) -> None:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    cases = junit_cases(report)
    scenarios = [sc.name for sc in REGISTRY.scenarios(kit)]
    assert list(cases) == ["kernel-probe", "boot", "driver-check"] + scenarios
    assert {name: status for name, (status, _) in cases.items()} == {name: "PASS" for name in cases}, cases
    assert f"pyvmm check {kit}: PASSED: {len(cases)} passed, 0 failed" in proc.stdout


def test_virtio_mem_kit_passes_on_the_default_guest(tmp_path: Path) -> None:
    report = tmp_path / "virtio-mem.xml"
    proc, _ = run_check("virtio-mem", "--junit", str(report), timeout=KIT_RUN_TIMEOUT)
    assert_kit_passed("virtio-mem", proc, report)


def test_hv_balloon_kit_passes_on_the_default_guest(tmp_path: Path) -> None:
    report = tmp_path / "hv-balloon.xml"
    proc, _ = run_check("hv-balloon", "--junit", str(report), timeout=KIT_RUN_TIMEOUT)
    assert_kit_passed("hv-balloon", proc, report)


def test_kernel_without_virtio_mem_fails_at_once_without_booting(tmp_path: Path) -> None:
    kernel = stubkernel.hello_poweroff(tmp_path / "no-virtio-mem.elf")
    report = tmp_path / "stub.xml"
    proc, seconds = run_check("virtio-mem", "--kernel", str(kernel), "--junit", str(report),
                              timeout=SHORT_RUN_TIMEOUT)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert seconds < PROBE_FAILURE_MAX_S
    assert "the kernel lacks CONFIG_VIRTIO_MMIO, CONFIG_VIRTIO_MEM" in proc.stdout
    assert "CONFIG_VIRTIO_MEM is not enabled in this kernel (the virtio-mem driver)" in proc.stdout
    cases = junit_cases(report)
    assert cases["kernel-probe"][0] == "FAIL" and "CONFIG_VIRTIO_MEM" in cases["kernel-probe"][1]
    assert "boot" not in cases  # nothing was booted
    assert {status for name, (status, _) in cases.items() if name != "kernel-probe"} == {"SKIP"}


def test_kernel_onlining_fails_the_movable_scenario_clearly(tmp_path: Path) -> None:
    report = tmp_path / "online-kernel.xml"
    proc, seconds = run_check("virtio-mem", "--append", "memhp_default_state=online_kernel",
                              "--scenarios", "movable-onlining", "--junit", str(report), timeout=SHORT_RUN_TIMEOUT)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    cases = junit_cases(report)
    assert [(n, s) for n, (s, _) in cases.items()] == [
        ("kernel-probe", "PASS"), ("boot", "PASS"), ("driver-check", "PASS"), ("movable-onlining", "FAIL")]
    message = cases["movable-onlining"][1]
    assert "onlined to zone Normal, not Movable" in message
    assert "memhp_default_state=online_movable" in message
    assert "movable-onlining           FAIL" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
