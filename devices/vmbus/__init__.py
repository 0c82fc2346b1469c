"""VMBus, host side: the channel-management protocol and ring-buffer data path a Linux
hv_vmbus guest uses, so Hyper-V device models (hv-balloon, ...) can be offered to it.

    bus.VmBus          the bus: messages, GPADLs, channels, stats; the entry point
    channel.Channel    an open channel as a device sees it (send)
    ring               the two ring buffers of a channel in guest memory
    gpadl              GPADL assembly and validation
    messages           channel messages on the wire
    packets            vmpacket framing
    versions           which protocol versions are accepted
    deferred           the ordered queue of effects run outside the bus lock
    constants          protocol numbers, named as in Linux
"""

from devices.vmbus.bus import VmBus
from devices.vmbus.channel import Channel

__all__ = ["VmBus", "Channel"]
