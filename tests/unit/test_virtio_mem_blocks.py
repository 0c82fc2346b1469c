"""`info virtio-mem ID` and `x-pyvmm-query-virtio-mem-blocks` against a real VirtioMem.

The device sits behind the real virtio-mmio transport and gets its requests through a real
virtqueue from the test driver (tests/virtio_driver.py); its memslots go to a real
MemslotManager whose KVM backend only records the calls (or refuses one). Commands run
through the real CommandTable (argument checks included) and HmpTable.
"""

from __future__ import annotations

import struct

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
from devices.virtio.mmio import VirtioMmioTransport
from tests.virtio_driver import ALL_FEATURES, VirtioMmioDriver
from vmm.hostmem import HostMapping
from vmm.memory import GuestMemory
from vmm.memslots import MemslotManager

MiB, GiB = 1 << 20, 1 << 30
ADDR = 0x140000000
BS = 2 * MiB
SLOT = 8 * MiB  # 4 blocks per memslot, so runs cross slots in a small region
RAM_SIZE = 1 * MiB  # holds the virtqueue and the request buffers
REQ = struct.Struct("<H6xQH6x")   # struct virtio_mem_req
RESP = struct.Struct("<H6xH")     # struct virtio_mem_resp


class RecordingKvm:
    """Stands in for KVM's KVM_SET_USER_MEMORY_REGION: records, refuses slots at `refuse_gpa`."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []
        self.refuse_gpa: int | None = None

    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0) -> None:
        if size and gpa == self.refuse_gpa:
            raise OSError(28, "No space left on device")
        self.calls.append((slot, gpa, size))


class Guest:
    """Guest RAM and a driver that has set up each device's virtqueue."""

    def __init__(self) -> None:
        self.kvm = RecordingKvm()
        self.slots = MemslotManager(self.kvm)
        self.ram = HostMapping(RAM_SIZE, "anon", "test-ram")
        self.slots.add(0, RAM_SIZE, self.ram, 0, "ram")
        self.mem = GuestMemory(self.slots)
        self.virtio_mem: dict[str, VirtioMem] = {}
        self.queues: dict[str, object] = {}

    def add(self, dev: VirtioMem) -> VirtioMem:
        transport = VirtioMmioTransport(dev, self.mem, lambda: None, dev.id)
        [self.queues[dev.id]] = VirtioMmioDriver(transport, self.mem).init(ALL_FEATURES)
        self.virtio_mem[dev.id] = dev
        return dev

    def close(self) -> None:
        for dev in self.virtio_mem.values():
            dev.close()
        self.ram.close()


@pytest.fixture
def machine():
    guest = Guest()
    guest.add(VirtioMem("vm0", ADDR, 32 * MiB, memslots=guest.slots, memslot_size=SLOT,
                        requested_size=24 * MiB))
    yield guest
    guest.close()


@pytest.fixture
def tables(machine):
    commands, hmp = CommandTable(), HmpTable()
    register_memory_commands(commands, hmp, machine)
    return commands, hmp


def send(machine: Guest, dev_id: str, req: int, block: int = 0, nb: int = 0) -> int:
    """One request through the device's virtqueue, as the guest driver sends it; the answer."""
    dev = machine.virtio_mem[dev_id]
    addr = dev.addr + block * dev.block_size if req != VIRTIO_MEM_REQ_UNPLUG_ALL else 0
    vq = machine.queues[dev_id]
    vq.add([REQ.pack(req, addr, nb)], [RESP.size])
    vq.kick()
    [used] = vq.get_used()
    return RESP.unpack(used.data[:RESP.size])[0]


def request(machine: Guest, req: int, block: int = 0, nb: int = 0, dev_id: str = "vm0") -> None:
    assert send(machine, dev_id, req, block, nb) == VIRTIO_MEM_RESP_ACK


def query(commands: CommandTable, **args):
    return commands.get("x-pyvmm-query-virtio-mem-blocks").run(args, CommandContext(None, commands))


def runs_of(dev: VirtioMem) -> list[tuple[int, int, str]]:
    return [(r["first-block"], r["blocks"], r["state"]) for r in block_map_runs(dev)]


def test_runs_split_unplugged_blocks_by_memslot_mapping(machine) -> None:
    dev = machine.virtio_mem["vm0"]  # 16 blocks, 4 slots of 4 blocks
    assert runs_of(dev) == [(0, 16, "unplugged")]
    request(machine, VIRTIO_MEM_REQ_PLUG, 1, 2)   # slot 0 mapped
    request(machine, VIRTIO_MEM_REQ_PLUG, 6, 4)   # slots 1 and 2 mapped
    assert runs_of(dev) == [(0, 1, "protected"), (1, 2, "plugged"), (3, 3, "protected"),
                            (6, 4, "plugged"), (10, 2, "protected"), (12, 4, "unplugged")]
    request(machine, VIRTIO_MEM_REQ_UNPLUG, 1, 2)  # slot 0 empties and goes
    assert runs_of(dev) == [(0, 4, "unplugged"), (4, 2, "protected"), (6, 4, "plugged"),
                            (10, 2, "protected"), (12, 4, "unplugged")]
    request(machine, VIRTIO_MEM_REQ_UNPLUG_ALL)
    assert runs_of(dev) == [(0, 16, "unplugged")]


def test_plugged_blocks_whose_memslot_kvm_refused_say_so(machine, tables) -> None:
    """The device answers a PLUG first and registers its slots after; if KVM refuses one,
    the blocks stay plugged (served through the MMIO trap) with no memslot."""
    dev = machine.virtio_mem["vm0"]
    machine.kvm.refuse_gpa = ADDR + SLOT            # slot 1 (blocks 4-7)
    request(machine, VIRTIO_MEM_REQ_PLUG, 2, 4)         # blocks 2-5: slots 0 and 1
    assert [(r["first-block"], r["blocks"], r["state"], r["memslot-mapped"]) for r in block_map_runs(dev)] == [
        (0, 2, "protected", True), (2, 2, "plugged", True), (4, 2, "plugged", False), (6, 10, "unplugged", False)]
    text = tables[1].execute("info virtio-mem vm0")
    assert "  0x140800000-0x140bfffff   2 blocks  plugged, no memslot (not registered yet, or KVM refused it)\r\n" in text
    assert "memslots mapped: 1 of 4" in text


def test_runs_cover_the_region_and_agree_with_the_device(machine) -> None:
    dev = machine.virtio_mem["vm0"]
    for block in (0, 3, 4, 9, 15):
        request(machine, VIRTIO_MEM_REQ_PLUG, block, 1)
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
    request(machine, VIRTIO_MEM_REQ_PLUG, 4, 4)
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
    request(machine, VIRTIO_MEM_REQ_PLUG, 0, 3)
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
    machine.virtio_mem["vm0"].close()
    machine.virtio_mem.clear()
    assert hmp.execute("info virtio-mem") == "Error: Parameter 'id' is missing (virtio-mem devices: none)\r\n"


def test_hmp_caps_the_number_of_runs(machine, tables) -> None:
    _, hmp = tables
    # 1024 blocks, every other one plugged: 1024 runs, 16 memslots all mapped
    dev = machine.add(VirtioMem("big", ADDR + GiB, 2 * GiB, memslots=machine.slots, memslot_size=128 * MiB,
                                requested_size=2 * GiB))
    for block in range(0, 1024, 2):
        request(machine, VIRTIO_MEM_REQ_PLUG, block, 1, dev_id="big")
    lines = hmp.execute("info virtio-mem big").split("\r\n")
    assert len(block_map_runs(dev)) == 1024
    run_lines = [line for line in lines if line.startswith("  0x")]
    assert len(run_lines) == MAX_HMP_RUNS
    assert lines[-2] == f"  ... {1024 - MAX_HMP_RUNS} more runs (x-pyvmm-query-virtio-mem-blocks lists them all)"


@pytest.mark.parametrize("n, text", [(0, "0 B"), (5, "5 B"), (4096, "4 KiB"), (1280 * MiB, "1280 MiB"),
                                     (3 * GiB, "3 GiB"), (1 << 40, "1 TiB")])
def test_exact_size(n: int, text: str) -> None:
    assert exact_size(n) == text
