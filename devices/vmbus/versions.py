"""Which VMBus protocol versions the host accepts, and what each version changes on the wire.

Linux 5.x-6.x (drivers/hv/connection.c, vmbus_versions[]) offers, newest first, 5.3, 5.2, 5.1,
5.0, 4.1, 4.0, 3.0 (WIN8_1) and 2.4 (WIN8) and takes the first one the host accepts. All of
them signal channels through per-channel SynIC event flags, which is all this host
implements; WS2008 (0.13) and WIN7 (1.1), which need the shared interrupt page, are refused,
as is any number Linux never sends.
"""

from __future__ import annotations

from devices.vmbus.constants import (
    VERSION_WIN8,
    VERSION_WIN8_1,
    VERSION_WIN10,
    VERSION_WIN10_V4_1,
    VERSION_WIN10_V5,
    VERSION_WIN10_V5_1,
    VERSION_WIN10_V5_2,
    VERSION_WIN10_V5_3,
)

SUPPORTED_VERSIONS: frozenset[int] = frozenset({
    VERSION_WIN10_V5_3,
    VERSION_WIN10_V5_2,
    VERSION_WIN10_V5_1,
    VERSION_WIN10_V5,
    VERSION_WIN10_V4_1,
    VERSION_WIN10,
    VERSION_WIN8_1,
    VERSION_WIN8,
})


def is_supported(version: int) -> bool:
    """True if the host accepts INITIATE_CONTACT for `version`."""
    return version in SUPPORTED_VERSIONS


def version_name(version: int) -> str:
    """'major.minor', e.g. '5.3'."""
    return f"{version >> 16}.{version & 0xFFFF}"


def uses_msg_conn_id(version: int) -> bool:
    """From 5.0 on, INITIATE_CONTACT carries msg_sint/msg_vtl instead of the interrupt page and
    VERSION_RESPONSE names the connection id for all later messages."""
    return version >= VERSION_WIN10_V5


def supports_modifychannel(version: int) -> bool:
    """CHANNELMSG_MODIFYCHANNEL exists from 4.1 on (vmbus_send_modifychannel)."""
    return version >= VERSION_WIN10_V4_1


def modifychannel_needs_response(version: int) -> bool:
    """From 5.3 on the guest waits for CHANNELMSG_MODIFYCHANNEL_RESPONSE."""
    return version >= VERSION_WIN10_V5_3
