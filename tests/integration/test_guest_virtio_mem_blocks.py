"""`info virtio-mem vm0` and `x-pyvmm-query-virtio-mem-blocks` while the real guest plugs.

One guest; the block runs it reports must add up to the device's plugged size and agree
with `query-memslots` about which slots are mapped.
"""

from __future__ import annotations

import pytest

import pyvmm
from tests.integration.guest_support import BOOT_TIMEOUT, require_guest

MiB = 1 << 20
PLUG_TIMEOUT = 300.0

pytestmark = [pytest.mark.guest, require_guest()]


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    with pyvmm.VM(memory=256 * MiB, boot_timeout=BOOT_TIMEOUT,
                  log_path=tmp_path_factory.mktemp("console") / "console.log",
                  virtio_mem=["id=vm0,size=1G"]) as vm:
        vm.agent.wait_ready(BOOT_TIMEOUT)
        yield vm


def check_runs_against_memslots(vm: pyvmm.VM, plugged: int) -> dict:
    answer = vm.qmp.execute("x-pyvmm-query-virtio-mem-blocks", {"id": "vm0"})
    runs = answer["runs"]
    assert answer["size"] == plugged
    assert sum(r["blocks"] for r in runs if r["state"] == "plugged") * answer["block-size"] == plugged
    assert runs[0]["start"] == answer["memaddr"]
    assert runs[-1]["end"] == answer["memaddr"] + answer["max-size"] - 1
    slots = [s for s in vm.qmp.execute("query-memslots") if s["owner"] == "virtio-mem:vm0"]
    assert len(slots) == answer["memslots-mapped"]

    def mapped(gpa: int) -> bool:
        return any(s["gpa"] <= gpa < s["gpa"] + s["size"] for s in slots)

    for run in runs:
        assert mapped(run["start"]) == run["memslot-mapped"] == mapped(run["end"])
    return answer


def test_plugged_runs_match_the_device_and_its_memslots(vm: pyvmm.VM) -> None:
    check_runs_against_memslots(vm, 0)
    vm.virtio_mem["vm0"].request(256 * MiB)
    vm.virtio_mem["vm0"].wait_plugged(256 * MiB, timeout=PLUG_TIMEOUT)
    answer = check_runs_against_memslots(vm, 256 * MiB)
    text = vm.qmp.hmp("info virtio-mem vm0")
    lines = text.split("\r\n")
    assert lines[0].startswith('virtio-mem "vm0": ')
    assert "size (plugged): 256 MiB" in lines[1]
    assert sum(line.endswith("  plugged") for line in lines) == \
        sum(r["state"] == "plugged" for r in answer["runs"])


def test_after_shrinking_the_runs_still_agree(vm: pyvmm.VM) -> None:
    vm.virtio_mem["vm0"].request(128 * MiB)
    vm.virtio_mem["vm0"].wait_plugged(128 * MiB, timeout=PLUG_TIMEOUT)
    check_runs_against_memslots(vm, 128 * MiB)
    assert vm.qmp.hmp("info virtio-mem nope") == "Error: Device 'nope' not found\r\n"
