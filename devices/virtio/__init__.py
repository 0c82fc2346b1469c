"""virtio: the virtio-mmio (version 2) transport, split virtqueues and the device event loop.

A new device subclasses `VirtioDevice` (device.py) and is exposed with
``VirtioMmioTransport(device, mem, interrupt, name)`` on the MMIO bus; see mmio.py for what
the machine wires (ioeventfds through `bind_ioeventfds`, an irqfd as `interrupt`).
"""

from devices.virtio.device import TransportCallbacks, VirtioDevice
from devices.virtio.event_loop import EventLoop
from devices.virtio.mmio import VirtioMmioTransport, bind_ioeventfds
from devices.virtio.queue import DescriptorChain, Virtqueue, VirtqueueError

__all__ = ["DescriptorChain", "EventLoop", "TransportCallbacks", "VirtioDevice", "VirtioMmioTransport",
           "Virtqueue", "VirtqueueError", "bind_ioeventfds"]
