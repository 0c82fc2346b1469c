"""virtio-mmio transport (version 2), driven through its registers the way Linux does it
(tests/virtio_driver.py), plus the event loop and the ioeventfd wiring."""

from __future__ import annotations

import os
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.virtio.device import VirtioDevice
from devices.virtio.event_loop import EventLoop
from devices.virtio.mmio import (
    TRANSPORT_FEATURES,
    VIRTIO_MMIO_SIZE,
    VIRTIO_MMIO_VENDOR,
    VirtioMmioTransport,
    bind_ioeventfds,
)
from devices.virtio.queue import VirtqueueError
from tests.virtio_driver import (
    CONFIG,
    CONFIG_GENERATION,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DEVICE_FEATURES,
    DEVICE_FEATURES_SEL,
    DRIVER_FEATURES,
    DRIVER_FEATURES_SEL,
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    INT_CONFIG,
    INT_VRING,
    INTERRUPT_ACK,
    INTERRUPT_STATUS,
    MALFORMED_CHAINS,
    QUEUE_DESC_HIGH,
    QUEUE_DESC_LOW,
    QUEUE_NOTIFY,
    QUEUE_NUM,
    QUEUE_NUM_MAX,
    QUEUE_READY,
    QUEUE_SEL,
    S_ACKNOWLEDGE,
    S_DRIVER,
    S_DRIVER_OK,
    S_FEATURES_OK,
    S_NEEDS_RESET,
    SHM_LEN_HIGH,
    SHM_LEN_LOW,
    SHM_SEL,
    STATUS,
    DriverError,
    VirtioMmioDriver,
    make_guest_memory,
)

ALL = (1 << 64) - 1
VERSION_1 = 1 << F_VERSION_1


class EchoDevice(VirtioDevice):
    """Answers every chain with its readable bytes reversed; records what the transport did."""

    device_id = 0x7E
    num_queues = 2
    queue_max_size = 16
    FEATURES = 1 << 0 | 1 << 5 | 1 << 50  # device-specific bits in both feature words

    def __init__(self) -> None:
        self.config = bytearray(range(0x10, 0x20))
        self.acked: list[int] = []
        self.activations: list[list] = []
        self.notified: list[tuple[int, str]] = []
        self.resets = 0
        self.queues = None
        self.raise_in_notify: Exception | None = None
        self.truncate = True  # answer only what fits; False: insist on the whole answer

    def device_features(self) -> int:
        return self.FEATURES

    def ack_features(self, features: int) -> None:
        self.acked.append(features)

    def config_read(self, offset: int, size: int) -> bytes:
        return bytes(self.config[offset:offset + size])

    def config_write(self, offset: int, data: bytes) -> None:
        if offset + len(data) <= len(self.config):
            self.config[offset:offset + len(data)] = data

    def activate(self, queues, mem, transport) -> None:
        self.activations.append(queues)
        self.queues, self.mem, self.transport = queues, mem, transport

    def queue_notify(self, index: int) -> None:
        self.notified.append((index, threading.current_thread().name))
        if self.raise_in_notify is not None:
            raise self.raise_in_notify
        vq = self.queues[index]
        while (chain := vq.pop()) is not None:
            data = chain.read_all(self.mem)[::-1]
            if self.truncate:
                data = data[:chain.writable_len]
            vq.push(chain, chain.write(self.mem, data))
        self.transport.signal_used(index)

    def reset(self) -> None:
        self.resets += 1
        self.queues = None


class Rig:
    def __init__(self, device: VirtioDevice | None = None, regions=((0, 1 << 20),)) -> None:
        self.mem = make_guest_memory(regions)
        self.dev = device or EchoDevice()
        self.irqs = 0
        self.t = VirtioMmioTransport(self.dev, self.mem, self._irq, "virtio-test")
        self.drv = VirtioMmioDriver(self.t, self.mem)

    def _irq(self) -> None:
        self.irqs += 1

    def up(self, wanted: int = ALL, **kw):
        return self.drv.init(wanted, **kw)

    def stats(self) -> dict:
        return self.t.stats()


# --- identity, features, status -----------------------------------------------------------
def test_identity_registers_as_linux_probes_them() -> None:
    rig = Rig()
    ident = rig.drv.probe()
    assert (ident.version, ident.device_id, ident.vendor_id) == (2, 0x7E, VIRTIO_MMIO_VENDOR)
    assert VIRTIO_MMIO_VENDOR == 0x554D4551 and VirtioMmioTransport.SIZE == VIRTIO_MMIO_SIZE == 0x200


def test_feature_words_are_paged_by_the_select_register() -> None:
    rig = Rig()
    offered = EchoDevice.FEATURES | TRANSPORT_FEATURES
    assert rig.drv.get_features() == offered
    rig.drv.writel(DEVICE_FEATURES_SEL, 1)
    assert rig.drv.readl(DEVICE_FEATURES) == offered >> 32
    rig.drv.writel(DEVICE_FEATURES_SEL, 7)
    assert rig.drv.readl(DEVICE_FEATURES) == 0
    assert TRANSPORT_FEATURES == VERSION_1 | 1 << F_INDIRECT_DESC | 1 << F_EVENT_IDX


def test_linux_negotiation_and_bring_up() -> None:
    rig = Rig()
    queues = rig.up()
    expected = EchoDevice.FEATURES | TRANSPORT_FEATURES
    assert rig.dev.acked == [expected] and rig.drv.features == expected
    assert rig.drv.status == S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK
    assert len(queues) == 2 and len(rig.dev.activations) == 1
    vqs = rig.dev.activations[0]
    assert [vq.size for vq in vqs] == [16, 16]
    assert all(vq.event_idx and vq.indirect for vq in vqs)
    assert rig.stats()["features"] == expected
    rig.drv.writel(DRIVER_FEATURES_SEL, 1)  # what the driver wrote reads back
    assert rig.drv.readl(DRIVER_FEATURES) == expected >> 32


def test_a_subset_of_features_is_accepted() -> None:
    rig = Rig()
    rig.up(wanted=VERSION_1 | 1 << 5)
    assert rig.dev.acked == [VERSION_1 | 1 << 5]
    assert not any(vq.event_idx or vq.indirect for vq in rig.dev.activations[0])


@pytest.mark.parametrize("features, why", [
    (VERSION_1 | 1 << 7, "a bit that was not offered"),
    (EchoDevice.FEATURES, "no VIRTIO_F_VERSION_1"),
    (VERSION_1 | 1 << 35, "a transport bit that was not offered"),
])
def test_features_ok_is_refused(features: int, why: str) -> None:
    rig = Rig()
    rig.drv.reset()
    rig.drv.add_status(S_ACKNOWLEDGE | S_DRIVER)
    with pytest.raises(DriverError, match="refuses features"):
        rig.drv.accept_features(features)
    assert not rig.drv.status & S_FEATURES_OK and rig.dev.acked == []
    assert rig.stats()["ignored"]["features-refused"] == 1


def test_features_ok_is_refused_for_bits_above_63() -> None:
    rig = Rig()
    rig.drv.add_status(S_ACKNOWLEDGE | S_DRIVER)
    rig.drv.writel(DRIVER_FEATURES_SEL, 2)
    rig.drv.writel(DRIVER_FEATURES, 1)
    with pytest.raises(DriverError):
        rig.drv.accept_features(VERSION_1)


def test_driver_features_are_frozen_after_features_ok() -> None:
    rig = Rig()
    rig.drv.add_status(S_ACKNOWLEDGE | S_DRIVER)
    rig.drv.accept_features(VERSION_1)
    rig.drv.writel(DRIVER_FEATURES_SEL, 0)
    rig.drv.writel(DRIVER_FEATURES, 1)
    assert rig.stats()["features"] == VERSION_1
    assert rig.stats()["ignored"]["features-after-features-ok"] == 1


def test_driver_ok_without_features_ok_needs_reset() -> None:
    rig = Rig()
    rig.drv.add_status(S_ACKNOWLEDGE | S_DRIVER | S_DRIVER_OK)
    assert rig.drv.status & S_NEEDS_RESET and not rig.drv.status & S_DRIVER_OK
    assert rig.dev.activations == []
    assert rig.stats()["errors"] == {"driver-ok-without-features-ok": 1}


def test_status_bits_cannot_be_cleared_except_by_reset() -> None:
    rig = Rig()
    rig.up()
    rig.drv.writel(STATUS, S_ACKNOWLEDGE)
    assert rig.drv.status == S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK
    assert rig.stats()["ignored"]["status-bit-cleared"] == 1
    assert len(rig.dev.activations) == 1


# --- queues -------------------------------------------------------------------------------
def test_queue_registers() -> None:
    rig = Rig()
    d = rig.drv
    d.writel(QUEUE_SEL, 1)
    assert d.readl(QUEUE_NUM_MAX) == 16 and d.readl(QUEUE_READY) == 0
    d.writel(QUEUE_SEL, 2)
    assert d.readl(QUEUE_NUM_MAX) == 0 and d.readl(QUEUE_READY) == 0
    d.writel(QUEUE_NUM, 8)  # no such queue: ignored
    assert rig.stats()["ignored"]["queue-register-no-such-queue"] == 1
    d.writel(QUEUE_SEL, 1)
    d.writel(QUEUE_NUM, 8)
    d.writel(QUEUE_DESC_LOW, 0x5000)
    d.writel(QUEUE_DESC_HIGH, 0x1)
    d.writel(QUEUE_READY, 1)
    assert d.readl(QUEUE_READY) == 1
    assert (d.readl(QUEUE_NUM), d.readl(QUEUE_DESC_LOW), d.readl(QUEUE_DESC_HIGH)) == (8, 0x5000, 1)
    d.writel(QUEUE_NUM, 4)  # a live queue keeps its layout
    assert d.readl(QUEUE_NUM) == 8 and rig.stats()["ignored"]["queue-register-while-ready"] == 1
    d.writel(QUEUE_READY, 0)
    assert d.readl(QUEUE_READY) == 0


@pytest.mark.parametrize("num, desc", [(0, 0x1000), (12, 0x1000), (32, 0x1000), (8, 0x1004)])
def test_bad_queue_setup_is_refused_and_needs_reset(num: int, desc: int) -> None:
    rig = Rig()
    d = rig.drv
    d.writel(QUEUE_SEL, 0)
    d.writel(QUEUE_NUM, num)
    d.writel(QUEUE_DESC_LOW, desc)
    d.writel(QUEUE_READY, 1)
    assert d.readl(QUEUE_READY) == 0
    assert d.status & S_NEEDS_RESET and rig.stats()["errors"] == {"bad-queue-config": 1}


def test_queue_not_set_up_is_a_disabled_placeholder() -> None:
    rig = Rig()
    rig.up(num_queues=1)
    q0, q1 = rig.dev.activations[0]
    assert q0.enabled and not q1.enabled and q1.pop() is None


def test_rings_outside_memory_fail_activation() -> None:
    rig = Rig()
    d = rig.drv
    d.add_status(S_ACKNOWLEDGE | S_DRIVER)
    d.accept_features(VERSION_1)
    d.writel(QUEUE_SEL, 0)
    d.writel(QUEUE_NUM, 8)
    d.writel(QUEUE_DESC_HIGH, 0x10)  # 64 GiB: no RAM there
    d.writel(QUEUE_READY, 1)
    d.driver_ok()
    assert d.status & S_NEEDS_RESET and rig.dev.activations == []
    assert rig.stats()["errors"] == {"ring-out-of-range": 1}
    assert rig.drv.interrupt() == INT_CONFIG


# --- traffic and interrupts -----------------------------------------------------------------
def test_echo_end_to_end_on_both_queues_with_interrupts() -> None:
    rig = Rig()
    q0, q1 = rig.up()
    q0.add([b"hello"], [5])
    assert q0.kick()
    assert rig.irqs == 1 and rig.drv.interrupt() == INT_VRING
    assert rig.drv.readl(INTERRUPT_STATUS) == 0  # acknowledged
    assert [u.data for u in q0.get_used()] == [b"olleh"]
    q1.add([b"ab", b"cd", b"ef"], [3, 3], indirect=True)
    q1.kick()
    assert [u.data for u in q1.get_used()] == [b"fedcba"]
    assert rig.irqs == 2
    assert [i for i, _ in rig.dev.notified] == [0, 1]
    s = rig.stats()
    assert s["notifications"] == 2 and s["interrupts"] == 2 and s["errors"] == {}
    assert [q["notifications"] for q in s["queues"]] == [1, 1]
    assert [q["pushed"] for q in s["queues"]] == [1, 1]


def test_interrupt_ack_clears_only_the_acknowledged_bits() -> None:
    rig = Rig()
    [q0, _] = rig.up()
    q0.add([b"x"], [1])
    q0.kick()
    rig.t.signal_config()
    assert rig.drv.readl(INTERRUPT_STATUS) == INT_VRING | INT_CONFIG
    rig.drv.writel(INTERRUPT_ACK, INT_VRING)
    assert rig.drv.readl(INTERRUPT_STATUS) == INT_CONFIG


def test_no_interrupt_flag_suppresses_used_interrupts() -> None:
    rig = Rig()
    [q0, _] = rig.up(wanted=ALL & ~(1 << F_EVENT_IDX))
    q0.disable_interrupts()
    q0.add([b"abc"], [3])
    q0.kick()
    assert rig.irqs == 0 and rig.drv.readl(INTERRUPT_STATUS) == 0
    assert q0.get_used()[0].data == b"cba"
    assert rig.stats()["interrupts-suppressed"] == 1


def test_event_idx_suppresses_interrupts_until_the_driver_catches_up() -> None:
    rig = Rig()
    [q0, _] = rig.up()
    assert rig.drv.has_feature(F_EVENT_IDX)
    q0.add([b"a"], [1])
    q0.kick()
    assert rig.irqs == 1
    q0.add([b"b"], [1])
    rig.t.notify(0)  # the driver would not kick (avail_event); force the device to look
    assert rig.irqs == 1  # used_event still 0: no second interrupt
    assert len(q0.get_used()) == 2  # moves used_event on
    q0.add([b"c"], [1])
    q0.kick()
    assert rig.irqs == 2


def test_notifications_before_driver_ok_or_for_no_queue_are_ignored() -> None:
    rig = Rig()
    rig.drv.writel(QUEUE_NOTIFY, 0)
    rig.up()
    rig.drv.writel(QUEUE_NOTIFY, 9)
    rig.t.notify(-1)
    assert rig.dev.notified == []
    ignored = rig.stats()["ignored"]
    assert ignored["notify-while-inactive"] == 1 and ignored["notify-no-such-queue"] == 2


def test_failing_interrupt_delivery_is_counted_not_raised() -> None:
    rig = Rig()
    [q0, _] = rig.up()

    def broken_irq() -> None:
        raise OSError(9, "Bad file descriptor")

    rig.t._interrupt = broken_irq
    q0.add([b"a"], [1])
    q0.kick()
    assert rig.stats()["interrupt-errors"] == 1 and q0.get_used()[0].data == b"a"


# --- reset --------------------------------------------------------------------------------
def test_status_zero_resets_registers_queues_and_device() -> None:
    rig = Rig()
    q0, _ = rig.up()
    q0.add([b"a"], [1])
    q0.kick()
    old_queues = rig.dev.activations[0]
    resets_before = rig.dev.resets
    rig.drv.writel(STATUS, 0)
    assert rig.dev.resets == resets_before + 1
    d = rig.drv
    assert d.status == 0 and d.readl(INTERRUPT_STATUS) == 0
    assert rig.stats()["features"] == 0
    d.writel(QUEUE_SEL, 0)
    assert d.readl(QUEUE_READY) == 0 and d.readl(QUEUE_NUM) == 0
    assert not old_queues[0].enabled  # a stale reference can no longer touch the rings
    d.writel(QUEUE_NOTIFY, 0)
    assert len(rig.dev.notified) == 1
    # and the device comes up again from scratch
    q0, _ = rig.up()
    q0.add([b"xy"], [2])
    q0.kick()
    assert q0.get_used()[0].data == b"yx" and len(rig.dev.activations) == 2


def test_machine_reset_also_clears_needs_reset() -> None:
    rig = Rig()
    rig.up()
    rig.t.fail("test: injected")
    assert rig.drv.status & S_NEEDS_RESET
    rig.t.reset()
    assert rig.drv.status == 0 and rig.stats()["resets"] == 2  # the driver's own + this one


# --- config space -----------------------------------------------------------------------------
def test_config_space_access_widths() -> None:
    rig = Rig()
    t = rig.t
    assert t.read(CONFIG, 1) == b"\x10"
    assert t.read(CONFIG + 2, 2) == b"\x12\x13"
    assert t.read(CONFIG + 4, 4) == bytes(range(0x14, 0x18))
    assert t.read(CONFIG + 8, 8) == bytes(range(0x18, 0x20))
    assert rig.drv.config_read(0, 8) == bytes(range(0x10, 0x18))  # Linux: two 32-bit reads
    assert t.read(CONFIG + 0x20, 4) == bytes(4)  # beyond the device's config: zeros
    rig.drv.config_write(4, b"\xaa\xbb")
    rig.drv.config_write(8, b"ABCDEFGH")
    assert rig.dev.config[4:6] == b"\xaa\xbb" and rig.dev.config[8:16] == b"ABCDEFGH"


@pytest.mark.parametrize("offset, size", [(CONFIG, 3), (CONFIG, 16), (CONFIG + 0xFC, 8), (0x300, 4)])
def test_bad_config_accesses_are_ignored(offset: int, size: int) -> None:
    rig = Rig()
    before = bytes(rig.dev.config)
    assert rig.t.read(offset, size) == bytes(size)
    rig.t.write(offset, b"\xff" * size)
    assert bytes(rig.dev.config) == before
    ignored = rig.stats()["ignored"]
    assert ignored["bad-config-read"] == 1 and ignored["bad-config-write"] == 1


def test_config_change_bumps_generation_and_interrupts_after_driver_ok() -> None:
    rig = Rig()
    rig.t.signal_config()
    assert rig.drv.readl(CONFIG_GENERATION) == 1 and rig.irqs == 0
    rig.up()
    rig.t.signal_config()
    assert rig.drv.readl(CONFIG_GENERATION) == 2 and rig.irqs == 1
    assert rig.drv.interrupt() == INT_CONFIG


def test_driver_rereads_config_when_generation_moves_mid_read() -> None:
    class Changing(EchoDevice):
        reads = 0

        def config_read(self, offset: int, size: int) -> bytes:
            self.reads += 1
            if self.reads == 1:  # a change lands between the driver's two generation reads
                self.config[0:4] = b"NEW!"
                self.transport_ref.signal_config()
            return super().config_read(offset, size)

    dev = Changing()
    rig = Rig(dev)
    dev.transport_ref = rig.t
    assert rig.drv.config_read(0, 4) == b"NEW!" and dev.reads == 2


# --- register access rules ----------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 2, 8])
def test_registers_need_32_bit_accesses(size: int) -> None:
    rig = Rig()
    assert rig.t.read(0, size) == bytes(size)  # not even the magic
    rig.t.write(STATUS, bytes([S_ACKNOWLEDGE]) + bytes(size - 1))
    assert rig.drv.status == 0
    ignored = rig.stats()["ignored"]
    assert ignored["bad-width-read"] == 1 and ignored["bad-width-write"] == 1


def test_misaligned_and_unknown_registers() -> None:
    rig = Rig()
    assert rig.t.read(0x2, 4) == bytes(4)
    assert rig.drv.readl(0x040) == 0  # legacy QueuePFN does not exist in version 2
    rig.drv.writel(0x028, 4096)      # legacy GuestPageSize
    ignored = rig.stats()["ignored"]
    assert ignored["bad-width-read"] == 1
    assert ignored["unknown-register-read"] == 1 and ignored["unknown-register-write"] == 1


def test_no_shared_memory_regions() -> None:
    rig = Rig()
    rig.drv.writel(SHM_SEL, 0)
    length = rig.drv.readl(SHM_LEN_LOW) | rig.drv.readl(SHM_LEN_HIGH) << 32
    assert length == (1 << 64) - 1


# --- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MALFORMED_CHAINS))
def test_malformed_chain_sets_needs_reset_and_stops_only_that_queue(name: str) -> None:
    reason, build = MALFORMED_CHAINS[name]
    rig = Rig()
    q0, q1 = rig.up()
    build(q0)
    rig.drv.writel(QUEUE_NOTIFY, 0)  # must not raise
    s = rig.stats()
    assert rig.drv.status & S_NEEDS_RESET
    assert s["errors"] == {reason: 1} and s["needs-reset"] == 1
    assert s["queues"][0]["broken"] == reason
    assert rig.irqs == 1 and rig.drv.interrupt() == INT_CONFIG
    rig.drv.writel(QUEUE_NOTIFY, 0)  # the stopped queue is not served again
    assert len(rig.dev.notified) == 1 and rig.stats()["ignored"]["notify-stopped-queue"] == 1
    q1.add([b"ok"], [2])             # the other queue still works
    q1.kick()
    assert q1.get_used()[0].data == b"ko"
    rig.up()                          # and a reset brings queue 0 back
    assert rig.drv.status & S_NEEDS_RESET == 0
    rig.drv.queues[0].add([b"again"], [5])
    rig.drv.queues[0].kick()
    assert rig.drv.queues[0].get_used()[0].data == b"niaga"


def test_indirect_without_negotiation_through_the_transport() -> None:
    rig = Rig()
    q0, _ = rig.up(wanted=ALL & ~(1 << F_INDIRECT_DESC))
    q0.add([b"a", b"b"], [2], indirect=True)
    q0.kick()
    assert rig.stats()["errors"] == {"indirect-not-negotiated": 1}


def test_device_write_to_a_read_only_chain_needs_reset() -> None:
    rig = Rig()
    q0, _ = rig.up()
    rig.dev.truncate = False
    q0.add([b"no room for the answer"], [])
    q0.kick()
    assert rig.stats()["errors"] == {"write-to-read-only": 1} and rig.drv.status & S_NEEDS_RESET


def test_device_exceptions_are_contained() -> None:
    rig = Rig()
    q0, _ = rig.up()
    rig.dev.raise_in_notify = KeyError("device bug")
    q0.add([b"a"], [1])
    q0.kick()
    assert rig.drv.status & S_NEEDS_RESET
    assert rig.stats()["errors"] == {"device-exception": 1}


def test_device_config_read_exception_reads_zeros() -> None:
    class Broken(EchoDevice):
        def config_read(self, offset: int, size: int) -> bytes:
            raise RuntimeError("bug")

    rig = Rig(Broken())
    assert rig.t.read(CONFIG, 4) == bytes(4)
    assert rig.stats()["errors"] == {"device-exception": 1}


def test_device_fail_counts_by_key_and_interrupts_once() -> None:
    rig = Rig()
    rig.up()
    rig.t.fail("plug-out-of-range: block 7 is outside the region")
    rig.t.fail("plug-out-of-range: block 9")
    rig.t.fail(str(VirtqueueError("detail", "gpa-out-of-range")))
    s = rig.stats()
    assert s["errors"] == {"plug-out-of-range": 2, "gpa-out-of-range": 1}
    assert s["needs-reset"] == 1 and rig.irqs == 1


# --- threads: event loop, ioeventfds, races -------------------------------------------------------
def wait_for(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.002)
    return cond()


@pytest.fixture
def loop():
    lp = EventLoop("test-events")
    lp.start()
    yield lp
    lp.close()


def test_event_loop_runs_callbacks_on_its_thread(loop: EventLoop) -> None:
    a = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    b = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    calls: list[tuple[str, str]] = []
    try:
        loop.add(a, lambda: calls.append(("a", threading.current_thread().name)))
        loop.add(b, lambda: calls.append(("b", threading.current_thread().name)))
        os.eventfd_write(a, 1)
        assert wait_for(lambda: len(calls) == 1)
        os.eventfd_write(b, 3)
        assert wait_for(lambda: len(calls) == 2)
        assert calls == [("a", "test-events"), ("b", "test-events")]
        with pytest.raises(BlockingIOError):
            os.eventfd_read(b)  # the loop drained the counter
        loop.remove(a)
        os.eventfd_write(a, 1)
        os.eventfd_write(b, 1)
        assert wait_for(lambda: len(calls) == 3)
        time.sleep(0.05)
        assert [c[0] for c in calls] == ["a", "b", "b"]
    finally:
        loop.remove(a)
        loop.remove(b)
        os.close(a)
        os.close(b)


def test_event_loop_survives_a_raising_callback(loop: EventLoop) -> None:
    bad = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    good = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    hits = []
    try:
        loop.add(bad, lambda: 1 / 0)
        loop.add(good, lambda: hits.append(1))
        for _ in range(3):
            os.eventfd_write(bad, 1)
            assert wait_for(lambda: loop.errors[bad] >= 1)
        assert wait_for(lambda: loop.stats()["callback-errors"] >= 1)
        os.eventfd_write(good, 1)
        assert wait_for(lambda: hits == [1])
        assert loop.running
        with pytest.raises(ValueError):
            loop.add(good, lambda: None)
    finally:
        loop.remove(bad)
        loop.remove(good)
        os.close(bad)
        os.close(good)


def test_event_loop_stop_and_restart() -> None:
    lp = EventLoop("restart")
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    hits = []
    try:
        lp.add(fd, lambda: hits.append(1))
        lp.start()
        lp.stop()
        assert not lp.running
        os.eventfd_write(fd, 1)
        time.sleep(0.05)
        assert hits == []  # nobody serves while stopped ...
        lp.start()
        assert wait_for(lambda: hits == [1])  # ... and a pending event is served on restart
    finally:
        lp.remove(fd)
        lp.close()
        os.close(fd)


class FakeVm:
    """Plays KVM's ioeventfd: a 4-byte QueueNotify write with a matching value signals the fd."""

    def __init__(self) -> None:
        self.assigned: dict[tuple[int, int], int] = {}
        self.calls: list[tuple] = []

    def ioeventfd(self, fd: int, addr: int, length: int, datamatch: int | None = None,
                  pio: bool = False, deassign: bool = False) -> None:
        self.calls.append((fd, addr, length, datamatch, deassign))
        if deassign:
            del self.assigned[(addr, datamatch)]
        else:
            self.assigned[(addr, datamatch)] = fd

    def guest_write(self, addr: int, value: int) -> bool:
        fd = self.assigned.get((addr, value))
        if fd is None:
            return False
        os.eventfd_write(fd, 1)
        return True


def test_ioeventfd_notifications_are_served_on_the_event_loop(loop: EventLoop) -> None:
    base = 0xD000_0000
    rig = Rig()
    vm = FakeVm()
    unbind = bind_ioeventfds(rig.t, vm, base, loop)
    assert [(c[1], c[2], c[3]) for c in vm.calls] == [(base + 0x50, 4, 0), (base + 0x50, 4, 1)]
    exits = []

    def kick(index: int) -> None:  # KVM: ioeventfd if one matches, else an MMIO exit
        if not vm.guest_write(base + QUEUE_NOTIFY, index):
            exits.append(index)
            rig.drv.writel(QUEUE_NOTIFY, index)

    rig.drv.notify = kick
    q0, q1 = rig.up()
    q1.add([b"via eventfd"], [11])
    q1.kick()
    assert wait_for(lambda: rig.drv.readl(INTERRUPT_STATUS) == INT_VRING)
    assert q1.get_used()[0].data == b"dftneve aiv"
    assert rig.dev.notified == [(1, "test-events")] and exits == []
    fds = [c[0] for c in vm.calls]
    unbind()
    assert vm.assigned == {} and [c[4] for c in vm.calls[2:]] == [True, True]
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_a_reset_that_wins_the_race_cancels_a_pending_notification() -> None:
    rig = Rig()
    q0, _ = rig.up()
    q0.add([b"a"], [1])
    with rig.t._device_lock:  # the vCPU thread is mid-reset when the event loop's notify arrives
        th = threading.Thread(target=rig.t.notify, args=(0,))
        th.start()
        assert wait_for(lambda: rig.stats()["notifications"] == 1)
        time.sleep(0.02)      # let it block on the device lock
        rig.drv.writel(STATUS, 0)
    th.join()
    assert rig.dev.notified == [] and rig.stats()["errors"] == {}


def test_resets_racing_with_event_loop_notifications() -> None:
    rig = Rig()
    rig.up()
    stop = threading.Event()
    errors: list[BaseException] = []

    def kicker() -> None:
        try:
            while not stop.is_set():
                for q in list(rig.drv.queues):
                    try:
                        q.add([b"race"], [4], indirect=True)
                    except DriverError:
                        pass  # ring full or torn down under us: the driver model is not thread-safe
                    rig.t.notify(q.index)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    th = threading.Thread(target=kicker)
    th.start()
    try:
        for _ in range(30):
            rig.drv.reset()
            rig.up()
    finally:
        stop.set()
        th.join()
    s = rig.stats()
    assert errors == []
    assert s["internal-errors"] == 0 and s["errors"].get("device-exception", 0) == 0
    assert s["resets"] >= 30 and sum(q["notifications"] for q in s["queues"]) > 0


# --- fuzzing: nothing escapes ------------------------------------------------------------------------
REGISTERS = [0x000, 0x004, 0x008, 0x00C, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044,
             0x050, 0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0A0, 0x0A4, 0x0AC, 0x0B0,
             0x0FC, 0x100, 0x104, 0x1FC]

register_ops = st.lists(st.tuples(
    st.sampled_from(["read", "write", "write", "write", "notify", "signal"]),
    st.one_of(st.sampled_from(REGISTERS), st.sampled_from(REGISTERS), st.integers(0, 0x2FF)),
    st.sampled_from([4, 4, 4, 4, 4, 1, 2, 8, 3]),
    st.one_of(st.integers(0, 16), st.sampled_from([0xF, 0x4F, 0xFF, 0x1000, 0xFFFF_FFFF]),
              st.integers(0, 0xFFFF_FFFF)),
), min_size=5, max_size=80)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(register_ops, st.sampled_from(["fresh", "features-ok", "live"]))
def test_random_register_traffic_never_raises(ops, start: str) -> None:
    rig = Rig()
    if start == "features-ok":  # mid bring-up: a queue programmed, DRIVER_OK still to come
        rig.drv.add_status(S_ACKNOWLEDGE | S_DRIVER)
        rig.drv.accept_features(VERSION_1 | 1 << F_EVENT_IDX)
        rig.drv.setup_queue(0).add([b"early"], [5])
    elif start == "live":  # a running device, so the traffic also hits live queues
        q0, _ = rig.up()
        q0.add([b"pending"], [7])
    for kind, offset, size, value in ops:
        if kind == "read":
            assert len(rig.t.read(offset, size)) == size
        elif kind == "write":
            rig.t.write(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
        elif kind == "notify":
            rig.t.notify(value)
        else:
            rig.t.signal_used(value % 3)
    s = rig.stats()
    assert s["internal-errors"] == 0 and s["errors"].get("device-exception", 0) == 0
    assert 0 <= rig.drv.status <= 0xFF


descriptors = st.lists(st.tuples(
    st.one_of(st.sampled_from(["buf", "buf", "buf", "ring", "edge"]), st.integers(0, (1 << 64) - 1)),
    st.one_of(st.integers(0, 64), st.sampled_from([0x10, 0x20, 0xFFFF_FFFF, 1 << 25])),
    st.one_of(st.sampled_from([0, DESC_F_WRITE, DESC_F_NEXT, DESC_F_NEXT | DESC_F_WRITE]),
              st.integers(0, 7)),  # NEXT | WRITE | INDIRECT in any mix
    st.one_of(st.integers(0, 8), st.integers(0, 20)),  # next, sometimes out of range
), min_size=8, max_size=8)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(descriptors, st.lists(st.integers(0, 9), min_size=8, max_size=8),
       st.one_of(st.integers(0, 8), st.integers(0, 0xFFFF)), st.booleans())
def test_random_rings_never_raise(descs, heads, avail_idx, use_table) -> None:
    rig = Rig()
    q0, _ = rig.up(queue_size=8)
    buf = rig.drv.alloc.alloc(0x100)
    table = rig.drv.alloc.alloc(16 * 8)
    for i, (addr, length, flags, nxt) in enumerate(descs):
        addr = {"buf": buf, "ring": q0.desc_addr, "edge": (1 << 20) - 16}.get(addr, addr)
        q0.write_desc(i, addr, length, flags, nxt)
        if use_table:  # the same entries as an indirect table reachable from descriptor 0
            q0.write_desc(i, addr, length, flags & ~DESC_F_INDIRECT, nxt, table=table)
    if use_table:
        q0.write_desc(0, table, 16 * 8, DESC_F_INDIRECT)
    for i, h in enumerate(heads):
        q0.mem.write(q0.avail_addr + 4 + 2 * i, struct.pack("<H", h))
    q0.set_avail_idx(avail_idx)
    rig.drv.writel(QUEUE_NOTIFY, 0)
    rig.t.notify(0)
    s = rig.stats()
    assert s["internal-errors"] == 0 and s["errors"].get("device-exception", 0) == 0
    if rig.drv.status & S_NEEDS_RESET:
        assert s["needs-reset"] == 1 and sum(s["errors"].values()) == 1
        assert s["queues"][0]["broken"] in s["errors"]
    else:  # everything made available was served
        assert s["queues"][0]["last-avail-idx"] == avail_idx and s["queues"][0]["broken"] is None
