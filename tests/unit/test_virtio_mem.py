"""Tests for the virtio-mem device: requests through a real virtqueue, dynamic memslots,
discard and protection of unplugged memory, the control-plane API and hostile drivers.

Guest RAM is a real HostMapping registered in a MemslotManager whose KVM backend only records
KVM_SET_USER_MEMORY_REGION calls; the device sits behind the real virtio-mmio transport and is
driven by the test driver model in tests/virtio_driver.py, as Linux's driver would.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from devices.virtio.mem import (
    VIRTIO_MEM_F_ACPI_PXM,
    VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
    VIRTIO_MEM_REQ_PLUG,
    VIRTIO_MEM_REQ_STATE,
    VIRTIO_MEM_REQ_UNPLUG,
    VIRTIO_MEM_REQ_UNPLUG_ALL,
    VIRTIO_MEM_RESP_ACK,
    VIRTIO_MEM_RESP_BUSY,
    VIRTIO_MEM_RESP_ERROR,
    VIRTIO_MEM_RESP_NACK,
    VIRTIO_MEM_STATE_MIXED,
    VIRTIO_MEM_STATE_PLUGGED,
    VIRTIO_MEM_STATE_UNPLUGGED,
    VIRTIO_MEM_USABLE_EXTENT,
    VirtioMem,
)
from devices.virtio.mem_slots import DEFAULT_MEMSLOT_SIZE, default_memslot_size
from devices.virtio.mmio import VirtioMmioTransport
from tests.virtio_driver import ALL_FEATURES, INT_CONFIG, S_NEEDS_RESET, VirtioMmioDriver
from vmm.hostmem import HostMapping, HostMemoryError
from vmm.memory import GuestMemory, GuestMemoryError
from vmm.memslots import MemslotManager
from tests.procfs import maps_perms

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
PAGE = 4096
RAM_SIZE = 1 * MiB
REGION_GPA = 128 * MiB  # above RAM, 128 MiB aligned, as the machine places it
BS = 2 * MiB            # the default block size

REQ = struct.Struct("<H6xQH6x")
RESP = struct.Struct("<H6xH")
# config field offsets (struct virtio_mem_config)
CFG_BLOCK_SIZE, CFG_NODE_ID, CFG_ADDR, CFG_REGION_SIZE = 0, 8, 16, 24
CFG_USABLE, CFG_PLUGGED, CFG_REQUESTED = 32, 40, 48


class RecordingBackend:
    """Stands in for KVM: records KVM_SET_USER_MEMORY_REGION calls, can fail the next one."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int, int, int]] = []
        self.fail_gpa: int | None = None  # refuse the next add of a slot at this GPA

    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0) -> None:
        if size and gpa == self.fail_gpa:
            self.fail_gpa = None
            raise OSError(28, "No space left on device")
        self.calls.append((slot, gpa, size, host_addr, flags))

    def adds(self) -> list[tuple[int, int]]:
        return [(gpa, size) for _, gpa, size, _, _ in self.calls if size]

    def removes(self) -> list[int]:
        return [gpa for _, gpa, size, _, _ in self.calls if not size]


class Rig:
    """Guest RAM + a virtio-mem device behind virtio-mmio + a driver that has initialised it."""

    def __init__(self, region_size: int = 64 * MiB, requested: int = 0, wanted: int = ALL_FEATURES,
                 **kw) -> None:
        self.backend = RecordingBackend()
        self.slots = MemslotManager(self.backend)
        self.ram = HostMapping(RAM_SIZE, "anon", "test-ram")
        self.slots.add(0, RAM_SIZE, self.ram, 0, "ram")
        self.backend.calls.clear()
        self.mem = GuestMemory(self.slots)
        self.dev = VirtioMem("vmem0", kw.pop("addr", REGION_GPA), region_size, memslots=self.slots,
                             requested_size=requested, **kw)
        self.size_events: list[dict] = []
        self.access_events: list[dict] = []
        self.dev.size_change_listener = self.size_events.append
        self.dev.unplugged_access_listener = self.access_events.append
        self.irqs: list[int] = []
        self.transport = VirtioMmioTransport(self.dev, self.mem, lambda: self.irqs.append(1), "vmem0")
        self.drv = VirtioMmioDriver(self.transport, self.mem)
        [self.vq] = self.drv.init(wanted)

    def close(self) -> None:
        self.dev.close()
        self.ram.close()

    @property
    def bs(self) -> int:
        return self.dev.block_size

    def gpa(self, block: int) -> int:
        return self.dev.addr + block * self.bs

    def send(self, out: bytes, in_size: int = RESP.size) -> tuple[int, int] | None:
        """One chain through the queue; the (type, state) answer, or None if none came back."""
        self.vq.add([out], [in_size] if in_size else [])
        self.vq.kick()
        used = self.vq.get_used()
        if not used:
            return None
        [u] = used
        assert u.length == RESP.size
        return RESP.unpack(u.data[:RESP.size])

    def request(self, req_type: int, addr: int = 0, nb_blocks: int = 0) -> tuple[int, int]:
        answer = self.send(REQ.pack(req_type, addr, nb_blocks))
        assert answer is not None, self.transport.stats()["errors"]
        return answer

    def plug(self, block: int, n: int = 1) -> int:
        return self.request(VIRTIO_MEM_REQ_PLUG, self.gpa(block), n)[0]

    def unplug(self, block: int, n: int = 1) -> int:
        return self.request(VIRTIO_MEM_REQ_UNPLUG, self.gpa(block), n)[0]

    def state(self, block: int, n: int = 1) -> tuple[int, int]:
        return self.request(VIRTIO_MEM_REQ_STATE, self.gpa(block), n)

    def unplug_all(self) -> int:
        return self.request(VIRTIO_MEM_REQ_UNPLUG_ALL)[0]

    def cfg(self, offset: int, size: int = 8) -> int:
        return self.drv.config_read_int(offset, size)

    def needs_reset(self) -> bool:
        return bool(self.drv.status & S_NEEDS_RESET)

    def kvm_slots(self) -> list[tuple[int, int]]:
        return [(s.gpa, s.size) for s in self.slots.owned_by("virtio-mem:vmem0")]


@pytest.fixture
def rig_factory():
    rigs: list[Rig] = []

    def make(**kw) -> Rig:
        r = Rig(**kw)
        rigs.append(r)
        return r
    yield make
    for r in rigs:
        r.close()


@pytest.fixture
def rig(rig_factory) -> Rig:
    return rig_factory(requested=16 * MiB, memslot_size=8 * MiB)




def segfaults_in_child(mapping: HostMapping, offset: int) -> bool:
    """Read one byte of the host mapping, bypassing the device's guard, in a forked child."""
    pid = os.fork()
    if pid == 0:
        faulthandler.disable()
        try:
            HostMapping.read(mapping, offset, 1)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- discovery: config space and features ---------------------------------------------------
def test_config_space_as_the_driver_reads_it(rig: Rig) -> None:
    assert rig.drv.probe().device_id == 24
    assert rig.cfg(CFG_BLOCK_SIZE) == BS
    assert rig.cfg(CFG_NODE_ID, 2) == 0
    assert rig.cfg(CFG_ADDR) == REGION_GPA
    assert rig.cfg(CFG_REGION_SIZE) == 64 * MiB
    assert rig.cfg(CFG_USABLE) == 64 * MiB  # 16 MiB + 256 MiB, capped by the region
    assert rig.cfg(CFG_PLUGGED) == 0
    assert rig.cfg(CFG_REQUESTED) == 16 * MiB
    assert rig.dev.config_read(50, 16) == struct.pack("<Q", 16 * MiB)[2:] + bytes(10)  # zero-padded tail
    rig.drv.config_write(CFG_REQUESTED, struct.pack("<Q", 64 * MiB))  # read-only: ignored, counted
    assert rig.cfg(CFG_REQUESTED) == 16 * MiB and rig.dev.stats()["config-writes-ignored"] == 2


def test_features_inaccessible_always_pxm_only_with_a_node(rig_factory) -> None:
    plain = rig_factory()
    assert plain.drv.has_feature(VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE)
    assert not plain.drv.has_feature(VIRTIO_MEM_F_ACPI_PXM)
    numa = rig_factory(node=3)
    assert numa.drv.has_feature(VIRTIO_MEM_F_ACPI_PXM) and numa.cfg(CFG_NODE_ID, 2) == 3
    assert numa.dev.info()["node"] == 3


def test_driver_refusing_unplugged_inaccessible_fails_the_device(rig_factory) -> None:
    r = rig_factory(requested=4 * MiB, wanted=ALL_FEATURES & ~(1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE))
    assert r.needs_reset()
    assert "virtio-mem-feature" in r.transport.stats()["errors"]
    assert r.send(REQ.pack(VIRTIO_MEM_REQ_PLUG, r.gpa(0), 1)) is None
    assert r.dev.plugged_size == 0


# --- requests ---------------------------------------------------------------------------------
def test_plug_state_unplug_round_trip(rig: Rig) -> None:
    assert rig.plug(0, 4) == VIRTIO_MEM_RESP_ACK
    assert rig.cfg(CFG_PLUGGED) == rig.dev.plugged_size == 8 * MiB
    assert rig.state(0, 4) == (VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_STATE_PLUGGED)
    assert rig.state(2, 4) == (VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_STATE_MIXED)
    assert rig.state(4, 8) == (VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_STATE_UNPLUGGED)
    assert rig.unplug(1, 2) == VIRTIO_MEM_RESP_ACK
    assert rig.dev.block_runs() == [(0, 1, True), (1, 2, False), (3, 1, True), (4, 28, False)]
    assert rig.unplug(0) == rig.unplug(3) == VIRTIO_MEM_RESP_ACK
    assert rig.cfg(CFG_PLUGGED) == 0
    assert rig.irqs, "each answer interrupts the driver"
    assert rig.dev.stats()["requests"] == {"plug": {"ack": 1}, "state": {"ack": 3}, "unplug": {"ack": 3}}
    timing = rig.dev.stats()["request-time-us"]
    assert timing["count"] == 7 and 0 < timing["mean"] <= timing["max"]
    assert 0 < timing["p50"] <= timing["p99"] <= timing["max"]
    assert rig.dev.stats()["after-answer-us"]["count"] == 4  # 1 plug + 3 unplugs left work behind


def test_plug_beyond_requested_is_nacked_and_unplug_below_requested_is_not(rig_factory) -> None:
    r = rig_factory(requested=4 * MiB)
    assert r.plug(0, 3) == VIRTIO_MEM_RESP_NACK
    assert r.plug(0, 2) == VIRTIO_MEM_RESP_ACK
    assert r.plug(5) == VIRTIO_MEM_RESP_NACK
    # QEMU checks NACK before the block states: an already-plugged block over the limit is NACKed.
    assert r.plug(0) == VIRTIO_MEM_RESP_NACK
    r.dev.requested_size = 8 * MiB
    assert r.unplug(0) == VIRTIO_MEM_RESP_ACK  # 2 MiB plugged < 8 MiB requested: still allowed
    assert r.dev.stats()["requests"]["plug"] == {"ack": 1, "nack": 3}


def test_plug_of_plugged_and_unplug_of_unplugged_blocks_are_errors(rig: Rig) -> None:
    assert rig.plug(2, 2) == VIRTIO_MEM_RESP_ACK
    assert rig.plug(3, 2) == VIRTIO_MEM_RESP_ERROR    # block 3 already plugged
    assert rig.unplug(1, 2) == VIRTIO_MEM_RESP_ERROR  # block 1 is not
    assert rig.unplug(5) == VIRTIO_MEM_RESP_ERROR
    assert rig.dev.block_runs() == [(0, 2, False), (2, 2, True), (4, 28, False)]


U64 = (1 << 64) - 1


@pytest.mark.parametrize("req_type", [VIRTIO_MEM_REQ_PLUG, VIRTIO_MEM_REQ_UNPLUG, VIRTIO_MEM_REQ_STATE])
@pytest.mark.parametrize("case", ["unaligned", "below-region", "beyond-usable", "straddles-usable-end",
                                  "zero-blocks", "overflow", "far-beyond-region"])
def test_invalid_ranges_get_error(rig_factory, req_type: int, case: str) -> None:
    # A region larger than requested + 256 MiB, so "beyond usable" is still inside the region.
    r = rig_factory(region_size=1 * GiB, requested=4 * MiB, memslot_size=64 * MiB)
    usable = r.dev.usable_region_size
    assert usable == 4 * MiB + VIRTIO_MEM_USABLE_EXTENT < r.dev.region_size
    assert r.plug(0) == VIRTIO_MEM_RESP_ACK  # so UNPLUG/STATE would otherwise have work to do
    addr, nb = {
        "unaligned": (REGION_GPA + PAGE, 1),
        "below-region": (REGION_GPA - BS, 1),
        "beyond-usable": (REGION_GPA + usable, 1),
        "straddles-usable-end": (REGION_GPA + usable - BS, 2),
        "zero-blocks": (REGION_GPA, 0),
        "overflow": (U64 + 1 - BS, 2),            # addr + size wraps a u64
        "far-beyond-region": (REGION_GPA + 2 * GiB, 1),
    }[case]
    calls = list(r.backend.calls)
    assert r.request(req_type, addr, nb) == (VIRTIO_MEM_RESP_ERROR, 0)
    assert r.dev.plugged_size == BS and r.backend.calls == calls
    assert not r.needs_reset()


def test_max_nb_blocks_is_a_valid_size(rig_factory) -> None:
    r = rig_factory(region_size=1 * GiB, requested=1 * GiB, block_size=PAGE, memslot_size=128 * MiB)
    assert r.plug(0, 0xFFFF) == VIRTIO_MEM_RESP_ACK  # the largest u16, 256 MiB - 4 KiB
    assert r.dev.plugged_size == 0xFFFF * PAGE
    assert r.state(0, 0xFFFF) == (VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_STATE_PLUGGED)


def test_unknown_request_type_is_answered_error(rig: Rig) -> None:
    assert rig.request(7, rig.gpa(0), 1) == (VIRTIO_MEM_RESP_ERROR, 0)
    assert not rig.needs_reset()
    assert rig.dev.stats()["requests"] == {"unknown": {"error": 1}}
    assert rig.plug(0) == VIRTIO_MEM_RESP_ACK


def test_padding_and_extra_request_bytes_are_ignored(rig: Rig) -> None:
    raw = bytearray(REQ.pack(VIRTIO_MEM_REQ_PLUG, rig.gpa(0), 1))
    raw[2:8] = b"\xaa" * 6
    raw[18:24] = b"\xbb" * 6
    assert rig.send(bytes(raw) + b"trailing") == (VIRTIO_MEM_RESP_ACK, 0)


def test_unplug_all_empties_everything_and_resizes_usable(rig_factory) -> None:
    r = rig_factory(region_size=1 * GiB, requested=64 * MiB, memslot_size=32 * MiB)
    assert r.plug(0, 8) == VIRTIO_MEM_RESP_ACK and r.plug(20, 8) == VIRTIO_MEM_RESP_ACK
    assert len(r.kvm_slots()) == 2
    r.dev.requested_size = 0
    assert r.dev.usable_region_size == 64 * MiB + VIRTIO_MEM_USABLE_EXTENT  # never shrinks here
    assert r.unplug_all() == VIRTIO_MEM_RESP_ACK
    assert r.cfg(CFG_PLUGGED) == 0 and r.cfg(CFG_USABLE) == 0
    assert r.kvm_slots() == [] and r.dev.block_runs() == [(0, 512, False)]
    assert r.plug(0) == VIRTIO_MEM_RESP_ERROR  # nothing usable any more
    r.dev.requested_size = 8 * MiB
    assert r.unplug_all() == VIRTIO_MEM_RESP_ACK  # with nothing plugged: still ACK
    assert r.dev.usable_region_size == 8 * MiB + VIRTIO_MEM_USABLE_EXTENT


# --- hostile and malformed chains -------------------------------------------------------------
@pytest.mark.parametrize("out, in_size, key", [
    (REQ.pack(VIRTIO_MEM_REQ_PLUG, REGION_GPA, 1)[:16], RESP.size, "virtio-mem-bad-request"),
    (REQ.pack(VIRTIO_MEM_REQ_PLUG, REGION_GPA, 1), RESP.size - 2, "virtio-mem-bad-request"),
    (REQ.pack(VIRTIO_MEM_REQ_PLUG, REGION_GPA, 1), 0, "virtio-mem-bad-request"),
])
def test_malformed_request_needs_reset_and_does_nothing(rig: Rig, out: bytes, in_size: int, key: str) -> None:
    assert rig.send(out, in_size) is None
    assert rig.needs_reset() and key in rig.transport.stats()["errors"]
    assert rig.dev.plugged_size == 0 and rig.dev.stats()["malformed"] == 1
    # The driver resets and starts over; the device serves again.
    [rig.vq] = rig.drv.init()
    assert rig.plug(0) == VIRTIO_MEM_RESP_ACK


def test_descriptor_into_unplugged_memory_is_refused_not_a_crash(rig: Rig) -> None:
    assert rig.plug(0) == VIRTIO_MEM_RESP_ACK  # maps slot 0 (blocks 0..3); block 1 stays PROT_NONE
    rig.vq.write_desc(1, rig.gpa(0), 16, 2)          # writable, plugged
    rig.vq.write_desc(0, rig.gpa(1), 24, 1, next=1)  # the request: in unplugged block 1
    rig.vq.publish(0)
    rig.vq.kick()
    assert rig.needs_reset()
    assert rig.dev.stats()["unplugged-accesses"] >= 1
    assert rig.access_events[0]["gpa"] == rig.gpa(1) and rig.access_events[0]["device"] == "vmem0"


def test_response_buffer_in_a_block_the_request_unplugs(rig: Rig) -> None:
    """A hostile driver puts the response inside the block it unplugs: refused, no SIGSEGV."""
    assert rig.plug(0, 2) == VIRTIO_MEM_RESP_ACK
    req = rig.vq.alloc.alloc(24)
    rig.mem.write(req, REQ.pack(VIRTIO_MEM_REQ_UNPLUG, rig.gpa(1), 1))
    rig.vq.write_desc(1, rig.gpa(1), RESP.size, 2)
    rig.vq.write_desc(0, req, 24, 1, next=1)
    rig.vq.publish(0)
    rig.vq.kick()
    assert rig.needs_reset()
    assert rig.dev.plugged_size == BS  # the unplug itself happened; its answer could not be written
    assert rig.dev.stats()["internal-errors"] == 0
    assert "device-exception" not in rig.transport.stats()["errors"]


# --- usable region and requested size -------------------------------------------------------
def test_usable_region_grows_with_requested_and_never_shrinks_until_reset(rig_factory) -> None:
    r = rig_factory(region_size=2 * GiB, memslot_size=128 * MiB)
    assert r.cfg(CFG_USABLE) == 0 and r.cfg(CFG_REQUESTED) == 0
    gen, irqs = r.drv.readl(0xFC), len(r.irqs)
    r.dev.requested_size = 100 * MiB
    assert r.cfg(CFG_REQUESTED) == 100 * MiB and r.cfg(CFG_USABLE) == 100 * MiB + VIRTIO_MEM_USABLE_EXTENT
    assert r.drv.readl(0xFC) == gen + 1 and len(r.irqs) == irqs + 1
    assert r.drv.interrupt() & INT_CONFIG
    r.dev.requested_size = 50 * MiB
    assert r.cfg(CFG_USABLE) == 100 * MiB + VIRTIO_MEM_USABLE_EXTENT
    r.dev.requested_size = 2 * GiB
    assert r.cfg(CFG_USABLE) == 2 * GiB  # capped by the region
    r.dev.requested_size = 10 * MiB
    r.dev.system_reset()
    assert r.dev.usable_region_size == 10 * MiB + VIRTIO_MEM_USABLE_EXTENT


@pytest.mark.parametrize("value", [BS + PAGE, -BS, 128 * MiB, 1.5, True, "2M"])
def test_requested_size_rejects_bad_values(rig: Rig, value) -> None:
    with pytest.raises(ValueError, match="virtio-mem vmem0: requested size"):
        rig.dev.requested_size = value
    assert rig.dev.requested_size == 16 * MiB


def test_requested_size_signals_config_even_when_unchanged(rig: Rig) -> None:
    before = rig.transport.stats()["config-changes"]
    rig.dev.requested_size = rig.dev.requested_size
    assert rig.transport.stats()["config-changes"] == before + 1


# --- dynamic memslots -------------------------------------------------------------------------
def test_slots_exist_exactly_while_a_block_in_them_is_plugged(rig: Rig) -> None:
    s0, s1 = (REGION_GPA, 8 * MiB), (REGION_GPA + 8 * MiB, 8 * MiB)
    assert rig.kvm_slots() == [] and rig.backend.calls == []
    assert rig.plug(0) == VIRTIO_MEM_RESP_ACK
    assert rig.backend.adds() == [s0]
    assert rig.backend.calls[0][3] == rig.dev.mapping.addr  # host address of the region start
    assert rig.plug(1) == VIRTIO_MEM_RESP_ACK
    assert rig.backend.adds() == [s0], "a second block in a mapped slot adds nothing"
    assert rig.plug(3, 2) == VIRTIO_MEM_RESP_ACK  # blocks 3 and 4 straddle slots 0 and 1
    assert rig.backend.adds() == [s0, s1] and rig.kvm_slots() == [s0, s1]
    assert rig.unplug(0) == rig.unplug(1) == VIRTIO_MEM_RESP_ACK
    assert rig.backend.removes() == [], "block 3 still holds slot 0"
    assert rig.unplug(3) == VIRTIO_MEM_RESP_ACK
    assert rig.backend.removes() == [s0[0]] and rig.kvm_slots() == [s1]
    assert rig.slots.lookup(REGION_GPA) is None and rig.slots.lookup(s1[0]) is not None
    assert rig.unplug(4) == VIRTIO_MEM_RESP_ACK
    assert rig.kvm_slots() == []
    st_ = rig.dev.stats()
    assert (st_["slot-adds"], st_["slot-removes"], st_["slots-mapped"]) == (2, 2, 0)


def test_the_last_slot_may_be_shorter(rig_factory) -> None:
    r = rig_factory(region_size=20 * MiB, requested=20 * MiB, memslot_size=8 * MiB)
    assert r.plug(9) == VIRTIO_MEM_RESP_ACK
    assert r.kvm_slots() == [(REGION_GPA + 16 * MiB, 4 * MiB)]


def test_refused_slot_after_the_answer_leaves_the_blocks_plugged_behind_the_trap(rig: Rig) -> None:
    """Slots are registered after the PLUG is answered, so KVM refusing one cannot turn into
    BUSY: the blocks stay plugged, the refusal is counted, and the guest's accesses to them
    exit to the region's MMIO trap, which serves them from the same host memory."""
    rig.backend.fail_gpa = REGION_GPA + 8 * MiB
    assert rig.plug(0, 5) == VIRTIO_MEM_RESP_ACK  # slot 0 registered, slot 1 refused
    assert rig.kvm_slots() == [(REGION_GPA, 8 * MiB)] and rig.dev.plugged_size == 5 * BS
    assert rig.dev.stats()["slot-failures"] == 1
    rig.dev.trap.write(4 * BS + 8, b"behind the trap")
    assert rig.dev.trap.read(4 * BS + 8, 15) == b"behind the trap"
    assert rig.dev.stats()["unplugged-accesses"] == 0
    rig.backend.fail_gpa = None
    assert rig.plug(5) == VIRTIO_MEM_RESP_ACK  # the next plug into slot 1 registers it
    assert rig.kvm_slots() == [(REGION_GPA, 8 * MiB), (REGION_GPA + 8 * MiB, 8 * MiB)]


def test_plug_then_unplug_in_one_batch_leaves_nothing_mapped(rig: Rig) -> None:
    """The deferred work runs in request order: a slot mapped for a PLUG that the next
    request in the same notify undoes is removed again, and the memory ends protected."""
    rig.vq.add([REQ.pack(VIRTIO_MEM_REQ_PLUG, rig.gpa(0), 2)], [RESP.size])
    rig.vq.add([REQ.pack(VIRTIO_MEM_REQ_UNPLUG, rig.gpa(0), 2)], [RESP.size])
    rig.vq.add([REQ.pack(VIRTIO_MEM_REQ_PLUG, rig.gpa(1), 1)], [RESP.size])
    rig.vq.kick()
    answers = [RESP.unpack(u.data[:RESP.size])[0] for u in rig.vq.get_used()]
    assert answers == [VIRTIO_MEM_RESP_ACK] * 3
    assert rig.kvm_slots() == [(REGION_GPA, 8 * MiB)] and rig.dev.plugged_size == BS
    assert segfaults_in_child(rig.dev.mapping, 0)          # block 0: unplugged, protected
    assert not segfaults_in_child(rig.dev.mapping, BS)     # block 1: plugged again, accessible
    rig.vq.add([REQ.pack(VIRTIO_MEM_REQ_UNPLUG, rig.gpa(1), 1)], [RESP.size])
    rig.vq.add([REQ.pack(VIRTIO_MEM_REQ_PLUG, rig.gpa(4), 1)], [RESP.size])
    rig.vq.add([REQ.pack(VIRTIO_MEM_REQ_UNPLUG, rig.gpa(4), 1)], [RESP.size])
    rig.vq.kick()
    assert [RESP.unpack(u.data[:RESP.size])[0] for u in rig.vq.get_used()] == [VIRTIO_MEM_RESP_ACK] * 3
    assert rig.kvm_slots() == [] and rig.dev.stats()["slots-mapped"] == 0


def test_failed_discard_is_counted_and_the_unplug_still_holds(rig: Rig, monkeypatch) -> None:
    """The discard runs after the answer, so a failure cannot turn into BUSY: the block is
    unplugged and inaccessible, and only the host keeps its pages (counted, logged)."""
    assert rig.plug(0, 2) == VIRTIO_MEM_RESP_ACK

    def refuse(offset: int, length: int) -> None:
        raise HostMemoryError("discarding failed: Invalid argument")
    monkeypatch.setattr(rig.dev.mapping, "discard", refuse)
    assert rig.unplug(1) == VIRTIO_MEM_RESP_ACK
    assert rig.dev.plugged_size == BS
    assert segfaults_in_child(rig.dev.mapping, BS)
    assert rig.unplug_all() == VIRTIO_MEM_RESP_ACK
    assert rig.dev.plugged_size == 0 and rig.kvm_slots() == []
    assert rig.dev.stats()["discard-failures"] == 2


def test_unplug_answers_before_the_slot_goes(rig: Rig) -> None:
    """The answer is in the used ring before the emptied slot is removed (slow work after)."""
    assert rig.plug(0, 4) == VIRTIO_MEM_RESP_ACK
    order: list[str] = []
    signal = rig.transport.signal_used
    remove = rig.slots.remove
    rig.transport.signal_used = lambda q: (order.append("answer"), signal(q))[1]
    rig.slots.remove = lambda ms: (order.append("slot-removed"), remove(ms))[1]
    assert rig.unplug(0, 4) == VIRTIO_MEM_RESP_ACK
    assert order == ["answer", "slot-removed"] and rig.kvm_slots() == []
    assert rig.dev.stats()["slots-mapped"] == 0


def test_handle_request_rejects_out_of_type_values(rig: Rig) -> None:
    """The Python API takes plain ints; negative or huge values are just bad ranges."""
    for addr, nb in ((rig.gpa(0), -1), (-BS, 1), (rig.gpa(0), 1 << 20), (1 << 70, 1)):
        assert rig.dev.handle_request(VIRTIO_MEM_REQ_PLUG, addr, nb) == (VIRTIO_MEM_RESP_ERROR, 0)
    assert rig.dev.plugged_size == 0


def test_default_memslot_size() -> None:
    assert default_memslot_size(4 * GiB, BS) == DEFAULT_MEMSLOT_SIZE == 128 * MiB
    assert default_memslot_size(128 * GiB, BS) == 128 * MiB      # exactly 1024 slots
    assert default_memslot_size(1 * TiB, BS) == 1 * GiB
    assert default_memslot_size(1 * GiB, 256 * MiB) == 256 * MiB  # never below a block


def test_one_tib_region_costs_no_rss_and_no_slot(rig_factory) -> None:
    before = rss_bytes()
    r = rig_factory(region_size=1 * TiB, requested=4 * GiB)
    assert rss_bytes() - before < 16 * MiB  # bitmap of 512 Ki blocks + Python objects only
    assert r.kvm_slots() == [] and r.backend.calls == []
    assert r.dev.stats()["slot-size"] == 1 * GiB
    assert r.plug(1000, 2) == VIRTIO_MEM_RESP_ACK
    assert r.kvm_slots() == [(REGION_GPA + 1 * GiB, 1 * GiB)]
    assert r.unplug(1000, 2) == VIRTIO_MEM_RESP_ACK and r.kvm_slots() == []


# --- host memory: discard and protection ----------------------------------------------------
@pytest.mark.parametrize("backend", ["anon", "memfd"])
def test_unplugged_memory_is_discarded_and_reads_zero_after_replug(rig_factory, backend: str) -> None:
    r = rig_factory(requested=16 * MiB, memslot_size=8 * MiB, backend=backend)
    assert r.plug(0, 2) == VIRTIO_MEM_RESP_ACK
    r.mem.write(r.gpa(1), b"\x5a" * BS)
    r.mem.write(r.gpa(0), b"keep")
    if backend == "memfd":
        assert os.fstat(r.dev.mapping.fd).st_blocks * 512 >= BS
    assert r.unplug(1) == VIRTIO_MEM_RESP_ACK
    if backend == "memfd":  # the hole was really punched: only block 0's page remains
        assert os.fstat(r.dev.mapping.fd).st_blocks * 512 <= 2 * MiB
    assert r.plug(1) == VIRTIO_MEM_RESP_ACK
    assert r.mem.read(r.gpa(1), BS) == bytes(BS)
    assert r.mem.read(r.gpa(0), 4) == b"keep"


@pytest.mark.parametrize("backend", ["anon", "memfd"])
def test_unplugged_block_in_a_mapped_slot_is_prot_none(rig_factory, backend: str) -> None:
    r = rig_factory(requested=16 * MiB, memslot_size=8 * MiB, backend=backend)
    m = r.dev.mapping
    assert r.plug(0, 2) == VIRTIO_MEM_RESP_ACK
    assert r.unplug(1) == VIRTIO_MEM_RESP_ACK
    assert r.kvm_slots() == [(REGION_GPA, 8 * MiB)]
    assert maps_perms(m.addr).startswith("rw")
    assert maps_perms(m.addr + BS).startswith("---")
    assert not segfaults_in_child(m, 0)
    assert segfaults_in_child(m, BS + 123)
    assert r.plug(1) == VIRTIO_MEM_RESP_ACK
    assert not segfaults_in_child(m, BS + 123)


def test_prealloc_populates_plugged_blocks(rig_factory) -> None:
    r = rig_factory(requested=16 * MiB, memslot_size=8 * MiB, backend="memfd", prealloc=True)
    assert os.fstat(r.dev.mapping.fd).st_blocks == 0
    assert r.plug(2, 2) == VIRTIO_MEM_RESP_ACK
    assert os.fstat(r.dev.mapping.fd).st_blocks * 512 == 2 * BS


# --- guest access to unplugged memory ------------------------------------------------------
def test_device_dma_into_unplugged_memory_raises_guest_memory_error(rig: Rig) -> None:
    assert rig.plug(0) == VIRTIO_MEM_RESP_ACK
    with pytest.raises(GuestMemoryError, match="unplugged memory of virtio-mem vmem0"):
        rig.mem.read(rig.gpa(1) + 8, 4)
    with pytest.raises(GuestMemoryError):
        rig.mem.write(rig.gpa(0) + BS - 2, b"span")  # starts plugged, ends in block 1
    with pytest.raises(GuestMemoryError):  # slot 1 is not mapped at all: GuestMemory's own refusal
        rig.mem.read(rig.gpa(4), 4)
    assert [e["kind"] for e in rig.access_events] == ["device-read", "device-write"]
    assert rig.access_events[1]["gpa"] == rig.gpa(1)


def test_mmio_trap_reports_and_reads_all_ones(rig: Rig) -> None:
    trap = rig.dev.trap
    assert trap.read(5 * BS + 16, 4) == b"\xff" * 4
    trap.write(5 * BS, b"\x01\x02")
    assert rig.dev.stats()["unplugged-accesses-by-kind"] == {"read": 1, "write": 1}
    assert rig.access_events[0] == {"device": "vmem0", "gpa": rig.gpa(5) + 16, "kind": "read", "block": 5,
                                    "slot-mapped": False, "count": 1}
    assert rig.plug(5) == VIRTIO_MEM_RESP_ACK  # an access that raced with the plug goes to memory
    trap.write(5 * BS, b"hi")
    assert trap.read(5 * BS, 2) == b"hi" and rig.mem.read(rig.gpa(5), 2) == b"hi"
    assert rig.dev.stats()["unplugged-accesses"] == 2


def test_answers_go_out_before_the_host_work(rig: Rig, monkeypatch) -> None:
    """The guest waits only for the bitmap: when the host opens, protects or discards memory
    and (un)registers memslots, the answer is already in the used ring."""
    seen: list[tuple[str, int]] = []
    protect, discard = rig.dev.mapping.protect, rig.dev.mapping.discard
    monkeypatch.setattr(rig.dev.mapping, "protect", lambda off, size, accessible: (
        seen.append(("open" if accessible else "close", rig.vq.used_idx)), protect(off, size, accessible)))
    monkeypatch.setattr(rig.dev.mapping, "discard", lambda off, size: (
        seen.append(("discard", rig.vq.used_idx)), discard(off, size)))
    add = rig.slots.add
    monkeypatch.setattr(rig.slots, "add", lambda *a, **k: (seen.append(("slot", rig.vq.used_idx)), add(*a, **k))[1])
    assert rig.plug(0, 2) == VIRTIO_MEM_RESP_ACK
    assert seen == [("open", 1), ("slot", 1)]
    assert rig.unplug(1) == VIRTIO_MEM_RESP_ACK
    assert seen[2:] == [("close", 2), ("discard", 2)]


def test_prealloc_failure_is_answered_busy(rig_factory, monkeypatch) -> None:
    """prealloc=on promises the memory before the answer, so a host that cannot provide it
    answers BUSY (Linux retries) and the blocks stay unplugged."""
    r = rig_factory(requested=8 * MiB, prealloc=True)

    def refuse(offset: int, length: int) -> None:
        raise HostMemoryError("cannot preallocate: Cannot allocate memory")
    monkeypatch.setattr(r.dev.mapping, "populate", refuse)
    assert r.plug(0, 2) == VIRTIO_MEM_RESP_BUSY
    assert r.dev.plugged_size == 0 and r.kvm_slots() == [] and segfaults_in_child(r.dev.mapping, 0)
    monkeypatch.undo()
    assert r.plug(0, 2) == VIRTIO_MEM_RESP_ACK and not segfaults_in_child(r.dev.mapping, BS)


def test_plugged_memory_the_host_cannot_open_is_never_touched(rig: Rig, monkeypatch) -> None:
    """mprotect can fail after the PLUG was answered (vm.max_map_count): the block is plugged
    for the guest, but the VMM refuses to touch its pages (no SIGSEGV) and a vCPU fault on it
    cannot be settled, until a later attempt succeeds."""
    protect = rig.dev.mapping.protect

    def refuse_open(offset: int, size: int, accessible: bool) -> None:
        if accessible:
            raise HostMemoryError("mprotect failed: Cannot allocate memory")
        protect(offset, size, accessible)
    monkeypatch.setattr(rig.dev.mapping, "protect", refuse_open)
    assert rig.plug(0, 2) == VIRTIO_MEM_RESP_ACK
    stats = rig.dev.stats()
    assert stats["protect-failures"] == 1 and stats["plugged-inaccessible"] == 2
    assert rig.dev.plugged_size == 2 * BS and segfaults_in_child(rig.dev.mapping, BS)
    with pytest.raises(GuestMemoryError):  # device DMA: refused, not a crash
        rig.mem.read(rig.gpa(1), 8)
    assert rig.dev.trap.read(BS, 8) == b"\xff" * 8  # the trap tries again, fails, reads nothing
    assert not rig.dev.settle_fault(rig.gpa(0))
    monkeypatch.undo()
    assert rig.dev.settle_fault(rig.gpa(0))  # a vCPU fault opens its block, then retries
    assert rig.dev.stats()["plugged-inaccessible"] == 1 and not segfaults_in_child(rig.dev.mapping, 0)
    rig.dev.trap.write(BS, b"open")            # the trap opens the other block
    assert rig.mem.read(rig.gpa(1), 4) == b"open" and rig.dev.stats()["plugged-inaccessible"] == 0
    assert rig.dev.stats()["unplugged-accesses"] == 0


def test_settle_fault_only_for_plugged_blocks(rig: Rig) -> None:
    assert rig.plug(0) == VIRTIO_MEM_RESP_ACK
    assert rig.dev.settle_fault(rig.gpa(0))
    assert not rig.dev.settle_fault(rig.gpa(1)) and not rig.dev.settle_fault(REGION_GPA - 1)
    assert rig.dev.stats()["protect-failures"] == 0


def test_on_unplugged_access_hook(rig: Rig) -> None:
    assert rig.dev.region_contains(REGION_GPA) and rig.dev.region_contains(REGION_GPA + 64 * MiB - 1)
    assert not rig.dev.region_contains(REGION_GPA - 1) and not rig.dev.region_contains(REGION_GPA + 64 * MiB)
    assert rig.dev.on_unplugged_access(REGION_GPA - 1, "fault") is None
    assert rig.plug(0) == VIRTIO_MEM_RESP_ACK
    assert rig.dev.on_unplugged_access(rig.gpa(0), "fault") is None  # plugged: not ours to report
    event = rig.dev.on_unplugged_access(rig.gpa(1), "fault")
    assert event["slot-mapped"] and event["gpa"] == rig.gpa(1) and rig.access_events == [event]


def test_broken_listeners_do_not_break_the_device(rig: Rig) -> None:
    def boom(event: dict) -> None:
        raise RuntimeError("listener bug")
    rig.dev.unplugged_access_listener = rig.dev.size_change_listener = boom
    assert rig.dev.trap.read(0, 8) == b"\xff" * 8
    assert rig.plug(0) == VIRTIO_MEM_RESP_ACK and not rig.needs_reset()
    assert rig.dev.stats()["unplugged-accesses"] == 1


# --- control plane ----------------------------------------------------------------------------
def test_info_uses_qemu_field_names(rig_factory) -> None:
    r = rig_factory(requested=4 * MiB, memdev="/objects/mem0", node=1)
    assert r.plug(0) == VIRTIO_MEM_RESP_ACK
    assert r.dev.info() == {"memaddr": REGION_GPA, "node": 1, "requested-size": 4 * MiB, "size": BS,
                            "max-size": 64 * MiB, "block-size": BS, "memdev": "/objects/mem0", "id": "vmem0"}


def test_size_change_events_only_when_plugged_size_changes(rig: Rig) -> None:
    assert rig.plug(0, 2) == VIRTIO_MEM_RESP_ACK
    assert rig.plug(0) == VIRTIO_MEM_RESP_ERROR
    assert rig.plug(10, 10) == VIRTIO_MEM_RESP_NACK
    assert rig.unplug(1) == VIRTIO_MEM_RESP_ACK
    assert rig.unplug_all() == VIRTIO_MEM_RESP_ACK
    assert rig.unplug_all() == VIRTIO_MEM_RESP_ACK
    q = "/machine/peripheral/vmem0"
    assert rig.size_events == [{"id": "vmem0", "size": s, "qom-path": q} for s in (2 * BS, BS, 0)]


def test_device_reset_keeps_blocks_system_reset_unplugs(rig: Rig) -> None:
    assert rig.plug(0, 5) == VIRTIO_MEM_RESP_ACK
    rig.mem.write(rig.gpa(0), b"data")
    rig.drv.reset()  # the driver resets the device: plugged memory must survive (spec)
    assert rig.dev.plugged_size == 5 * BS and len(rig.kvm_slots()) == 2
    assert rig.mem.read(rig.gpa(0), 4) == b"data"
    [rig.vq] = rig.drv.init()
    assert rig.cfg(CFG_PLUGGED) == 5 * BS
    rig.dev.system_reset()
    assert rig.dev.plugged_size == 0 and rig.kvm_slots() == []
    assert rig.dev.usable_region_size == 64 * MiB
    assert maps_perms(rig.dev.mapping.addr).startswith("---")
    assert rig.size_events[-1]["size"] == 0
    assert rig.plug(0) == VIRTIO_MEM_RESP_ACK
    assert rig.mem.read(rig.gpa(0), 4) == bytes(4)


@pytest.mark.parametrize("kw, match", [
    (dict(block_size=3 * MiB), "power of two"),
    (dict(block_size=2 * KiB), "below the anon page size"),
    (dict(block_size=PAGE, backend="hugetlb"), "below the hugetlb page size"),
    (dict(region_size=65 * MiB), "multiple of the block size"),
    (dict(addr=REGION_GPA + MiB), "aligned to the block size"),
    (dict(memslot_size=3 * MiB), "memslot size"),
    (dict(memslot_size=PAGE, block_size=PAGE, region_size=1 * GiB), "more than 32764 memslots"),
    (dict(backend="tmpfs"), "unknown memory backend"),
    (dict(requested_size=3 * MiB), "requested size"),
    (dict(node=70000), "node"),
])
def test_constructor_rejects_bad_configuration(kw: dict, match: str) -> None:
    args = dict(addr=REGION_GPA, region_size=64 * MiB)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        VirtioMem("bad", args.pop("addr"), args.pop("region_size"), memslots=MemslotManager(RecordingBackend()),
                  **args)


# --- property: random and hostile request sequences against a naive model ------------------
NB = 16          # blocks in the property-test region (4 KiB blocks, 4 slots of 4 blocks)
PBS = PAGE
SLOT_BLOCKS = 4

well_formed = st.one_of(
    st.tuples(st.just("req"), st.sampled_from([0, 1, 3]), st.integers(0, NB - 1), st.integers(1, 4)),
    st.tuples(st.just("req"), st.sampled_from([0, 1, 3]), st.integers(-2, NB + 2), st.integers(0, 6)),
    # unplug / query starting at a block that is plugged now (random ranges rarely hit one)
    st.tuples(st.just("at-plugged"), st.sampled_from([1, 3]), st.integers(0, NB), st.sampled_from([1, 1, 1, 2, 3])),
    st.tuples(st.just("at-plugged"), st.just(VIRTIO_MEM_REQ_UNPLUG), st.integers(0, NB), st.just(1)),
)
other_requests = st.one_of(
    st.tuples(st.just("raw"), st.one_of(st.sampled_from([0, 1, 3]), st.integers(4, 0xFFFF)), st.integers(0, U64),
              st.integers(0, 0xFFFF)),
    st.tuples(st.just("requested"), st.integers(0, NB + 1), st.just(0), st.just(0)),
    st.tuples(st.just("short"), st.integers(0, 23), st.just(0), st.just(0)),
    st.tuples(st.just("tiny-resp"), st.integers(0, 9), st.just(0), st.just(0)),
    st.tuples(st.just("unaligned"), st.sampled_from([0, 1, 3]), st.integers(0, NB - 1), st.integers(1, 3)),
    st.tuples(st.just("req"), st.just(2), st.just(0), st.just(0)),  # UNPLUG_ALL
)
requests = st.one_of(well_formed, other_requests)  # half of it what a driver would send


class Model:
    """The spec/QEMU rules over a plain set of plugged blocks."""

    def __init__(self) -> None:
        self.plugged: set[int] = set()
        self.requested = 0
        self.usable = 0

    def usable_for(self, requested: int) -> int:
        return 0 if requested == 0 else min(NB * PBS, requested + VIRTIO_MEM_USABLE_EXTENT)

    def answer(self, t: int, addr: int, nb: int) -> tuple[int, int]:
        if t == VIRTIO_MEM_REQ_UNPLUG_ALL:
            self.plugged.clear()
            self.usable = self.usable_for(self.requested)
            return VIRTIO_MEM_RESP_ACK, 0
        if t not in (VIRTIO_MEM_REQ_PLUG, VIRTIO_MEM_REQ_UNPLUG, VIRTIO_MEM_REQ_STATE):
            return VIRTIO_MEM_RESP_ERROR, 0
        size = nb * PBS
        if (addr % PBS or nb == 0 or addr + size > U64 or addr < REGION_GPA
                or addr + size > REGION_GPA + self.usable):
            return VIRTIO_MEM_RESP_ERROR, 0
        blocks = set(range((addr - REGION_GPA) // PBS, (addr - REGION_GPA) // PBS + nb))
        if t == VIRTIO_MEM_REQ_STATE:
            n = len(blocks & self.plugged)
            state = VIRTIO_MEM_STATE_PLUGGED if n == nb else VIRTIO_MEM_STATE_UNPLUGGED if n == 0 \
                else VIRTIO_MEM_STATE_MIXED
            return VIRTIO_MEM_RESP_ACK, state
        if t == VIRTIO_MEM_REQ_PLUG:
            if (len(self.plugged) + nb) * PBS > self.requested:
                return VIRTIO_MEM_RESP_NACK, 0
            if blocks & self.plugged:
                return VIRTIO_MEM_RESP_ERROR, 0
            self.plugged |= blocks
            return VIRTIO_MEM_RESP_ACK, 0
        if not blocks <= self.plugged:
            return VIRTIO_MEM_RESP_ERROR, 0
        self.plugged -= blocks
        return VIRTIO_MEM_RESP_ACK, 0


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(initial=st.integers(4, NB), ops=st.lists(requests, min_size=10, max_size=50))
def test_random_and_hostile_requests_match_a_naive_model(rig_factory, initial, ops) -> None:
    r = rig_factory(region_size=NB * PBS, block_size=PBS, memslot_size=SLOT_BLOCKS * PBS, requested=initial * PBS)
    model = Model()
    model.requested, model.usable = initial * PBS, model.usable_for(initial * PBS)
    for kind, a, b, c in ops:
        if kind == "requested":
            if a > NB:
                with pytest.raises(ValueError, match="exceeds the region size"):
                    r.dev.requested_size = a * PBS
                continue
            r.dev.requested_size = a * PBS
            if a * PBS != model.requested:
                model.usable = max(model.usable, model.usable_for(a * PBS))
            model.requested = a * PBS
            continue
        if kind in ("short", "tiny-resp"):
            req = REQ.pack(VIRTIO_MEM_REQ_PLUG, REGION_GPA, 1)
            answer = r.send(req[:a]) if kind == "short" else r.send(req, in_size=a)
            assert answer is None and r.needs_reset()
            [r.vq] = r.drv.init()  # what Linux would do: reset and probe again; blocks stay
            continue
        if kind == "req":
            t, addr, nb = a, REGION_GPA + b * PBS, c
        elif kind == "at-plugged":
            start = sorted(model.plugged)[b % len(model.plugged)] if model.plugged else b
            t, addr, nb = a, REGION_GPA + start * PBS, c
        elif kind == "unaligned":
            t, addr, nb = a, REGION_GPA + b * PBS + 512, c
        else:
            t, addr, nb = a, b, c
        answer = model.answer(t, addr, nb)
        assert r.send(REQ.pack(t, addr, nb)) == answer, (kind, t, addr, nb)
        event(f"type {t if t < 4 else 'other'} -> {answer[0]}")
        # the invariants, after every request
        assert r.dev.plugged_size == len(model.plugged) * PBS == r.cfg(CFG_PLUGGED)
        assert r.dev.usable_region_size == model.usable
        want_slots = sorted({blk // SLOT_BLOCKS for blk in model.plugged})
        assert r.kvm_slots() == [(REGION_GPA + s * SLOT_BLOCKS * PBS, SLOT_BLOCKS * PBS) for s in want_slots]
        runs = [blk for start, n, plugged in r.dev.block_runs() if plugged for blk in range(start, start + n)]
        assert runs == sorted(model.plugged)
    stats = r.dev.stats()
    assert stats["internal-errors"] == 0
    errors = r.transport.stats()["errors"]
    assert "device-exception" not in errors and "virtio-mem-internal" not in errors
    assert r.transport.stats()["internal-errors"] == 0
    assert stats["slot-adds"] - stats["slot-removes"] == stats["slots-mapped"] == len(r.kvm_slots())
