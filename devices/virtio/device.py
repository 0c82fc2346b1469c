"""What a virtio device implements, and what its transport offers it in return.

A device (virtio-mem, a test echo device, ...) subclasses `VirtioDevice` and knows nothing of
MMIO registers: the transport (`devices.virtio.mmio.VirtioMmioTransport`) does feature
negotiation, status, queue setup and interrupts, and calls the device at these points:

* ``device_features()`` when the driver reads DeviceFeatures (device-specific bits only; the
  transport adds the ring/transport bits it implements),
* ``ack_features(features)`` once, when the driver sets FEATURES_OK and the transport accepts,
* ``config_read`` / ``config_write`` for the device configuration space (vCPU threads),
* ``activate(queues, mem, transport)`` when the driver sets DRIVER_OK,
* ``queue_notify(index)`` when the driver kicks a queue (event-loop thread, or the vCPU
  thread if no ioeventfd is wired),
* ``reset()`` on a device reset (Status = 0) and on machine reset; also on a device that was
  never activated.

Threading: ``ack_features``, ``activate``, ``queue_notify`` and ``reset`` are serialized by the
transport (one at a time), so a reset never runs in the middle of ``queue_notify``.
``config_read``/``config_write`` are *not* serialized with them, and a device may call the
``TransportCallbacks`` from any thread, so a device guards its own config state. The callbacks
never raise.

Names and numbers are the kernel's (include/uapi/linux/virtio_config.h, virtio_ids.h).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from devices.virtio.queue import Virtqueue
    from vmm.memory import GuestMemory

# Device IDs (virtio_ids.h).
VIRTIO_ID_MEM = 24

# Device status bits (the Status register).
VIRTIO_CONFIG_S_ACKNOWLEDGE = 0x01
VIRTIO_CONFIG_S_DRIVER = 0x02
VIRTIO_CONFIG_S_DRIVER_OK = 0x04
VIRTIO_CONFIG_S_FEATURES_OK = 0x08
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80

# Feature bit numbers (bit n means 1 << n). Transport/ring bits live in 28..41.
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_NOTIFICATION_DATA = 38
VIRTIO_TRANSPORT_F_START = 28
VIRTIO_TRANSPORT_F_END = 42


def feature(bit: int) -> int:
    """The feature mask of one feature bit number."""
    return 1 << bit


class TransportCallbacks(Protocol):
    """What a device may ask of its transport (from any thread; none of these raise)."""

    def signal_used(self, queue_index: int) -> None:
        """Used buffers were pushed: interrupt the driver unless it suppressed interrupts."""

    def signal_config(self) -> None:
        """The config space changed (call after the change): bump ConfigGeneration, interrupt."""

    def fail(self, reason: str) -> None:
        """Set DEVICE_NEEDS_RESET. `reason` is "key: detail"; the key is what gets counted."""


class VirtioDevice(ABC):
    """A virtio device model, independent of the transport that exposes it."""

    device_id: int
    num_queues: int
    queue_max_size: int = 256
    # Upper bound on the bytes one descriptor chain may describe (readable + writable); a
    # larger chain is a malformed-chain error. Devices with small requests should lower it.
    max_chain_bytes: int = 16 << 20

    @abstractmethod
    def device_features(self) -> int:
        """Device-specific feature bits offered to the driver."""

    def ack_features(self, features: int) -> None:
        """The feature set the driver accepted (the transport checked it is a subset)."""
        self.acked_features = features

    @abstractmethod
    def config_read(self, offset: int, size: int) -> bytes:
        """`size` bytes of config space at `offset`; short answers are padded with zeros."""

    def config_write(self, offset: int, data: bytes) -> None:
        """A driver write to config space; read-only by default (ignored)."""

    @abstractmethod
    def activate(self, queues: list["Virtqueue"], mem: "GuestMemory", transport: TransportCallbacks) -> None:
        """DRIVER_OK: start serving. `queues` has `num_queues` entries; a queue the driver did not
        set up is a disabled `Virtqueue` (``enabled`` is False, ``pop()`` returns None)."""

    @abstractmethod
    def queue_notify(self, index: int) -> None:
        """The driver made buffers available on queue `index`. A `VirtqueueError` raised from here
        is caught by the transport (queue stopped, NEEDS_RESET, counted)."""

    @abstractmethod
    def reset(self) -> None:
        """Back to the power-on state: forget the queues and any in-flight requests."""
