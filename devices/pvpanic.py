"""The pvpanic device (ACPI id QEMU0001, one I/O port): the guest kernel reports a panic.

Linux's pvpanic driver reads the port to learn which events the device supports, and
writes the event bits from its panic notifier.
"""

from __future__ import annotations

from typing import Callable

PVPANIC_PANICKED = 1 << 0
PVPANIC_CRASH_LOADED = 1 << 1
PVPANIC_SUPPORTED = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED
PVPANIC_ACPI_HID = "QEMU0001"
PVPANIC_PORT = 0x505


class PvPanic:
    def __init__(self, on_event: Callable[[int], None]) -> None:
        self._on_event = on_event

    def read(self, offset: int, size: int) -> bytes:
        return bytes([PVPANIC_SUPPORTED]) + b"\0" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        events = data[0] & PVPANIC_SUPPORTED
        if events:
            self._on_event(events)
