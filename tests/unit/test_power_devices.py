"""Tests for the power devices: ACPI sleep/reset registers, the i8042 reset command, pvpanic."""

from __future__ import annotations

import pytest

from bus import Bus
from devices.acpi_pm import AcpiPmRegisters, I8042ResetPort
from devices.pvpanic import PVPANIC_PORT, PvPanic

# Sleep control register (ACPI 6.x, "Sleep Control Register"): SLP_TYP in bits 2-4, SLP_EN bit 5.
SLP_EN = 0x20
S5 = 5 << 2
S3 = 3 << 2


class Calls:
    def __init__(self) -> None:
        self.poweroff = 0
        self.reset = 0

    def pm(self, reset_value: int = 1) -> AcpiPmRegisters:
        return AcpiPmRegisters(on_poweroff=self._off, on_reset=self._reset, reset_value=reset_value)

    def _off(self) -> None:
        self.poweroff += 1

    def _reset(self) -> None:
        self.reset += 1


def test_s5_with_slp_en_powers_off() -> None:
    c = Calls()
    c.pm().write(0, bytes([S5 | SLP_EN]))
    assert (c.poweroff, c.reset) == (1, 0)


@pytest.mark.parametrize("value", [S5, SLP_EN, S3 | SLP_EN, (7 << 2) | SLP_EN, (4 << 2) | SLP_EN, 0])
def test_other_sleep_writes_do_nothing(value: int) -> None:
    c = Calls()
    c.pm().write(0, bytes([value]))
    assert (c.poweroff, c.reset) == (0, 0)


def test_exactly_the_s5_values_power_off() -> None:
    """Over all 256 byte values: power off iff SLP_EN is set and SLP_TYP is 5 (other bits free)."""
    powering = []
    for value in range(256):
        c = Calls()
        c.pm().write(0, bytes([value]))
        if c.poweroff:
            powering.append(value)
        assert c.reset == 0
    assert powering == [v for v in range(256) if v & 0b0011_1100 == 0b0011_0100]
    assert len(powering) == 16


def test_sleep_status_is_write_one_to_clear() -> None:
    pm = Calls().pm()
    pm.sleep_status = 0x81  # WAK_STS (bit 7) and bit 0 pending
    assert pm.read(1, 1) == b"\x81"
    pm.write(1, b"\x80")
    assert pm.read(1, 1) == b"\x01"
    pm.write(1, b"\x00")  # writing 0 changes nothing
    assert pm.read(1, 1) == b"\x01"
    pm.write(1, b"\xff")
    assert pm.read(1, 1) == b"\x00"


def test_control_and_reset_registers_read_zero() -> None:
    pm = Calls().pm()
    pm.sleep_status = 0xFF
    assert pm.read(0, 1) == b"\x00"
    assert pm.read(2, 1) == b"\x00"
    assert pm.read(1, 2) == b"\xff\x00"  # wider reads keep their size


def test_reset_register_only_with_the_reset_value() -> None:
    c = Calls()
    pm = c.pm()
    for value in (0, 2, 0xFE, 0xFF):
        pm.write(2, bytes([value]))
    assert c.reset == 0
    pm.write(2, b"\x01")
    assert (c.reset, c.poweroff) == (1, 0)


def test_reset_value_is_configurable() -> None:
    c = Calls()
    pm = c.pm(reset_value=6)  # what a FADT with RESET_VALUE = 6 would announce
    pm.write(2, b"\x01")
    assert c.reset == 0
    pm.write(2, b"\x06")
    assert c.reset == 1


def test_pm_registers_on_the_bus_at_their_ports() -> None:
    c = Calls()
    bus = Bus("pio")
    bus.register(0x600, AcpiPmRegisters.SIZE, c.pm(), "acpi-pm")
    bus.write(0x600, bytes([S5 | SLP_EN]))
    bus.write(0x602, b"\x01")
    assert (c.poweroff, c.reset) == (1, 1)
    bus.write(0x603, b"\x01")  # one past the block: nobody's
    assert bus.unclaimed[0x603] == 1


def test_i8042_reset_command() -> None:
    c = Calls()
    port = I8042ResetPort(on_reset=c._reset)
    for value in (0x00, 0xAA, 0xD1, 0xFF):
        port.write(0, bytes([value]))
    assert c.reset == 0
    port.write(0, b"\xfe")
    assert c.reset == 1
    # status reads: input buffer empty (bit 1 clear), so a kernel polling it does not hang
    assert port.read(0, 1)[0] & 0x02 == 0


def test_pvpanic_read_returns_supported_events() -> None:
    dev = PvPanic(on_event=lambda e: None)
    assert dev.read(0, 1) == b"\x03"  # PANICKED (bit 0) | CRASH_LOADED (bit 1)
    assert dev.read(0, 2) == b"\x03\x00"


@pytest.mark.parametrize("value,event", [(1, 1), (2, 2), (3, 3), (0xF1, 1), (0x80, None), (0, None)])
def test_pvpanic_write_reports_supported_events(value: int, event: int | None) -> None:
    seen: list[int] = []
    dev = PvPanic(on_event=seen.append)
    dev.write(0, bytes([value]))
    assert seen == ([] if event is None else [event])


def test_pvpanic_port_is_qemus() -> None:
    assert PVPANIC_PORT == 0x505
