"""The seams between the Hyper-V layers, so each can be built and unit-tested alone.

    vCPU (MSR exits, hypercall port)  ->  hyperv partition: synthetic MSRs, hypercalls, SynIC
    partition  --HvPostMessage/HvSignalEvent by connection id-->  VMBus
    VMBus      --SynicPort: messages and event flags to a vCPU-->  partition
    VMBus      --VmbusChannel / VmbusDevice-->  hv-balloon (and later devices)

Threads: hypercalls arrive on vCPU threads, control-plane requests (QMP) on others. Every
implementation of these protocols is safe to call from any thread.
"""

from __future__ import annotations

import uuid
from typing import Callable, Protocol

# Hypervisor status codes (TLFS "HV_STATUS"); a hypercall handler returns one of these.
HV_STATUS_SUCCESS = 0x0000
HV_STATUS_INVALID_HYPERCALL_CODE = 0x0002
HV_STATUS_INVALID_HYPERCALL_INPUT = 0x0003
HV_STATUS_INVALID_ALIGNMENT = 0x0004
HV_STATUS_INVALID_PARAMETER = 0x0005
HV_STATUS_INSUFFICIENT_MEMORY = 0x000B
HV_STATUS_INVALID_PORT_ID = 0x0011
HV_STATUS_INVALID_CONNECTION_ID = 0x0012
HV_STATUS_INSUFFICIENT_BUFFERS = 0x0013


class GuestMemoryAccess(Protocol):
    """Guest-physical reads and writes; raises vmm.memory.GuestMemoryError when unbacked."""

    def read(self, gpa: int, size: int) -> bytes: ...
    def write(self, gpa: int, data: bytes) -> None: ...


class SynicPort(Protocol):
    """What the partition's SynIC offers to VMBus."""

    def post_message(self, vp: int, sint: int, message_type: int, payload: bytes) -> bool:
        """Queue a message (payload <= 240 bytes) for `vp`'s SINT `sint`; it is written into
        the SIMP slot when the slot is free (EOM handling) and the SINT's vector is raised.
        False if `vp` or `sint` does not exist."""
        ...

    def signal_event(self, vp: int, sint: int, flag: int) -> bool:
        """Set event flag `flag` (0..2047) in `vp`'s SIEFP page for `sint`, then raise the
        SINT's vector. False if the SIEFP page or the SINT is not enabled."""
        ...


MessageHandler = Callable[[int, bytes], int]   # (message_type, payload) -> HV status
EventHandler = Callable[[], int]                # () -> HV status


class ConnectionRegistry(Protocol):
    """Where VMBus registers the connection ids the guest posts messages and signals events
    to. An id with no handler makes the hypercall fail with HV_STATUS_INVALID_CONNECTION_ID."""

    def register_message(self, connection_id: int, handler: MessageHandler) -> None: ...
    def register_event(self, connection_id: int, handler: EventHandler) -> None: ...
    def unregister_event(self, connection_id: int) -> None: ...


class VmbusChannel(Protocol):
    """An open channel, as a device sees it."""

    relid: int

    def send(self, payload: bytes, trans_id: int = 0, completion_requested: bool = False) -> bool:
        """Write one in-band data packet (VM_PKT_DATA_INBAND) to the guest's inbound ring and
        signal the guest if it asked to be. False if the channel is closed or the ring full."""
        ...


class VmbusDevice(Protocol):
    """A device model offered on the VMBus (hv-balloon, ...)."""

    name: str
    class_id: uuid.UUID        # the interface type GUID the guest driver matches
    instance_id: uuid.UUID

    def opened(self, channel: VmbusChannel) -> None:
        """The guest opened the channel: rings are set up, packets may flow."""
        ...

    def packet(self, channel: VmbusChannel, payload: bytes, trans_id: int) -> None:
        """One in-band packet from the guest (the payload without the vmpacket header)."""
        ...

    def closed(self) -> None:
        """The channel is gone: closed by the guest, the bus unloaded, or the machine reset."""
        ...
