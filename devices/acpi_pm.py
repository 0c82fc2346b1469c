"""Power-management registers of a hardware-reduced ACPI machine, plus the i8042 reset port.

The FADT points the guest at these ports: it powers off by writing SLP_TYP(_S5)|SLP_EN to
the sleep control register and resets by writing the reset value to the reset register.
Older or non-ACPI reboot paths pulse the i8042 "system reset" command, which is honoured too.
"""

from __future__ import annotations

from typing import Callable

SLP_EN = 1 << 5
SLP_TYP_SHIFT = 2
SLP_TYP_MASK = 0x7
S5_SLEEP_TYPE = 5  # must match the DSDT's _S5_ package
WAK_STS = 1 << 7
I8042_CMD_RESET = 0xFE
I8042_STATUS_IDLE = 0x00


class AcpiPmRegisters:
    """Bus device for three consecutive byte ports: sleep control, sleep status, reset."""

    SLEEP_CONTROL = 0
    SLEEP_STATUS = 1
    RESET = 2
    SIZE = 3

    def __init__(self, on_poweroff: Callable[[], None], on_reset: Callable[[], None], reset_value: int = 1) -> None:
        self._on_poweroff = on_poweroff
        self._on_reset = on_reset
        self._reset_value = reset_value
        self.sleep_status = 0

    def read(self, offset: int, size: int) -> bytes:
        value = self.sleep_status if offset == self.SLEEP_STATUS else 0
        return bytes([value]) + b"\0" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        value = data[0]
        if offset == self.SLEEP_CONTROL:
            if value & SLP_EN and (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == S5_SLEEP_TYPE:
                self._on_poweroff()
        elif offset == self.SLEEP_STATUS:
            self.sleep_status &= ~value  # write-1-to-clear
        elif offset == self.RESET and value == self._reset_value:
            self._on_reset()


class I8042ResetPort:
    """Port 0x64: reads as an idle controller, command 0xFE resets the machine."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset

    def read(self, offset: int, size: int) -> bytes:
        return bytes([I8042_STATUS_IDLE]) * size

    def write(self, offset: int, data: bytes) -> None:
        if data[0] == I8042_CMD_RESET:
            self._on_reset()
