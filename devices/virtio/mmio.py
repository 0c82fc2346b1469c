"""The virtio-mmio transport, version 2 ("modern"): the register window Linux's virtio_mmio
driver programs, in front of any `VirtioDevice`.

Register layout, status handshake and queue setup follow VIRTIO 1.2 "Virtio Over MMIO" and
Linux drivers/virtio/virtio_mmio.c (names from include/uapi/linux/virtio_mmio.h). Registers
(0x000..0x0ff) accept only aligned 32-bit accesses, as the spec requires; any other access is
ignored (reads as zero) and counted. The device config space at 0x100 takes 1, 2, 4 and 8-byte
accesses. VendorID is 0x554D4551 ("QEMU"), the value Linux guests and tools already know for
emulated virtio devices; no driver checks it.

Queue notifications: the machine registers one ioeventfd per queue on QueueNotify (offset
0x50, 4 bytes, datamatch = the queue index, which is exactly what Linux writes) and has an
`EventLoop` call `notify(index)`; `bind_ioeventfds()` does this. Without an ioeventfd a
QueueNotify write reaches `write()` and is served on the vCPU thread. Interrupts go out through
the `interrupt` callable (an irqfd write in production), once per event: the transport does
not model a line level.

Errors: a malformed chain (`VirtqueueError`), a device that raises, or a driver that breaks the
protocol (bad queue setup, DRIVER_OK without FEATURES_OK) sets DEVICE_NEEDS_RESET, counts the
reason, logs it (once per reason at warning level) and sends a config interrupt if DRIVER_OK is
set. A queue that produced a chain error is stopped until the device is reset. Nothing raises
out of `read`, `write`, `notify` or the `TransportCallbacks`.

Locking: `_lock` guards the register state and is never held while calling the device or the
interrupt callable. `_device_lock` serializes the device's lifecycle and queue callbacks
(ack_features, activate, queue_notify, reset); it may be taken before `_lock`, never after.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from devices.virtio.device import (
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VirtioDevice,
    feature,
)
from devices.virtio.queue import E_BAD_QUEUE, VIRTQ_MAX_SIZE, Virtqueue, VirtqueueError

log = logging.getLogger(__name__)

# Register offsets (include/uapi/linux/virtio_mmio.h).
VIRTIO_MMIO_MAGIC_VALUE = 0x000
VIRTIO_MMIO_VERSION = 0x004
VIRTIO_MMIO_DEVICE_ID = 0x008
VIRTIO_MMIO_VENDOR_ID = 0x00C
VIRTIO_MMIO_DEVICE_FEATURES = 0x010
VIRTIO_MMIO_DEVICE_FEATURES_SEL = 0x014
VIRTIO_MMIO_DRIVER_FEATURES = 0x020
VIRTIO_MMIO_DRIVER_FEATURES_SEL = 0x024
VIRTIO_MMIO_QUEUE_SEL = 0x030
VIRTIO_MMIO_QUEUE_NUM_MAX = 0x034
VIRTIO_MMIO_QUEUE_NUM = 0x038
VIRTIO_MMIO_QUEUE_READY = 0x044
VIRTIO_MMIO_QUEUE_NOTIFY = 0x050
VIRTIO_MMIO_INTERRUPT_STATUS = 0x060
VIRTIO_MMIO_INTERRUPT_ACK = 0x064
VIRTIO_MMIO_STATUS = 0x070
VIRTIO_MMIO_QUEUE_DESC_LOW = 0x080
VIRTIO_MMIO_QUEUE_DESC_HIGH = 0x084
VIRTIO_MMIO_QUEUE_AVAIL_LOW = 0x090   # the spec's QueueDriverLow
VIRTIO_MMIO_QUEUE_AVAIL_HIGH = 0x094
VIRTIO_MMIO_QUEUE_USED_LOW = 0x0A0    # the spec's QueueDeviceLow
VIRTIO_MMIO_QUEUE_USED_HIGH = 0x0A4
VIRTIO_MMIO_SHM_SEL = 0x0AC
VIRTIO_MMIO_SHM_LEN_LOW = 0x0B0
VIRTIO_MMIO_SHM_LEN_HIGH = 0x0B4
VIRTIO_MMIO_SHM_BASE_LOW = 0x0B8
VIRTIO_MMIO_SHM_BASE_HIGH = 0x0BC
VIRTIO_MMIO_CONFIG_GENERATION = 0x0FC
VIRTIO_MMIO_CONFIG = 0x100

VIRTIO_MMIO_INT_VRING = 1 << 0
VIRTIO_MMIO_INT_CONFIG = 1 << 1

VIRTIO_MMIO_MAGIC = 0x74726976   # "virt", little endian
VIRTIO_MMIO_VERSION_MODERN = 2
VIRTIO_MMIO_VENDOR = 0x554D4551  # "QEMU"
VIRTIO_MMIO_SIZE = 0x200         # registers + 0x100 bytes of config space
CONFIG_SPACE_SIZE = VIRTIO_MMIO_SIZE - VIRTIO_MMIO_CONFIG
REGISTER_WIDTH = 4
CONFIG_ACCESS_SIZES = (1, 2, 4, 8)
NO_SHM_REGION = 0xFFFF_FFFF      # both halves of the 64-bit length ~0: "no such region"
FEATURE_WORDS = 2                # 64 feature bits, paged 32 at a time

# The ring/transport features this transport and `Virtqueue` implement.
TRANSPORT_FEATURES = (feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_RING_F_INDIRECT_DESC)
                      | feature(VIRTIO_RING_F_EVENT_IDX))

_U32 = 0xFFFF_FFFF


@dataclass
class _QueueRegs:
    """One queue as the driver programmed it through QueueSel."""

    num: int = 0
    ready: bool = False
    desc: int = 0
    avail: int = 0
    used: int = 0


def _set_half(value: int, half: int, high: bool) -> int:
    """Replace the low or high 32 bits of a 64-bit address register pair."""
    return (value & _U32) | (half << 32) if high else (value & ~_U32) | half


class VirtioMmioTransport:
    """A BusDevice of size 0x200 exposing `device` through virtio-mmio version 2."""

    SIZE = VIRTIO_MMIO_SIZE
    QUEUE_NOTIFY_OFFSET = VIRTIO_MMIO_QUEUE_NOTIFY

    def __init__(self, device: VirtioDevice, mem, interrupt: Callable[[], None], name: str) -> None:
        self.device = device
        self.mem = mem
        self.name = name
        self._interrupt = interrupt
        self._lock = threading.Lock()
        self._device_lock = threading.RLock()
        self.counts: Counter[str] = Counter()    # notifications, interrupts, ...
        self.ignored: Counter[str] = Counter()   # accesses ignored, by kind
        self.errors: Counter[str] = Counter()    # NEEDS_RESET causes, by reason
        self.needs_reset_count = 0
        self.config_generation = 0
        self._queue_notifies = [0] * device.num_queues
        self._reset_registers()

    def _reset_registers(self) -> None:
        """Power-on register state (caller holds `_lock`, or is the constructor)."""
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self._driver_features_bad = False  # bits written beyond the 64 we have
        self.features = 0                  # negotiated, fixed at FEATURES_OK
        self.queue_sel = 0
        self.shm_sel = 0
        self.interrupt_status = 0
        self._queues = [_QueueRegs() for _ in range(self.device.num_queues)]
        self._active: list[Virtqueue] | None = None

    # --- BusDevice ----------------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        try:
            if offset >= VIRTIO_MMIO_CONFIG:
                return self._config_read(offset - VIRTIO_MMIO_CONFIG, size)
            if size != REGISTER_WIDTH or offset % REGISTER_WIDTH or offset < 0:
                self._ignore("bad-width-read", offset, size)
                return bytes(size)
            return (self._read_register(offset) & _U32).to_bytes(REGISTER_WIDTH, "little")
        except Exception:
            self._internal_error("read", offset)
            return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        try:
            if offset >= VIRTIO_MMIO_CONFIG:
                self._config_write(offset - VIRTIO_MMIO_CONFIG, bytes(data))
            elif len(data) != REGISTER_WIDTH or offset % REGISTER_WIDTH or offset < 0:
                self._ignore("bad-width-write", offset, len(data))
            else:
                self._write_register(offset, int.from_bytes(data, "little"))
        except Exception:
            self._internal_error("write", offset)

    # --- registers ----------------------------------------------------------------------
    def offered_features(self) -> int:
        """DeviceFeatures: the device's bits plus the transport's."""
        try:
            dev = self.device.device_features()
        except Exception as e:
            self._device_error("device_features", e)
            dev = 0
        return (dev | TRANSPORT_FEATURES) & ((1 << 64) - 1)

    def _read_register(self, offset: int) -> int:
        if offset == VIRTIO_MMIO_MAGIC_VALUE:
            return VIRTIO_MMIO_MAGIC
        if offset == VIRTIO_MMIO_VERSION:
            return VIRTIO_MMIO_VERSION_MODERN
        if offset == VIRTIO_MMIO_DEVICE_ID:
            return self.device.device_id
        if offset == VIRTIO_MMIO_VENDOR_ID:
            return VIRTIO_MMIO_VENDOR
        if offset == VIRTIO_MMIO_DEVICE_FEATURES:
            sel = self.device_features_sel
            return self.offered_features() >> (32 * sel) if sel < FEATURE_WORDS else 0
        if offset in (VIRTIO_MMIO_SHM_LEN_LOW, VIRTIO_MMIO_SHM_LEN_HIGH,
                      VIRTIO_MMIO_SHM_BASE_LOW, VIRTIO_MMIO_SHM_BASE_HIGH):
            return NO_SHM_REGION
        with self._lock:
            if offset == VIRTIO_MMIO_STATUS:
                return self.status
            if offset == VIRTIO_MMIO_INTERRUPT_STATUS:
                return self.interrupt_status
            if offset == VIRTIO_MMIO_CONFIG_GENERATION:
                return self.config_generation
            if offset == VIRTIO_MMIO_DEVICE_FEATURES_SEL:
                return self.device_features_sel
            if offset == VIRTIO_MMIO_DRIVER_FEATURES_SEL:
                return self.driver_features_sel
            if offset == VIRTIO_MMIO_DRIVER_FEATURES:
                sel = self.driver_features_sel
                return self.driver_features >> (32 * sel) if sel < FEATURE_WORDS else 0
            if offset == VIRTIO_MMIO_QUEUE_SEL:
                return self.queue_sel
            if offset == VIRTIO_MMIO_SHM_SEL:
                return self.shm_sel
            q = self._selected_queue()
            if offset == VIRTIO_MMIO_QUEUE_NUM_MAX:
                return self.device.queue_max_size if q else 0
            if offset == VIRTIO_MMIO_QUEUE_READY:
                return int(q.ready) if q else 0
            # The spec makes these write-only; reading back what was written helps debugging.
            if q is not None:
                regs = {VIRTIO_MMIO_QUEUE_NUM: q.num,
                        VIRTIO_MMIO_QUEUE_DESC_LOW: q.desc, VIRTIO_MMIO_QUEUE_DESC_HIGH: q.desc >> 32,
                        VIRTIO_MMIO_QUEUE_AVAIL_LOW: q.avail, VIRTIO_MMIO_QUEUE_AVAIL_HIGH: q.avail >> 32,
                        VIRTIO_MMIO_QUEUE_USED_LOW: q.used, VIRTIO_MMIO_QUEUE_USED_HIGH: q.used >> 32}
                if offset in regs:
                    return regs[offset]
        self._ignore("unknown-register-read", offset, REGISTER_WIDTH)
        return 0

    def _selected_queue(self) -> _QueueRegs | None:
        sel = self.queue_sel
        return self._queues[sel] if sel < len(self._queues) else None

    def _write_register(self, offset: int, value: int) -> None:
        if offset == VIRTIO_MMIO_STATUS:
            self._write_status(value)
            return
        if offset == VIRTIO_MMIO_QUEUE_NOTIFY:
            self.notify(value)
            return
        fail = None
        with self._lock:
            if offset == VIRTIO_MMIO_DEVICE_FEATURES_SEL:
                self.device_features_sel = value
            elif offset == VIRTIO_MMIO_DRIVER_FEATURES_SEL:
                self.driver_features_sel = value
            elif offset == VIRTIO_MMIO_DRIVER_FEATURES:
                self._write_driver_features(value)
            elif offset == VIRTIO_MMIO_INTERRUPT_ACK:
                self.interrupt_status &= ~value
            elif offset == VIRTIO_MMIO_QUEUE_SEL:
                self.queue_sel = value
            elif offset == VIRTIO_MMIO_SHM_SEL:
                self.shm_sel = value
            elif offset in (VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_READY,
                            VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH,
                            VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
                            VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH):
                fail = self._write_queue_register(offset, value)
            else:
                self._ignore_locked("unknown-register-write", offset, REGISTER_WIDTH)
        if fail:
            self.fail(fail)

    def _write_driver_features(self, value: int) -> None:
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK:
            self._ignore_locked("features-after-features-ok", VIRTIO_MMIO_DRIVER_FEATURES, REGISTER_WIDTH)
            return
        sel = self.driver_features_sel
        if sel < FEATURE_WORDS:
            shift = 32 * sel
            self.driver_features = (self.driver_features & ~(_U32 << shift)) | (value << shift)
        elif value:
            self._driver_features_bad = True  # accepting a bit >= 64 that we never offered

    def _write_queue_register(self, offset: int, value: int) -> str | None:
        """A queue register write (with `_lock` held); returns a failure reason, if any."""
        q = self._selected_queue()
        if q is None:
            self._ignore_locked("queue-register-no-such-queue", offset, REGISTER_WIDTH)
            return None
        if offset == VIRTIO_MMIO_QUEUE_READY:
            return self._write_queue_ready(q, bool(value))
        if q.ready:
            # The spec forbids changing a live queue's layout; keep the one in use.
            self._ignore_locked("queue-register-while-ready", offset, REGISTER_WIDTH)
            return None
        if offset == VIRTIO_MMIO_QUEUE_NUM:
            q.num = value
        elif offset in (VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH):
            q.desc = _set_half(q.desc, value, offset == VIRTIO_MMIO_QUEUE_DESC_HIGH)
        elif offset in (VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH):
            q.avail = _set_half(q.avail, value, offset == VIRTIO_MMIO_QUEUE_AVAIL_HIGH)
        else:
            q.used = _set_half(q.used, value, offset == VIRTIO_MMIO_QUEUE_USED_HIGH)
        return None

    def _write_queue_ready(self, q: _QueueRegs, ready: bool) -> str | None:
        index = self.queue_sel
        if not ready:
            q.ready = False
            if self._active is not None:
                self._active[index].disable()
            return None
        if q.ready:
            return None
        if self._active is not None:
            # Queues are handed to the device at DRIVER_OK; without VIRTIO_F_RING_RESET there
            # is no way to add one later.
            self._ignore_locked("queue-ready-after-driver-ok", VIRTIO_MMIO_QUEUE_READY, REGISTER_WIDTH)
            return None
        num = q.num
        if not 0 < num <= min(self.device.queue_max_size, VIRTQ_MAX_SIZE) or num & (num - 1):
            return (f"{E_BAD_QUEUE}: queue {index}: size {num} is not a power of two "
                    f"<= QueueNumMax {self.device.queue_max_size}")
        if q.desc % 16 or q.avail % 2 or q.used % 4:
            return (f"{E_BAD_QUEUE}: queue {index}: misaligned rings (desc {q.desc:#x}, "
                    f"avail {q.avail:#x}, used {q.used:#x})")
        q.ready = True
        return None

    # --- status, reset, activation ------------------------------------------------------
    def _write_status(self, value: int) -> None:
        value &= 0xFF
        with self._device_lock:
            if value == 0:
                self._reset_device()
                return
            offered = self.offered_features()
            ack = None
            fail = None
            activate = False
            with self._lock:
                old = self.status
                requested = value & ~VIRTIO_CONFIG_S_NEEDS_RESET  # that bit is the device's
                if old & ~requested & ~VIRTIO_CONFIG_S_NEEDS_RESET:
                    # The driver may only add bits (0 resets); keep the ones it dropped.
                    self._ignore_locked("status-bit-cleared", VIRTIO_MMIO_STATUS, REGISTER_WIDTH)
                new = old | requested
                added = requested & ~old
                if added & VIRTIO_CONFIG_S_FEATURES_OK:
                    problem = self._feature_problem(offered)
                    if problem:
                        new &= ~VIRTIO_CONFIG_S_FEATURES_OK  # the driver reads it back and gives up
                        self._ignore_locked("features-refused", VIRTIO_MMIO_STATUS, REGISTER_WIDTH)
                        log.info("%s: refusing FEATURES_OK: %s", self.name, problem)
                    else:
                        self.features = ack = self.driver_features
                if added & VIRTIO_CONFIG_S_DRIVER_OK:
                    if not new & VIRTIO_CONFIG_S_FEATURES_OK:
                        new &= ~VIRTIO_CONFIG_S_DRIVER_OK
                        fail = "driver-ok-without-features-ok: DRIVER_OK set before FEATURES_OK was accepted"
                    else:
                        activate = True
                self.status = new
            if ack is not None:
                try:
                    self.device.ack_features(ack)
                except Exception as e:
                    self._device_error("ack_features", e)
            if fail:
                self.fail(fail)
            if activate:
                self._activate()

    def _feature_problem(self, offered: int) -> str | None:
        accepted = self.driver_features
        if self._driver_features_bad:
            return "driver accepted feature bits above 63"
        if accepted & ~offered:
            return f"driver accepted features {accepted & ~offered:#x} that were not offered"
        if not accepted & feature(VIRTIO_F_VERSION_1):
            return "driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported)"
        return None

    def _activate(self) -> None:
        """DRIVER_OK: build the virtqueues and start the device (`_device_lock` held)."""
        with self._lock:
            regs = [_QueueRegs(q.num, q.ready, q.desc, q.avail, q.used) for q in self._queues]
            features = self.features
        event_idx = bool(features & feature(VIRTIO_RING_F_EVENT_IDX))
        indirect = bool(features & feature(VIRTIO_RING_F_INDIRECT_DESC))
        queues = []
        for index, q in enumerate(regs):
            if not q.ready:
                queues.append(Virtqueue(self.mem, 0, 0, 0, 0))
                continue
            try:
                queues.append(Virtqueue(self.mem, q.num, q.desc, q.avail, q.used, event_idx,
                                        indirect=indirect, max_chain_bytes=self.device.max_chain_bytes))
            except VirtqueueError as e:
                self._record_error(e.reason, f"queue {index}: {e.detail}")
                return
        with self._lock:
            self._active = queues
        try:
            self.device.activate(queues, self.mem, self)
        except Exception as e:
            with self._lock:
                self._active = None
            for vq in queues:
                vq.disable()
            self._device_error("activate", e)

    def _reset_device(self) -> None:
        """Status = 0 (`_device_lock` held): registers, queues and device to power-on state."""
        with self._lock:
            old = self._active
            self._reset_registers()
            self.counts["resets"] += 1
        for vq in old or ():
            vq.disable()  # a device thread still holding a queue can no longer touch the rings
        try:
            self.device.reset()
        except Exception as e:
            self._device_error("reset", e)

    def reset(self) -> None:
        """Machine reset: the same as the driver writing 0 to Status."""
        with self._device_lock:
            self._reset_device()

    # --- notifications and interrupts ---------------------------------------------------
    def notify(self, queue_index: int) -> None:
        """The driver kicked queue `queue_index` (an ioeventfd or a QueueNotify write)."""
        try:
            with self._lock:
                self.counts["notifications"] += 1
                active = self._active
                if not 0 <= queue_index < len(self._queues):
                    self._ignore_locked("notify-no-such-queue", VIRTIO_MMIO_QUEUE_NOTIFY, REGISTER_WIDTH)
                    return
                self._queue_notifies[queue_index] += 1
                if active is None:
                    self._ignore_locked("notify-while-inactive", VIRTIO_MMIO_QUEUE_NOTIFY, REGISTER_WIDTH)
                    return
                vq = active[queue_index]
                if not vq.enabled or vq.broken:
                    self._ignore_locked("notify-stopped-queue", VIRTIO_MMIO_QUEUE_NOTIFY, REGISTER_WIDTH)
                    return
            with self._device_lock:
                if self._active is not active:  # a reset got in first
                    return
                try:
                    self.device.queue_notify(queue_index)
                except VirtqueueError as e:
                    self._queue_error(queue_index, vq, e)
                except Exception as e:
                    self._device_error("queue_notify", e)
        except Exception:
            self._internal_error("notify", queue_index)

    def signal_used(self, queue_index: int) -> None:
        try:
            with self._lock:
                active = self._active
            if active is None or not 0 <= queue_index < len(active):
                with self._lock:
                    self._ignore_locked("signal-used-while-inactive", VIRTIO_MMIO_QUEUE_NOTIFY, 0)
                return
            vq = active[queue_index]
            try:
                wanted = vq.needs_interrupt()
            except VirtqueueError as e:
                self._queue_error(queue_index, vq, e)
                return
            with self._lock:
                if not wanted:
                    self.counts["interrupts-suppressed"] += 1
                    return
                self.interrupt_status |= VIRTIO_MMIO_INT_VRING
            self._fire()
        except Exception:
            self._internal_error("signal_used", queue_index)

    def signal_config(self) -> None:
        try:
            with self._lock:
                self.config_generation = (self.config_generation + 1) & _U32
                self.counts["config-changes"] += 1
                fire = bool(self.status & VIRTIO_CONFIG_S_DRIVER_OK)
                if fire:
                    self.interrupt_status |= VIRTIO_MMIO_INT_CONFIG
            if fire:
                self._fire()
        except Exception:
            self._internal_error("signal_config", 0)

    def fail(self, reason: str) -> None:
        """Set DEVICE_NEEDS_RESET; `reason` is "key: detail" and is counted by its key."""
        try:
            key, _, detail = str(reason).partition(":")
            self._record_error(key.strip()[:64] or "unspecified", detail.strip())
        except Exception:
            self._internal_error("fail", 0)

    def _queue_error(self, index: int, vq: Virtqueue, e: VirtqueueError) -> None:
        if vq.broken is None:
            vq.broken = e.reason  # stop the queue even if the error came from a chain helper
        self._record_error(e.reason, f"queue {index}: {e.detail}")

    def _device_error(self, what: str, e: Exception) -> None:
        if not self.errors["device-exception"]:
            log.error("%s: device %s raised", self.name, what, exc_info=e)
        self._record_error("device-exception", f"{what} raised {type(e).__name__}: {e}")

    def _record_error(self, key: str, detail: str) -> None:
        with self._lock:
            self.errors[key] += 1
            first = self.errors[key] == 1
            newly = not self.status & VIRTIO_CONFIG_S_NEEDS_RESET
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET
            fire = newly and bool(self.status & VIRTIO_CONFIG_S_DRIVER_OK)
            if newly:
                self.needs_reset_count += 1
            if fire:  # the spec asks for a config-change notification with NEEDS_RESET
                self.interrupt_status |= VIRTIO_MMIO_INT_CONFIG
        (log.warning if first else log.debug)("%s: device needs reset: %s: %s", self.name, key, detail)
        if fire:
            self._fire()

    def _fire(self) -> None:
        with self._lock:
            self.counts["interrupts"] += 1
        try:
            self._interrupt()
        except Exception:
            with self._lock:
                self.counts["interrupt-errors"] += 1
                first = self.counts["interrupt-errors"] == 1
            if first:
                log.exception("%s: raising the interrupt failed", self.name)

    # --- config space -------------------------------------------------------------------
    def _config_read(self, offset: int, size: int) -> bytes:
        if size not in CONFIG_ACCESS_SIZES or offset + size > CONFIG_SPACE_SIZE:
            self._ignore("bad-config-read", VIRTIO_MMIO_CONFIG + offset, size)
            return bytes(size)
        try:
            data = bytes(self.device.config_read(offset, size))
        except Exception as e:
            self._device_error("config_read", e)
            return bytes(size)
        return data[:size].ljust(size, b"\0")

    def _config_write(self, offset: int, data: bytes) -> None:
        if len(data) not in CONFIG_ACCESS_SIZES or offset + len(data) > CONFIG_SPACE_SIZE:
            self._ignore("bad-config-write", VIRTIO_MMIO_CONFIG + offset, len(data))
            return
        try:
            self.device.config_write(offset, data)
        except Exception as e:
            self._device_error("config_write", e)

    # --- accounting ---------------------------------------------------------------------
    def _ignore(self, kind: str, offset: int, size: int) -> None:
        with self._lock:
            self._ignore_locked(kind, offset, size)

    def _ignore_locked(self, kind: str, offset: int, size: int) -> None:
        self.ignored[kind] += 1
        if self.ignored[kind] == 1:
            log.info("%s: ignored %s (offset %#x, %d bytes; logged once per kind)", self.name, kind, offset, size)

    def _internal_error(self, what: str, arg: int) -> None:
        with self._lock:
            self.counts["internal-errors"] += 1
            first = self.counts["internal-errors"] == 1
        if first:
            log.exception("%s: internal error in %s(%#x)", self.name, what, arg)

    def stats(self) -> dict:
        with self._lock:
            active = self._active
            out = {
                "status": self.status,
                "features": self.features,
                "config-generation": self.config_generation,
                "interrupt-status": self.interrupt_status,
                "notifications": self.counts["notifications"],
                "interrupts": self.counts["interrupts"],
                "interrupts-suppressed": self.counts["interrupts-suppressed"],
                "interrupt-errors": self.counts["interrupt-errors"],
                "config-changes": self.counts["config-changes"],
                "resets": self.counts["resets"],
                "internal-errors": self.counts["internal-errors"],
                "needs-reset": self.needs_reset_count,
                "errors": dict(self.errors),
                "ignored": dict(self.ignored),
            }
            notifies = list(self._queue_notifies)
        queues = []
        for i in range(self.device.num_queues):
            q = active[i].stats() if active is not None else {"enabled": False}
            q["notifications"] = notifies[i]
            queues.append(q)
        out["queues"] = queues
        return out


def bind_ioeventfds(transport: VirtioMmioTransport, vm, base: int, loop) -> Callable[[], None]:
    """Wire one ioeventfd per queue to `transport.notify` on `loop`; returns an unbind function.

    `vm` is a `vmm.kvm.VmFd` (anything with ``ioeventfd(fd, addr, length, datamatch=,
    deassign=)``), `base` the guest-physical base of the MMIO window, `loop` an `EventLoop`.
    Linux's notify is a 4-byte write of the queue index, hence length 4 and datamatch = index.
    """
    addr = base + VIRTIO_MMIO_QUEUE_NOTIFY
    bound: list[tuple[int, int]] = []

    def unbind() -> None:
        while bound:
            index, fd = bound.pop()
            loop.remove(fd)
            try:
                vm.ioeventfd(fd, addr, REGISTER_WIDTH, datamatch=index, deassign=True)
            except OSError as e:
                log.warning("%s: deassigning the ioeventfd of queue %d failed: %s", transport.name, index, e)
            os.close(fd)

    try:
        for index in range(transport.device.num_queues):
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            try:
                vm.ioeventfd(fd, addr, REGISTER_WIDTH, datamatch=index)
            except BaseException:
                os.close(fd)
                raise
            bound.append((index, fd))
            loop.add(fd, functools.partial(transport.notify, index))
    except BaseException:
        unbind()
        raise
    return unbind
