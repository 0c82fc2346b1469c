"""virtio-mem with the real Linux guest: plug, unplug, memslots, data integrity, reboot.

Every QMP command here goes through the reference client, qemu.qmp; the guest's side of
each fact comes from the agent. One guest with two devices serves every check, in order. Plugging is per-page onlining work
in the guest kernel, slow where that kernel code is interpreted (about 3 s per 128 MiB on a
PVM host), so the timeouts are generous.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError, QMPClient

import pyvmm
from tests.integration.guest_support import BOOT_TIMEOUT, REBOOT_TIMEOUT, require_guest
from tests.procfs import region_rss
from pyvmm.plot import plot_file
from pyvmm.plot_data import PLUGGED
from tests.qemu_qmp import next_event, qmp_session

MiB = 1 << 20
MEMORY = 256 * MiB
PLUG_TIMEOUT = 300.0

pytestmark = [pytest.mark.guest, require_guest()]


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    with pyvmm.VM(memory=MEMORY, boot_timeout=BOOT_TIMEOUT,
                  log_path=tmp_path_factory.mktemp("console") / "console.log",
                  trace=tmp_path_factory.mktemp("trace") / "trace.jsonl",
                  virtio_mem=["id=vm0,size=2G", "id=vm1,size=1G,memslot-size=256M"]) as vm:
        vm.agent.wait_ready(BOOT_TIMEOUT)
        yield vm


def qmp(vm: pyvmm.VM, command: str, args: dict | None = None):
    """One command through qemu.qmp."""
    async def body(client: QMPClient):
        return await client.execute(command, args)
    return qmp_session(vm, body)


def device_info(vm: pyvmm.VM, dev: str) -> dict:
    for entry in qmp(vm, "query-memory-devices"):
        if entry["type"] == "virtio-mem" and entry["data"]["id"] == dev:
            return entry["data"]
    raise AssertionError(f"query-memory-devices has no {dev}")


def request(vm: pyvmm.VM, dev: str, size: int) -> None:
    qmp(vm, "qom-set", {"path": f"/machine/peripheral/{dev}", "property": "requested-size", "value": size})


def wait_plugged(vm: pyvmm.VM, dev: str, size: int) -> None:
    """Wait until the device says the guest has plugged exactly `size` (QEMU's `size`)."""
    deadline = time.monotonic() + PLUG_TIMEOUT
    while device_info(vm, dev)["size"] != size:
        assert time.monotonic() < deadline, f"{dev} did not reach {size} bytes plugged"
        time.sleep(0.5)


def request_and_wait(vm: pyvmm.VM, dev: str, size: int) -> dict:
    """qom-set requested-size, then wait for the MEMORY_DEVICE_SIZE_CHANGE that reports it."""
    async def body(client: QMPClient) -> dict:
        with client.listener() as listener:
            await client.execute("qom-set", {"path": f"/machine/peripheral/{dev}",
                                             "property": "requested-size", "value": size})
            while True:
                event = await next_event(listener, "MEMORY_DEVICE_SIZE_CHANGE", PLUG_TIMEOUT)
                if event["data"]["id"] == dev and event["data"]["size"] == size:
                    return event
    event = qmp_session(vm, body)
    assert device_info(vm, dev)["size"] == size
    return event


def slots_of(vm: pyvmm.VM, dev: str) -> list[dict]:
    return [s for s in qmp(vm, "query-memslots") if s["owner"] == f"virtio-mem:{dev}"]


def test_guest_binds_both_devices(vm: pyvmm.VM) -> None:
    drivers = [d.get("driver") for d in vm.agent.devices() if d.get("bus") == "virtio"]
    assert drivers.count("virtio_mem") == 2, vm.agent.devices()
    assert slots_of(vm, "vm0") == [] and slots_of(vm, "vm1") == []


def check_block_runs(vm: pyvmm.VM, dev: str, plugged: int) -> dict:
    """The live block map (x-pyvmm-query-virtio-mem-blocks, `info virtio-mem`) adds up to the
    plugged size and agrees with query-memslots about which runs have a mapped slot."""
    answer = qmp(vm, "x-pyvmm-query-virtio-mem-blocks", {"id": dev})
    runs = answer["runs"]
    assert answer["size"] == plugged
    assert sum(r["blocks"] for r in runs if r["state"] == "plugged") * answer["block-size"] == plugged
    assert runs[0]["start"] == answer["memaddr"] and runs[-1]["end"] == answer["memaddr"] + answer["max-size"] - 1
    slots = slots_of(vm, dev)
    assert len(slots) == answer["memslots-mapped"]

    def mapped(gpa: int) -> bool:
        return any(s["gpa"] <= gpa < s["gpa"] + s["size"] for s in slots)
    for run in runs:
        assert mapped(run["start"]) == run["memslot-mapped"] == mapped(run["end"])
    text = qmp(vm, "human-monitor-command", {"command-line": f"info virtio-mem {dev}"})
    lines = text.split("\r\n")
    assert lines[0].startswith(f'virtio-mem "{dev}": ')
    assert sum(line.endswith("  plugged") for line in lines) == sum(r["state"] == "plugged" for r in runs)
    return answer


def test_plug_512m_grows_memtotal_and_maps_slots(vm: pyvmm.VM) -> None:
    before = vm.agent.meminfo()["MemTotal"]
    event = request_and_wait(vm, "vm0", 512 * MiB)
    assert event["data"]["qom-path"] == "/machine/peripheral/vm0"
    vm.wait_for(lambda: vm.agent.meminfo()["MemTotal"] - before == 512 * MiB, 120,
                what="MemTotal to grow by 512 MiB")
    slots = slots_of(vm, "vm0")
    assert sum(s["size"] for s in slots) == 512 * MiB  # 128 MiB slots, exactly the plugged ones
    info = device_info(vm, "vm0")
    assert info["requested-size"] == 512 * MiB
    assert all(info["memaddr"] <= s["gpa"] < info["memaddr"] + info["max-size"] for s in slots)
    check_block_runs(vm, "vm0", 512 * MiB)


def test_data_survives_plugging_and_unplugging_other_blocks(vm: pyvmm.VM) -> None:
    # Pattern writes are interpreted guest-kernel work (~5 s per MiB on a PVM host).
    vm.agent.pattern_fill("/tmp/pattern", 8 * MiB, seed=1234)
    request_and_wait(vm, "vm1", 256 * MiB)
    assert len(slots_of(vm, "vm1")) == 1  # one 256 MiB slot
    request_and_wait(vm, "vm1", 0)
    assert slots_of(vm, "vm1") == []
    assert vm.agent.pattern_verify("/tmp/pattern", seed=1234)
    vm.agent.pattern_free("/tmp/pattern")


def test_unplug_to_zero_shrinks_memtotal_removes_slots_and_frees_host_memory(vm: pyvmm.VM) -> None:
    info = device_info(vm, "vm0")
    slot = slots_of(vm, "vm0")[0]
    host_lo = slot["host-addr"] - (slot["gpa"] - info["memaddr"])
    host_hi = host_lo + info["max-size"]
    # tmpfs pages are movable allocations, which prefer ZONE_MOVABLE: only the plugged memory has it.
    vm.agent.pattern_fill("/tmp/in-plugged", 8 * MiB, seed=99)
    resident = region_rss(vm.pid, host_lo, host_hi)
    assert resident >= 4 * MiB, "the guest's data should have landed in the plugged memory"
    vm.agent.pattern_free("/tmp/in-plugged")
    total = vm.agent.meminfo()["MemTotal"]
    request_and_wait(vm, "vm0", 0)
    vm.wait_for(lambda: total - vm.agent.meminfo()["MemTotal"] == 512 * MiB, 120,
                what="MemTotal to shrink by 512 MiB")
    assert slots_of(vm, "vm0") == []
    check_block_runs(vm, "vm0", 0)
    assert qmp(vm, "human-monitor-command", {"command-line": "info virtio-mem nope"}) == \
        "Error: Device 'nope' not found\r\n"
    # Unplugged memory is discarded on the host: nothing of the region stays resident.
    assert region_rss(vm.pid, host_lo, host_hi) < 1 * MiB


def test_qmp_rejects_bad_values(vm: pyvmm.VM) -> None:
    for path, value in (("vm0", 12345), ("vm0", 3 << 30), ("no-such-device", 0), ("vm0", "big")):
        with pytest.raises(ExecuteError) as err:
            request(vm, path, value)
        assert err.value.error_class in ("GenericError", "DeviceNotFound")
    assert device_info(vm, "vm0")["requested-size"] == 0


def test_reboot_leaves_nothing_plugged(vm: pyvmm.VM) -> None:
    request_and_wait(vm, "vm0", 256 * MiB)

    async def reset(client: QMPClient) -> None:
        with client.listener() as listener:
            await client.execute("system_reset")
            await next_event(listener, "RESET", 30)
    qmp_session(vm, reset)
    # Right after the reset, before the new kernel's driver loads: nothing plugged, no slot.
    assert device_info(vm, "vm0")["size"] == 0
    assert slots_of(vm, "vm0") == [] and slots_of(vm, "vm1") == []
    # requested-size survives the reset (as on QEMU): the rebooted guest plugs it again.
    vm.agent.wait_ready(REBOOT_TIMEOUT)
    wait_plugged(vm, "vm0", 256 * MiB)


def test_python_api_handle_and_powerdown(vm: pyvmm.VM) -> None:
    # The API that benchmarks and later issues use, on the same devices.
    vm.virtio_mem["vm1"].request(128 * MiB)
    vm.virtio_mem["vm1"].wait_plugged(128 * MiB, PLUG_TIMEOUT)
    assert vm.virtio_mem["vm1"].info()["size"] == 128 * MiB
    assert vm.powerdown(timeout=REBOOT_TIMEOUT) == 0
    assert "reboot: Power down" in vm.console_text


def test_trace_records_the_run(vm: pyvmm.VM) -> None:
    """The --trace file of this module's run: every kind of event the checks above caused,
    and a block map rebuilt from the acknowledged requests that ends where the device did."""
    if vm.returncode is None:  # run on its own: end the VM so the trace is complete
        assert vm.powerdown(timeout=REBOOT_TIMEOUT) == 0
    events = [json.loads(line) for line in vm.trace_path.read_text().splitlines()]
    assert events[0]["ev"] == "trace-start" and events[0]["version"] == 1
    assert events[-1] == {"t": events[-1]["t"], "ev": "trace-end", "dropped": 0}
    assert [e["t"] for e in events] == sorted(e["t"] for e in events)
    devices = {e["id"]: e for e in events if e["ev"] == "virtio-mem.device"}
    assert set(devices) == {"vm0", "vm1"} and devices["vm1"]["slot-size"] == 256 * MiB

    answers = Counter((e["id"], e["type"], e["resp"]) for e in events if e["ev"] == "virtio-mem.response")
    for dev in ("vm0", "vm1"):
        assert answers[(dev, "plug", "ack")] > 0 and answers[(dev, "unplug", "ack")] > 0, answers
    requests = sum(1 for e in events if e["ev"] == "virtio-mem.request")
    assert requests == sum(answers.values())
    slots = Counter((e["ev"], e["owner"]) for e in events if e["ev"].startswith("memslot."))
    for dev in ("vm0", "vm1"):
        assert slots[("memslot.add", f"virtio-mem:{dev}")] > 0 and slots[("memslot.remove", f"virtio-mem:{dev}")] > 0
    assert slots[("memslot.add", "ram")] >= 1
    assert any(e["ev"] == "virtio-mem.reset" and e["id"] == "vm0" for e in events)
    qom_sets = Counter(e["result"] for e in events if e["ev"] == "qmp.command" and e["command"] == "qom-set")
    assert qom_sets["ok"] >= 6 and sum(n for r, n in qom_sets.items() if r != "ok") == 4, qom_sets

    # The format's block-map rule: start unplugged, apply acked plug/unplug/unplug-all, reset clears.
    plugged: dict[str, set[int]] = {dev: set() for dev in devices}
    last_size: dict[str, int] = {}
    for e in events:
        if e["ev"] == "virtio-mem.response" and e["resp"] == "ack" and e["type"] in ("plug", "unplug", "unplug-all"):
            d = devices[e["id"]]
            first = (e["addr"] - d["addr"]) // d["block-size"]
            blocks = set(range(first, first + e["nb-blocks"]))
            if e["type"] == "plug":
                plugged[e["id"]] |= blocks
            elif e["type"] == "unplug":
                plugged[e["id"]] -= blocks
            else:
                plugged[e["id"]].clear()
        elif e["ev"] == "virtio-mem.reset":
            plugged[e["id"]].clear()
        elif e["ev"] == "virtio-mem.size":
            last_size[e["id"]] = e["size"]
    assert {dev: len(b) * devices[dev]["block-size"] for dev, b in plugged.items()} == last_size
    assert last_size == {"vm0": 256 * MiB, "vm1": 128 * MiB}

    summary = subprocess.run([sys.executable, "-m", "pyvmm.cli", "trace", "summary", str(vm.trace_path)],
                             capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert summary.returncode == 0, summary.stderr
    assert "plug ack" in summary.stdout and "qom-set" in summary.stdout

    # `pyvmm plot` of the same trace: check the data behind the picture, not its pixels.
    png = vm.trace_path.with_suffix(".png")
    data = plot_file(vm.trace_path, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    for dev in ("vm0", "vm1"):
        line = data.virtio_mem[dev]
        assert line.plugged.value_at(data.duration) == last_size[dev]
        assert line.plugged.peak() == {"vm0": 512 * MiB, "vm1": 256 * MiB}[dev]
        assert line.requested.value_at(data.duration) == last_size[dev]
        assert line.resets if dev == "vm0" else True
        blocks = line.blocks
        if blocks.blocks_per_row == 1:  # one block per row: the map is exact
            assert blocks.states_at(data.duration).count(PLUGGED) * blocks.block_size == last_size[dev]
    assert data.memslots.size_by_owner["virtio-mem:vm0"].peak() == 512 * MiB
