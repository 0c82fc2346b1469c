"""`info virtio-mem ID` and `x-pyvmm-query-virtio-mem-blocks` against a real VirtioMem.

The device is driven through `handle_request`, the decoded-request path its virtqueue uses;
its memslots go to a real MemslotManager whose KVM backend only records the calls. Commands
run through the real CommandTable (argument checks included) and HmpTable.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from devices.virtio.mem import (
    VIRTIO_MEM_REQ_PLUG,
    VIRTIO_MEM_REQ_UNPLUG,
    VIRTIO_MEM_REQ_UNPLUG_ALL,
    VIRTIO_MEM_RESP_ACK,
    VirtioMem,
)
from pyvmm.qmp.commands import CommandContext, CommandTable, QmpCommandError
from pyvmm.qmp.hmp import HmpTable
from pyvmm.qmp.memory_commands import register_memory_commands
from pyvmm.qmp.virtio_mem_blocks import MAX_HMP_RUNS, block_map_runs, exact_size
from vmm.memslots import MemslotManager

MiB, GiB = 1 << 20, 1 << 30
ADDR = 0x140000000
BS = 2 * MiB
SLOT = 8 * MiB  # 4 blocks per memslot, so runs cross slots in a small region


class RecordingKvm:
    """Stands in for KVM's KVM_SET_USER_MEMORY_REGION: accepts and records."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []

    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0) -> None:
        self.calls.append((slot, gpa, size))


@pytest.fixture
def machine():
    slots = MemslotManager(RecordingKvm())
    dev = VirtioMem("vm0", ADDR, 32 * MiB, memslots=slots, memslot_size=SLOT, requested_size=24 * MiB)
    yield SimpleNamespace(virtio_mem={"vm0": dev}, slots=slots)
    dev.close()


@pytest.fixture
def tables(machine):
    commands, hmp = CommandTable(), HmpTable()
    register_memory_commands(commands, hmp, machine)
    return commands, hmp


def request(dev: VirtioMem, req: int, block: int = 0, nb: int = 0) -> None:
    resp, _ = dev.handle_request(req, ADDR + block * BS if req != VIRTIO_MEM_REQ_UNPLUG_ALL else 0, nb)
    assert resp == VIRTIO_MEM_RESP_ACK


def query(commands: CommandTable, **args):
    return commands.get("x-pyvmm-query-virtio-mem-blocks").run(args, CommandContext(None, commands))


def runs_of(dev: VirtioMem) -> list[tuple[int, int, str]]:
    return [(r["first-block"], r["blocks"], r["state"]) for r in block_map_runs(dev)]


def test_runs_split_unplugged_blocks_by_memslot_mapping(machine) -> None:
    dev = machine.virtio_mem["vm0"]  # 16 blocks, 4 slots of 4 blocks
    assert runs_of(dev) == [(0, 16, "unplugged")]
    request(dev, VIRTIO_MEM_REQ_PLUG, 1, 2)   # slot 0 mapped
    request(dev, VIRTIO_MEM_REQ_PLUG, 6, 4)   # slots 1 and 2 mapped
    assert runs_of(dev) == [(0, 1, "protected"), (1, 2, "plugged"), (3, 3, "protected"),
                            (6, 4, "plugged"), (10, 2, "protected"), (12, 4, "unplugged")]
    request(dev, VIRTIO_MEM_REQ_UNPLUG, 1, 2)  # slot 0 empties and goes
    assert runs_of(dev) == [(0, 4, "unplugged"), (4, 2, "protected"), (6, 4, "plugged"),
                            (10, 2, "protected"), (12, 4, "unplugged")]
    request(dev, VIRTIO_MEM_REQ_UNPLUG_ALL)
    assert runs_of(dev) == [(0, 16, "unplugged")]


def test_runs_cover_the_region_and_agree_with_the_device(machine) -> None:
    dev = machine.virtio_mem["vm0"]
    for block in (0, 3, 4, 9, 15):
        request(dev, VIRTIO_MEM_REQ_PLUG, block, 1)
    runs = block_map_runs(dev)
    assert runs[0]["start"] == ADDR and runs[-1]["end"] == ADDR + dev.region_size - 1
    for a, b in zip(runs, runs[1:]):
        assert b["start"] == a["end"] + 1
        assert a["state"] != b["state"]  # neighbours in one state would be one run
    for run in runs:
        for block in range(run["first-block"], run["first-block"] + run["blocks"]):
            gpa = ADDR + block * BS
            assert dev.is_plugged(gpa) == (run["state"] == "plugged")
            assert dev.slots.is_mapped(block * BS // SLOT) == run["memslot-mapped"]
    assert sum(r["blocks"] for r in runs if r["state"] == "plugged") * BS == dev.plugged_size


def test_qmp_query_returns_sizes_and_runs(machine, tables) -> None:
    commands, _ = tables
    dev = machine.virtio_mem["vm0"]
    request(dev, VIRTIO_MEM_REQ_PLUG, 4, 4)
    answer = query(commands, id="vm0")
    assert {k: v for k, v in answer.items() if k != "runs"} == {
        "id": "vm0", "memaddr": ADDR, "max-size": 32 * MiB, "block-size": BS, "memslot-size": SLOT,
        "requested-size": 24 * MiB, "size": 8 * MiB, "usable-region-size": 32 * MiB,
        "memslots": 4, "memslots-mapped": 1}
    assert answer["runs"][1] == {"start": ADDR + 8 * MiB, "end": ADDR + 16 * MiB - 1, "first-block": 4,
                                 "blocks": 4, "state": "plugged", "memslot-mapped": True}


def test_qmp_query_errors(tables) -> None:
    commands, _ = tables
    with pytest.raises(QmpCommandError) as unknown:
        query(commands, id="nope")
    assert (unknown.value.qmp_error_class, unknown.value.desc) == ("DeviceNotFound", "Device 'nope' not found")
    with pytest.raises(QmpCommandError, match="Parameter 'id' is missing"):
        query(commands)
    with pytest.raises(QmpCommandError, match="expected: string"):
        query(commands, id=3)


def test_hmp_info_virtio_mem_text(machine, tables) -> None:
    _, hmp = tables
    dev = machine.virtio_mem["vm0"]
    request(dev, VIRTIO_MEM_REQ_PLUG, 0, 3)
    text = hmp.execute("info virtio-mem vm0")
    assert text == (
        'virtio-mem "vm0": 0x140000000-0x141ffffff, 32 MiB in 16 blocks of 2 MiB, memslot size 8 MiB\r\n'
        "  requested-size: 24 MiB, size (plugged): 6 MiB, usable-region-size: 32 MiB, memslots mapped: 1 of 4\r\n"
        "  0x140000000-0x1405fffff   3 blocks  plugged\r\n"
        "  0x140600000-0x1407fffff   1 block   unplugged, memslot mapped (protected)\r\n"
        "  0x140800000-0x141ffffff  12 blocks  unplugged, no memslot\r\n")
    assert "info virtio-mem -- " in hmp.execute("info")


def test_hmp_errors_are_one_line(machine, tables) -> None:
    _, hmp = tables
    assert hmp.execute("info virtio-mem nope") == "Error: Device 'nope' not found\r\n"
    assert hmp.execute("info virtio-mem") == "Error: Parameter 'id' is missing (virtio-mem devices: vm0)\r\n"
    assert hmp.execute("info virtio-mem vm0 more") == "virtio-mem: extraneous characters at the end of line\r\n"
    machine.virtio_mem.clear()
    assert hmp.execute("info virtio-mem") == "Error: Parameter 'id' is missing (virtio-mem devices: none)\r\n"


def test_hmp_caps_the_number_of_runs(machine, tables) -> None:
    _, hmp = tables
    slots = machine.slots
    # 1024 blocks, every other one plugged: 1024 runs, 16 memslots all mapped
    dev = VirtioMem("big", ADDR + GiB, 2 * GiB, memslots=slots, memslot_size=128 * MiB, requested_size=2 * GiB)
    machine.virtio_mem["big"] = dev
    try:
        for block in range(0, 1024, 2):
            request_at(dev, block)
        lines = hmp.execute("info virtio-mem big").split("\r\n")
        assert len(block_map_runs(dev)) == 1024
        run_lines = [line for line in lines if line.startswith("  0x")]
        assert len(run_lines) == MAX_HMP_RUNS
        assert lines[-2] == f"  ... {1024 - MAX_HMP_RUNS} more runs (x-pyvmm-query-virtio-mem-blocks lists them all)"
    finally:
        dev.close()


def request_at(dev: VirtioMem, block: int) -> None:
    resp, _ = dev.handle_request(VIRTIO_MEM_REQ_PLUG, dev.addr + block * dev.block_size, 1)
    assert resp == VIRTIO_MEM_RESP_ACK


@pytest.mark.parametrize("n, text", [(0, "0 B"), (5, "5 B"), (4096, "4 KiB"), (1280 * MiB, "1280 MiB"),
                                     (3 * GiB, "3 GiB"), (1 << 40, "1 TiB")])
def test_exact_size(n: int, text: str) -> None:
    assert exact_size(n) == text
