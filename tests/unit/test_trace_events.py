"""What the traced components emit (docs/trace-format.md): virtio-mem driven through a real
virtqueue, the memslot manager, VMBus against the Linux-guest client model, hv-balloon against
the Linux DM-driver model, and QMP commands. A recording tracer stands in for the file."""

from __future__ import annotations

import os
from typing import Any

import pytest

from devices.hyperv.balloon import HvBalloon
from devices.virtio.mem import (
    VIRTIO_MEM_RESP_ACK,
    VIRTIO_MEM_RESP_ERROR,
    VIRTIO_MEM_RESP_NACK,
    VIRTIO_MEM_STATE_MIXED,
)
from pyvmm.qmp.client import QmpClient
from pyvmm.qmp.server import QmpServer
from tests.hv_balloon_guest import FakeChannel, FakeHotAdd, FakeMemory, LinuxDmGuest
from tests.unit.test_virtio_mem import BS, REGION_GPA, Rig
from tests.unit.test_memslots import FakeBackend, FakeMapping
from tests.unit.test_qmp_server import FakeMachine, sock_dir  # noqa: F401 (sock_dir is a fixture)
from tests.vmbus_client import RecordingDevice
from tests.vmbus_client import Rig as VmbusRig
from vmm.memslots import MemslotManager

MiB, GiB = 1 << 20, 1 << 30
PAGE = 4096


class RecordingTracer:
    """An enabled tracer that keeps (ev, fields) in memory, fields spelt as in the file."""

    enabled = True

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, ev: str, **fields: Any) -> None:
        self.events.append((ev, {k.replace("_", "-"): v for k, v in fields.items()}))

    def named(self, *names: str) -> list[tuple[str, dict[str, Any]]]:
        return [(ev, f) for ev, f in self.events if ev in names]

    def take(self) -> list[tuple[str, dict[str, Any]]]:
        out, self.events = self.events, []
        return out


class ExplodingTracer:
    """Disabled, and proves it: a call site that forgets to check `enabled` fails the test."""

    enabled = False

    def emit(self, ev: str, **fields: Any) -> None:
        raise AssertionError(f"emit({ev!r}) called on a disabled tracer")


# ---------------------------------------------------------------- virtio-mem
@pytest.fixture
def traced_rig():
    rig = Rig(requested=16 * MiB, memslot_size=8 * MiB)
    tracer = RecordingTracer()
    rig.dev.tracer = rig.slots.tracer = tracer
    yield rig, tracer
    rig.close()


def without_us(events: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    return [(ev, {k: v for k, v in f.items() if k != "us"}) for ev, f in events]


def test_virtio_mem_description_lines(traced_rig) -> None:
    rig, tracer = traced_rig
    rig.dev.trace_description()
    assert tracer.take() == [
        ("virtio-mem.device", {"id": "vmem0", "addr": REGION_GPA, "region-size": 64 * MiB, "block-size": BS,
                               "slot-size": 8 * MiB, "requested-size": 16 * MiB}),
        ("virtio-mem.requested-size", {"id": "vmem0", "size": 16 * MiB})]


def test_virtio_mem_plug_and_unplug_requests_with_responses_sizes_and_slots(traced_rig) -> None:
    rig, tracer = traced_rig
    assert rig.plug(0, 2) == VIRTIO_MEM_RESP_ACK
    events = tracer.take()
    request = {"id": "vmem0", "type": "plug", "addr": rig.gpa(0), "nb-blocks": 2}
    assert without_us(events) == [
        ("virtio-mem.request", request),
        ("virtio-mem.size", {"id": "vmem0", "size": 2 * BS}),
        ("virtio-mem.response", {**request, "resp": "ack"}),
        ("memslot.add", {"slot": 1, "gpa": REGION_GPA, "size": 8 * MiB, "owner": "virtio-mem:vmem0"})]
    response, slot_add = events[2][1], events[3][1]
    assert isinstance(response["us"], float) and 0 <= response["us"] < 1_000_000
    assert isinstance(slot_add["us"], float) and slot_add["us"] >= 0

    assert rig.unplug(0, 2) == VIRTIO_MEM_RESP_ACK
    request = {"id": "vmem0", "type": "unplug", "addr": rig.gpa(0), "nb-blocks": 2}
    assert without_us(tracer.take()) == [
        ("virtio-mem.request", request),
        ("virtio-mem.size", {"id": "vmem0", "size": 0}),
        ("virtio-mem.response", {**request, "resp": "ack"}),
        ("memslot.remove", {"slot": 1, "gpa": REGION_GPA, "size": 8 * MiB, "owner": "virtio-mem:vmem0"})]


def test_virtio_mem_refusals_and_state_answers(traced_rig) -> None:
    rig, tracer = traced_rig
    assert rig.plug(0, 9) == VIRTIO_MEM_RESP_NACK           # 18 MiB > the 16 MiB requested
    assert rig.plug(1, 1) == VIRTIO_MEM_RESP_ACK
    assert rig.state(0, 2) == (VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_STATE_MIXED)
    assert rig.state(1000, 1)[0] == VIRTIO_MEM_RESP_ERROR   # outside the region
    assert rig.request(7)[0] == VIRTIO_MEM_RESP_ERROR       # no such request type
    answers = [(f["type"], f["resp"], f.get("state")) for _, f in tracer.named("virtio-mem.response")]
    assert answers == [("plug", "nack", None), ("plug", "ack", None), ("state", "ack", "mixed"),
                       ("state", "error", None), ("unknown", "error", None)]
    # no size change for the refused plug: one size line, for the accepted one
    assert [f["size"] for _, f in tracer.named("virtio-mem.size")] == [BS]


def test_virtio_mem_requested_size_unplug_all_and_reset(traced_rig) -> None:
    rig, tracer = traced_rig
    rig.dev.requested_size = 32 * MiB
    rig.dev.requested_size = 32 * MiB   # asked again: traced again (it pokes the driver again)
    assert tracer.take() == [("virtio-mem.requested-size", {"id": "vmem0", "size": 32 * MiB})] * 2
    assert rig.plug(0, 4) == VIRTIO_MEM_RESP_ACK and rig.plug(8, 1) == VIRTIO_MEM_RESP_ACK
    tracer.take()
    rig.dev.system_reset()
    events = tracer.take()
    assert events[0] == ("virtio-mem.reset", {"id": "vmem0"})
    assert sorted(f["gpa"] for ev, f in events if ev == "memslot.remove") == [REGION_GPA, REGION_GPA + 16 * MiB]
    assert events[-1] == ("virtio-mem.size", {"id": "vmem0", "size": 0})
    assert rig.plug(0, 1) == VIRTIO_MEM_RESP_ACK
    tracer.take()
    assert rig.unplug_all() == VIRTIO_MEM_RESP_ACK
    kinds = [(ev, f.get("type"), f.get("resp")) for ev, f in tracer.take()
             if ev.startswith("virtio-mem.request") or ev == "virtio-mem.response"]
    assert kinds == [("virtio-mem.request", "unplug-all", None), ("virtio-mem.response", "unplug-all", "ack")]


def test_virtio_mem_unplugged_access(traced_rig) -> None:
    rig, tracer = traced_rig
    assert rig.dev.trap.read(5 * BS + 16, 4) == b"\xff" * 4
    rig.dev.trap.write(6 * BS, b"\x01")
    assert tracer.take() == [
        ("unplugged-access", {"device": "vmem0", "gpa": rig.gpa(5) + 16, "kind": "read", "block": 5,
                              "slot-mapped": False, "count": 1}),
        ("unplugged-access", {"device": "vmem0", "gpa": rig.gpa(6), "kind": "write", "block": 6,
                              "slot-mapped": False, "count": 2})]


def test_virtio_mem_and_memslots_never_emit_when_disabled() -> None:
    rig = Rig(requested=16 * MiB, memslot_size=8 * MiB)
    try:
        rig.dev.tracer = rig.slots.tracer = ExplodingTracer()
        rig.dev.trace_description()
        rig.dev.requested_size = 8 * MiB
        assert rig.plug(0, 1) == VIRTIO_MEM_RESP_ACK and rig.state(0)[0] == VIRTIO_MEM_RESP_ACK
        assert rig.unplug(0, 1) == VIRTIO_MEM_RESP_ACK
        rig.dev.trap.read(0, 4)
        rig.dev.system_reset()
    finally:
        rig.close()


# ---------------------------------------------------------------- memslot manager
def test_memslot_manager_traces_adds_and_removes_not_refusals() -> None:
    backend = FakeBackend()
    mgr = MemslotManager(backend)
    tracer = RecordingTracer()
    mgr.tracer = tracer
    ms = mgr.add(4 * GiB, 128 * MiB, FakeMapping(1 * GiB), 0, "hv-balloon:hv0")
    backend.fail_next = OSError(28, "No space left on device")
    with pytest.raises(OSError):
        mgr.add(8 * GiB, 128 * MiB, FakeMapping(1 * GiB), 0, "ram")
    mgr.remove(ms)
    assert without_us(tracer.events) == [
        ("memslot.add", {"slot": 0, "gpa": 4 * GiB, "size": 128 * MiB, "owner": "hv-balloon:hv0"}),
        ("memslot.remove", {"slot": 0, "gpa": 4 * GiB, "size": 128 * MiB, "owner": "hv-balloon:hv0"})]
    assert all(isinstance(f["us"], float) and f["us"] >= 0 for _, f in tracer.events)


# ---------------------------------------------------------------- VMBus
def test_vmbus_messages_both_ways_with_relids() -> None:
    rig = VmbusRig(devices=[RecordingDevice(echo=True)])
    tracer = RecordingTracer()
    rig.bus.tracer = tracer
    rig.open_first()
    rig.client.unload()
    rig.check()
    lines = [(f["dir"], f["type"], f.get("relid")) for _, f in tracer.named("vmbus.message")]
    assert len(lines) == len(tracer.events)
    assert lines[:5] == [("guest", "initiate_contact", None), ("host", "version_response", None),
                         ("guest", "requestoffers", None), ("host", "offerchannel", 1),
                         ("host", "alloffers_delivered", None)]
    assert ("guest", "gpadl_header", 1) in lines and ("host", "gpadl_created", 1) in lines
    assert lines.index(("guest", "openchannel", 1)) < lines.index(("host", "openchannel_result", 1))
    assert lines[-2:] == [("guest", "unload", None), ("host", "unload_response", None)]


# ---------------------------------------------------------------- hv-balloon
def balloon_rig(tracer: RecordingTracer) -> tuple[HvBalloon, LinuxDmGuest]:
    ram = [(0, 64 * MiB)]
    dev = HvBalloon("hvb0", boot_ram=ram, memory=FakeMemory(), hot_add_gpa=128 * MiB, hot_add_size=256 * MiB,
                    hot_add=FakeHotAdd())
    dev.tracer = tracer
    guest = LinuxDmGuest(dev, FakeChannel(), ram, alignment=7)
    return dev, guest


def test_hv_balloon_device_handshake_balloon_and_hot_add() -> None:
    tracer = RecordingTracer()
    dev, guest = balloon_rig(tracer)
    dev.trace_description()
    assert tracer.take() == [
        ("hv-balloon.device", {"id": "hvb0", "memdev-size": 256 * MiB, "hot-add-addr": 128 * MiB,
                               "boot-size": 64 * MiB}),
        ("hv-balloon.state", {"id": "hvb0", "target": 64 * MiB, "ballooned": 0, "hot-added": 0,
                              "actual": 64 * MiB})]
    assert guest.connect()
    msgs = [(f["dir"], f["type"]) for _, f in tracer.take()]
    assert msgs == [("guest", "DM_VERSION_REQUEST"), ("host", "DM_VERSION_RESPONSE"),
                    ("guest", "DM_CAPABILITIES_REPORT"), ("host", "DM_CAPABILITIES_RESPONSE"),
                    ("host", "DM_INFO_MESSAGE")]

    guest.status(avail=1000, committed=2000)
    assert tracer.named("hv-balloon.status") == [
        ("hv-balloon.status", {"id": "hvb0", "committed": 2000 * PAGE, "available": 1000 * PAGE})]
    tracer.take()

    dev.set_target(48 * MiB)
    guest.run()
    events = tracer.take()
    [(_, request)] = [e for e in events if e[1].get("type") == "DM_BALLOON_REQUEST"]
    assert request["dir"] == "host" and request["pages"] == 16 * MiB // PAGE
    given = sum(f["pages"] for _, f in events if f.get("type") == "DM_BALLOON_RESPONSE")
    assert given == 16 * MiB // PAGE
    assert events[-1] == ("hv-balloon.state", {"id": "hvb0", "target": 48 * MiB, "ballooned": 16 * MiB,
                                               "hot-added": 0, "actual": 48 * MiB})

    dev.set_target(64 * MiB + 128 * MiB)   # unballoon 16 MiB, then hot-add 128 MiB
    guest.run()
    events = tracer.take()
    types = [f.get("type") for ev, f in events if ev == "hv-balloon.message"]
    assert types.index("DM_UNBALLOON_REQUEST") < types.index("DM_MEM_HOT_ADD_REQUEST")
    [(_, hot_add)] = [e for e in events if e[1].get("type") == "DM_MEM_HOT_ADD_REQUEST"]
    assert hot_add["pages"] == 128 * MiB // PAGE and hot_add["gpa"] == 128 * MiB
    assert events[-1] == ("hv-balloon.state", {"id": "hvb0", "target": 192 * MiB, "ballooned": 0,
                                               "hot-added": 128 * MiB, "actual": 192 * MiB})

    dev.reset()
    assert tracer.take() == [("hv-balloon.state", {"id": "hvb0", "target": 64 * MiB, "ballooned": 0,
                                                   "hot-added": 0, "actual": 64 * MiB})]


def test_hv_balloon_malformed_message_is_traced() -> None:
    tracer = RecordingTracer()
    dev, guest = balloon_rig(tracer)
    assert guest.connect()
    tracer.take()
    dev.packet(guest.channel, b"\x01\x00", 0)  # shorter than a DM header
    [(ev, fields)] = tracer.take()
    assert ev == "hv-balloon.message" and fields["dir"] == "guest" and fields["type"] == "malformed"


def test_hv_balloon_never_emits_when_disabled() -> None:
    dev, guest = balloon_rig(RecordingTracer())
    dev.tracer = ExplodingTracer()
    dev.trace_description()
    assert guest.connect()
    guest.status(avail=1, committed=2)
    dev.set_target(48 * MiB)
    guest.run()
    dev.reset()


# ---------------------------------------------------------------- QMP
def test_every_qmp_command_is_traced_with_its_result(sock_dir: str) -> None:
    tracer = RecordingTracer()
    path = os.path.join(sock_dir, "q.sock")
    server = QmpServer(FakeMachine(), path, tracer=tracer)
    server.start()
    try:
        client = QmpClient(path)
        try:
            assert "status" in client.execute("query-status")
            with pytest.raises(Exception):
                client.execute("no-such-command")
        finally:
            client.close()
    finally:
        server.stop()
    lines = [(f["command"], f["result"]) for _, f in tracer.named("qmp.command")]
    assert lines == [("qmp_capabilities", "ok"), ("query-status", "ok"), ("no-such-command", "CommandNotFound")]
    assert all(isinstance(f["us"], float) and f["us"] >= 0 for _, f in tracer.events)
    assert all(set(f) == {"command", "result", "us"} for _, f in tracer.events)  # no arguments
