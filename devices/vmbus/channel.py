"""An open VMBus channel: the two rings carved out of its GPADL, where the host signals the
guest, and the `VmbusChannel` object a device model sends through.

OPENCHANNEL names a GPADL and downstream_ringbuffer_pageoffset (in 4 KiB pages). The guest's
outbound ring (the host reads) is GPADL pages [0, offset), its inbound ring (the host writes)
pages [offset, end); each needs its header page and at least one data page
(drivers/hv/channel.c __vmbus_open, hv_ringbuffer_init). A `Channel` object lives for one
open: after the close, its `send()` returns False for ever, and a reopen makes a new one.
"""

from __future__ import annotations

from typing import Protocol

from devices.hyperv.interfaces import GuestMemoryAccess
from devices.vmbus.constants import HV_HYP_PAGE_SHIFT, HV_HYP_PAGE_SIZE
from devices.vmbus.gpadl import Gpadl
from devices.vmbus.ring import MIN_RING_PAGES, RingError, RingReader, RingWriter
from vmm.memory import GuestMemoryError


class ChannelSetupError(Exception):
    """The guest's OPENCHANNEL cannot be served; `reason` is a short key for counting."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def make_rings(mem: GuestMemoryAccess, gpadl: Gpadl, downstream_offset: int) -> tuple[RingReader, RingWriter]:
    """The (outbound, inbound) rings of a channel opened on `gpadl`."""
    pages = gpadl.ring_pages()
    if pages is None:
        raise ChannelSetupError("open-gpadl-not-page-aligned", f"gpadl {gpadl.handle:#x}")
    if not MIN_RING_PAGES <= downstream_offset <= len(pages) - MIN_RING_PAGES:
        raise ChannelSetupError("open-bad-ring-offset",
                                f"downstream offset {downstream_offset} in a {len(pages)}-page gpadl")
    try:
        for pfn in pages:       # every page must be guest memory now (it may still go away later)
            mem.read(pfn << HV_HYP_PAGE_SHIFT, 1)
            mem.read((pfn << HV_HYP_PAGE_SHIFT) + HV_HYP_PAGE_SIZE - 1, 1)
        return RingReader(mem, pages[:downstream_offset]), RingWriter(mem, pages[downstream_offset:])
    except RingError as e:
        raise ChannelSetupError("open-" + e.reason, str(e)) from e
    except GuestMemoryError as e:
        raise ChannelSetupError("open-ring-not-in-guest-memory", str(e)) from e


class ChannelHost(Protocol):
    """What a channel needs from its bus."""

    def channel_send(self, channel: "Channel", payload: bytes, trans_id: int, completion_requested: bool) -> bool: ...


class Channel:
    """One open channel (implements devices.hyperv.interfaces.VmbusChannel)."""

    def __init__(self, host: ChannelHost, relid: int, openid: int, target_vp: int, gpadl_handle: int,
                 reader: RingReader, writer: RingWriter) -> None:
        self._host = host
        self.relid = relid
        self.openid = openid
        self.target_vp = target_vp
        self.gpadl_handle = gpadl_handle
        self.reader = reader
        self.writer = writer
        self.is_open = True
        self.packets_in = 0
        self.packets_out = 0

    def send(self, payload: bytes, trans_id: int = 0, completion_requested: bool = False) -> bool:
        """Write one VM_PKT_DATA_INBAND packet to the guest's inbound ring and signal the guest
        if it needs it. False if the channel is closed or the ring has no room (the guest is
        then asked to signal when it has made room; a device with a `writable(channel)` method
        is called at that point). Safe from any thread, including from the device's own
        callbacks (the bus never calls them with its lock held)."""
        return self._host.channel_send(self, bytes(payload), trans_id, completion_requested)

    def __repr__(self) -> str:
        state = "open" if self.is_open else "closed"
        return f"<vmbus Channel relid={self.relid} {state} target_vp={self.target_vp}>"
