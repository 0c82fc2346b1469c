"""Tests for devices.serial: the 16550A register model as Linux's 8250 driver uses it."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.serial import (
    BAUD_BASE,
    FIFO_SIZE,
    UART_FCR,
    UART_FCR_CLEAR_RCVR,
    UART_FCR_CLEAR_XMIT,
    UART_FCR_ENABLE_FIFO,
    UART_FCR_TRIGGER_8,
    UART_FCR_TRIGGER_14,
    UART_IER,
    UART_IER_ALL_INTR,
    UART_IER_MSI,
    UART_IER_RDI,
    UART_IER_RLSI,
    UART_IER_THRI,
    UART_IIR,
    UART_IIR_MSI,
    UART_IIR_NO_INT,
    UART_IIR_RDI,
    UART_IIR_RLSI,
    UART_IIR_RX_TIMEOUT,
    UART_IIR_THRI,
    UART_LCR,
    UART_LCR_DLAB,
    UART_LSR,
    UART_LSR_DR,
    UART_LSR_OE,
    UART_LSR_TEMT,
    UART_LSR_THRE,
    UART_MCR,
    UART_MCR_DTR,
    UART_MCR_LOOP,
    UART_MCR_OUT1,
    UART_MCR_OUT2,
    UART_MCR_RTS,
    UART_MSR,
    UART_MSR_CTS,
    UART_MSR_DCD,
    UART_MSR_DCTS,
    UART_MSR_DDCD,
    UART_MSR_DDSR,
    UART_MSR_DSR,
    UART_MSR_RI,
    UART_MSR_STATUS_BITS,
    UART_MSR_TERI,
    UART_RX,
    UART_SCR,
    UART_TX,
    Serial16550,
)

IIR_ID_MASK = 0x0F
IIR_FIFO_BITS = 0xC0
LCR_CONF_MODE_B = 0xBF
LCR_WLEN8 = 0x03
IER_UUE = 0x40
FCR7_64BYTE = 0x20
IIR_64BYTE_FIFO = 0x20
LCR_NATSEMI_BANK2 = 0xE0


class FakeIrq:
    """Records every level the device drives."""

    def __init__(self) -> None:
        self.level = False
        self.calls: list[bool] = []

    def set_level(self, level: bool) -> None:
        self.calls.append(level)
        self.level = level


class Rig:
    def __init__(self, rx_limit: int | None = None) -> None:
        self.irq = FakeIrq()
        self.out = bytearray()
        kwargs = {} if rx_limit is None else {"rx_limit": rx_limit}
        self.uart = Serial16550(self.irq, self.out.extend, "ttyS0", **kwargs)

    def inb(self, offset: int) -> int:
        data = self.uart.read(offset, 1)
        assert len(data) == 1
        return data[0]

    def outb(self, offset: int, value: int) -> None:
        self.uart.write(offset, bytes((value,)))

    def iir_id(self) -> int:
        return self.inb(UART_IIR) & IIR_ID_MASK


@pytest.fixture
def rig() -> Rig:
    return Rig()


# ---- the probe and startup sequences of drivers/tty/serial/8250/8250_port.c ----

def linux_autoconfig(r: Rig) -> str:
    """The register traffic of autoconfig() + autoconfig_16550a() (full-probe path)."""
    scratch = r.inb(UART_IER)
    r.outb(UART_IER, 0)
    scratch2 = r.inb(UART_IER) & UART_IER_ALL_INTR
    r.outb(UART_IER, UART_IER_ALL_INTR)
    scratch3 = r.inb(UART_IER) & UART_IER_ALL_INTR
    r.outb(UART_IER, scratch)
    if scratch2 != 0 or scratch3 != UART_IER_ALL_INTR:
        return "IER test failed"

    save_mcr = r.inb(UART_MCR)
    save_lcr = r.inb(UART_LCR)
    r.outb(UART_MCR, UART_MCR_LOOP | UART_MCR_OUT2 | UART_MCR_RTS)
    status1 = r.inb(UART_MSR) & UART_MSR_STATUS_BITS
    r.outb(UART_MCR, save_mcr)
    if status1 != UART_MSR_DCD | UART_MSR_CTS:
        return "LOOP test failed"

    r.outb(UART_LCR, LCR_CONF_MODE_B)
    r.outb(2, 0)                                        # EFR (FCR on a 16550A)
    r.outb(UART_LCR, 0)
    r.outb(UART_FCR, UART_FCR_ENABLE_FIFO)
    fifo_bits = r.inb(UART_IIR) & IIR_FIFO_BITS
    if fifo_bits != IIR_FIFO_BITS:
        return {0x00: "8250/16450", 0x80: "16550"}.get(fifo_bits, "unknown")

    kind = "16550A"
    # EFR present with DLAB set? (ST16C650V1)
    r.outb(UART_LCR, UART_LCR_DLAB)
    if r.inb(2) == 0:
        return "16650 or FSL64"
    # EFR with LCR=0xBF? (ST16C650V2, TI16C752)
    r.outb(UART_LCR, LCR_CONF_MODE_B)
    if r.inb(2) == 0:
        return "EFRv2"
    # National Semiconductor bank-2 EXCR1 mirrors MCR.LOOP?
    r.outb(UART_LCR, 0)
    mcr = r.inb(UART_MCR)
    r.outb(UART_LCR, LCR_NATSEMI_BANK2)
    excr1 = r.inb(2)
    if not (excr1 ^ mcr) & UART_MCR_LOOP:
        r.outb(UART_LCR, 0)
        r.outb(UART_MCR, mcr ^ UART_MCR_LOOP)
        r.outb(UART_LCR, LCR_NATSEMI_BANK2)
        excr1 = r.inb(2)
        r.outb(UART_LCR, 0)
        r.outb(UART_MCR, mcr)
        if (excr1 ^ mcr) & UART_MCR_LOOP:
            return "NS16550A"
    # TI16750: IIR bit 5 only with DLAB set.
    r.outb(UART_LCR, 0)
    r.outb(UART_FCR, UART_FCR_ENABLE_FIFO | FCR7_64BYTE)
    st1 = r.inb(UART_IIR) & (IIR_FIFO_BITS | IIR_64BYTE_FIFO)
    r.outb(UART_FCR, UART_FCR_ENABLE_FIFO)
    r.outb(UART_LCR, UART_LCR_DLAB)
    r.outb(UART_FCR, UART_FCR_ENABLE_FIFO | FCR7_64BYTE)
    st2 = r.inb(UART_IIR) & (IIR_FIFO_BITS | IIR_64BYTE_FIFO)
    r.outb(UART_FCR, UART_FCR_ENABLE_FIFO)
    r.outb(UART_LCR, 0)
    if st1 == IIR_FIFO_BITS and st2 == IIR_FIFO_BITS | IIR_64BYTE_FIFO:
        return "16750"
    # XScale: IER bit 6 (UUE) writable?
    iersave = r.inb(UART_IER)
    r.outb(UART_IER, iersave & ~IER_UUE)
    if not r.inb(UART_IER) & IER_UUE:
        r.outb(UART_IER, iersave | IER_UUE)
        if r.inb(UART_IER) & IER_UUE:
            return "XScale"
    r.outb(UART_IER, iersave)
    if linux_size_fifo(r) == 64:
        return "U6_16550A"

    r.outb(UART_LCR, save_lcr)
    r.outb(UART_MCR, save_mcr)
    linux_clear_fifos(r)
    r.inb(UART_RX)
    r.outb(UART_IER, 0)
    return kind


def linux_size_fifo(r: Rig) -> int:
    old_lcr = r.inb(UART_LCR)
    r.outb(UART_LCR, 0)
    old_mcr = r.inb(UART_MCR)
    r.outb(UART_FCR, UART_FCR_ENABLE_FIFO | UART_FCR_CLEAR_RCVR | UART_FCR_CLEAR_XMIT)
    r.outb(UART_MCR, UART_MCR_LOOP)
    r.outb(UART_LCR, UART_LCR_DLAB)
    old_dl = r.inb(0) | r.inb(1) << 8
    r.outb(0, 1)
    r.outb(1, 0)
    r.outb(UART_LCR, LCR_WLEN8)
    for count in range(256):
        r.outb(UART_TX, count)
    count = 0
    while r.inb(UART_LSR) & UART_LSR_DR and count < 256:
        r.inb(UART_RX)
        count += 1
    r.outb(UART_FCR, 0)
    r.outb(UART_MCR, old_mcr)
    r.outb(UART_LCR, UART_LCR_DLAB)
    r.outb(0, old_dl & 0xFF)
    r.outb(1, old_dl >> 8)
    r.outb(UART_LCR, old_lcr)
    return count


def linux_clear_fifos(r: Rig) -> None:
    r.outb(UART_FCR, UART_FCR_ENABLE_FIFO)
    r.outb(UART_FCR, UART_FCR_ENABLE_FIFO | UART_FCR_CLEAR_RCVR | UART_FCR_CLEAR_XMIT)
    r.outb(UART_FCR, 0)


def test_linux_autoconfig_detects_16550a(rig: Rig) -> None:
    assert linux_autoconfig(rig) == "16550A"
    assert rig.out == b"", "loopback bytes must not reach the host"
    assert rig.uart.stats()["loop_overruns"] > 0     # size_fifo overran the 16-byte FIFO
    assert not rig.irq.level


def test_size_fifo_counts_sixteen(rig: Rig) -> None:
    assert linux_size_fifo(rig) == FIFO_SIZE
    # The probe restored everything, and a later byte goes to the host again.
    rig.outb(UART_TX, ord("A"))
    assert rig.out == b"A"


def test_autoconfig_leaves_host_input_alone_until_fifo_clear(rig: Rig) -> None:
    rig.uart.feed(b"typed during boot")
    assert linux_autoconfig(rig) == "16550A"
    # clear_fifos at the end of the probe discards what was received, as hardware does.
    assert not rig.inb(UART_LSR) & UART_LSR_DR
    assert rig.uart.stats()["rx_flushed"] >= len(b"typed during boot")


def test_scratch_register_roundtrip(rig: Rig) -> None:
    for value in (0x00, 0x55, 0xAA, 0xFF):
        rig.outb(UART_SCR, value)
        assert rig.inb(UART_SCR) == value


def test_ier_keeps_low_nibble_only(rig: Rig) -> None:
    rig.outb(UART_IER, 0xFF)
    assert rig.inb(UART_IER) == UART_IER_ALL_INTR


def test_loopback_msr_mirrors_mcr_and_deltas(rig: Rig) -> None:
    assert rig.inb(UART_MSR) & UART_MSR_STATUS_BITS == UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS
    rig.outb(UART_MCR, UART_MCR_LOOP)
    msr = rig.inb(UART_MSR)
    assert msr & UART_MSR_STATUS_BITS == 0
    assert msr & 0x0F == UART_MSR_DCTS | UART_MSR_DDSR | UART_MSR_DDCD
    assert rig.inb(UART_MSR) & 0x0F == 0, "delta bits clear on read"
    cases = [
        (UART_MCR_RTS, UART_MSR_CTS),
        (UART_MCR_DTR, UART_MSR_DSR),
        (UART_MCR_OUT1, UART_MSR_RI),
        (UART_MCR_OUT2, UART_MSR_DCD),
    ]
    for mcr_bit, msr_bit in cases:
        rig.outb(UART_MCR, UART_MCR_LOOP | mcr_bit)
        assert rig.inb(UART_MSR) & UART_MSR_STATUS_BITS == msr_bit
    # RI: the delta (TERI) is raised only on the trailing edge.
    rig.outb(UART_MCR, UART_MCR_LOOP | UART_MCR_OUT1)
    rig.inb(UART_MSR)
    rig.outb(UART_MCR, UART_MCR_LOOP)
    assert rig.inb(UART_MSR) & UART_MSR_TERI


def test_loopback_thr_goes_to_rbr(rig: Rig) -> None:
    rig.outb(UART_MCR, UART_MCR_LOOP)
    rig.outb(UART_TX, 0x5A)
    assert rig.inb(UART_LSR) & UART_LSR_DR
    assert rig.inb(UART_RX) == 0x5A
    assert not rig.inb(UART_LSR) & UART_LSR_DR
    assert rig.out == b""
    # Without a FIFO the receiver holds one byte; a second overruns.
    rig.outb(UART_TX, 1)
    rig.outb(UART_TX, 2)
    assert rig.inb(UART_LSR) & (UART_LSR_DR | UART_LSR_OE) == UART_LSR_DR | UART_LSR_OE
    assert rig.inb(UART_RX) == 1


def test_fifo_detection_iir_bits(rig: Rig) -> None:
    assert rig.inb(UART_IIR) & IIR_FIFO_BITS == 0
    rig.outb(UART_FCR, UART_FCR_ENABLE_FIFO)
    assert rig.inb(UART_IIR) == IIR_FIFO_BITS | UART_IIR_NO_INT
    assert rig.uart.fifo_enabled
    rig.outb(UART_FCR, 0)
    assert rig.inb(UART_IIR) == UART_IIR_NO_INT


def test_baud_divisor_via_dlab(rig: Rig) -> None:
    rig.outb(UART_IER, UART_IER_RDI)
    rig.outb(UART_LCR, UART_LCR_DLAB | LCR_WLEN8)
    rig.outb(0, 0x01)       # DLL
    rig.outb(1, 0x00)       # DLM
    assert rig.uart.baud == BAUD_BASE == 115200
    rig.outb(0, 0x0C)
    assert rig.uart.baud == 9600
    assert (rig.inb(0), rig.inb(1)) == (0x0C, 0x00)
    rig.outb(UART_LCR, LCR_WLEN8)
    assert rig.inb(UART_IER) == UART_IER_RDI, "DLAB writes must not touch IER"
    assert rig.out == b"", "DLAB writes must not transmit"
    assert rig.uart.divisor == 0x0C


def test_tx_goes_to_output_and_line_stays_idle(rig: Rig) -> None:
    for byte in b"hello\r\n":
        assert rig.inb(UART_LSR) & (UART_LSR_THRE | UART_LSR_TEMT) == UART_LSR_THRE | UART_LSR_TEMT
        rig.outb(UART_TX, byte)
    assert bytes(rig.out) == b"hello\r\n"
    assert rig.uart.tx_bytes == 7


def test_rx_data_ready_and_interrupt(rig: Rig) -> None:
    rig.outb(UART_IER, UART_IER_RDI)
    assert not rig.irq.level
    rig.uart.feed(b"ab")
    assert rig.irq.level
    assert rig.inb(UART_LSR) & UART_LSR_DR
    assert rig.iir_id() == UART_IIR_RDI
    assert rig.inb(UART_RX) == ord("a")
    assert rig.irq.level, "one byte still waiting"
    assert rig.inb(UART_RX) == ord("b")
    assert not rig.irq.level
    assert not rig.inb(UART_LSR) & UART_LSR_DR
    assert rig.iir_id() == UART_IIR_NO_INT
    assert rig.irq.calls == [True, False]


def test_rx_trigger_level_and_character_timeout(rig: Rig) -> None:
    rig.outb(UART_FCR, UART_FCR_ENABLE_FIFO | UART_FCR_TRIGGER_8)
    rig.outb(UART_IER, UART_IER_RDI)
    rig.uart.feed(b"1234567")
    assert rig.iir_id() == UART_IIR_RX_TIMEOUT      # below the trigger: timeout
    rig.uart.feed(b"8")
    assert rig.iir_id() == UART_IIR_RDI
    rig.outb(UART_FCR, UART_FCR_ENABLE_FIFO | UART_FCR_TRIGGER_14)
    assert rig.iir_id() == UART_IIR_RX_TIMEOUT
    got = bytes(rig.inb(UART_RX) for _ in range(8))
    assert got == b"12345678"
    assert not rig.irq.level


def test_rx_backlog_beyond_fifo_is_kept(rig: Rig) -> None:
    data = bytes(range(256)) * 4
    rig.uart.feed(data)
    got = bytearray()
    while rig.inb(UART_LSR) & UART_LSR_DR:
        got.append(rig.inb(UART_RX))
    assert bytes(got) == data
    assert rig.uart.rx_bytes == len(data)


def test_rx_host_bound_drops_and_reports_overrun() -> None:
    r = Rig(rx_limit=32)
    r.outb(UART_IER, UART_IER_RLSI)
    r.uart.feed(b"x" * 40)
    assert r.uart.rx_dropped == 8
    assert r.uart.rx_pending == 32
    assert r.irq.level
    assert r.iir_id() == UART_IIR_RLSI
    assert r.inb(UART_LSR) & UART_LSR_OE
    assert not r.inb(UART_LSR) & UART_LSR_OE, "OE clears on LSR read"
    assert not r.irq.level


def test_fcr_clear_rcvr_discards_received(rig: Rig) -> None:
    rig.outb(UART_FCR, UART_FCR_ENABLE_FIFO)
    rig.outb(UART_IER, UART_IER_RDI)
    rig.uart.feed(b"stale")
    assert rig.irq.level
    rig.outb(UART_FCR, UART_FCR_ENABLE_FIFO | UART_FCR_CLEAR_RCVR)
    assert not rig.irq.level
    assert not rig.inb(UART_LSR) & UART_LSR_DR
    rig.uart.feed(b"n")
    assert rig.inb(UART_RX) == ord("n")


def test_iir_priority_order() -> None:
    r = Rig(rx_limit=FIFO_SIZE)
    r.outb(UART_IER, UART_IER_ALL_INTR)
    r.outb(UART_MCR, UART_MCR_LOOP)            # modem status change: lowest
    r.outb(UART_MCR, 0)
    r.uart.feed(b"z" * (FIFO_SIZE + 1))        # data and an overrun
    assert r.iir_id() == UART_IIR_RLSI
    r.inb(UART_LSR)                            # clears the line status
    assert r.iir_id() == UART_IIR_RDI
    while r.inb(UART_LSR) & UART_LSR_DR:
        r.inb(UART_RX)
    assert r.iir_id() == UART_IIR_THRI          # this read also clears THRE
    assert r.iir_id() == UART_IIR_MSI
    assert r.irq.level
    r.inb(UART_MSR)
    assert r.iir_id() == UART_IIR_NO_INT
    assert not r.irq.level


def test_thre_interrupt_semantics(rig: Rig) -> None:
    rig.outb(UART_IER, UART_IER_THRI)
    assert rig.irq.level, "enabling ETBEI with THR empty raises THRE"
    assert rig.iir_id() == UART_IIR_THRI
    assert not rig.irq.level, "reading IIR that reports THRE clears it"
    assert rig.iir_id() == UART_IIR_NO_INT
    rig.outb(UART_TX, ord("x"))
    assert rig.irq.level, "THR empties again after a write"
    rig.outb(UART_TX, ord("y"))                # still pending; no extra edge
    assert rig.irq.calls == [True, False, True]
    rig.outb(UART_IER, 0)
    assert not rig.irq.level
    rig.outb(UART_IER, UART_IER_THRI)
    assert rig.irq.level, "0 -> 1 on ETBEI re-arms THRE"
    # Writing IER again with ETBEI already set is not an edge.
    assert rig.iir_id() == UART_IIR_THRI
    rig.outb(UART_IER, UART_IER_THRI | UART_IER_RDI)
    assert rig.iir_id() == UART_IIR_NO_INT


def test_thre_not_cleared_by_iir_reporting_higher_priority(rig: Rig) -> None:
    rig.outb(UART_IER, UART_IER_THRI | UART_IER_RDI)
    rig.uart.feed(b"q")
    assert rig.iir_id() == UART_IIR_RDI
    rig.inb(UART_RX)
    assert rig.iir_id() == UART_IIR_THRI, "THRE survives an IIR read that reported RDA"


def test_linux_startup_thre_and_txen_tests(rig: Rig) -> None:
    """serial8250_do_startup: UART_BUG_THRE and UART_BUG_TXEN must both stay clear."""
    assert linux_autoconfig(rig) == "16550A"
    linux_clear_fifos(rig)
    for reg in (UART_LSR, UART_RX, UART_IIR, UART_MSR):
        rig.inb(reg)
    assert rig.inb(UART_LSR) != 0xFF
    # THRE test
    assert rig.inb(UART_LSR) & UART_LSR_THRE
    rig.outb(UART_IER, UART_IER_THRI)
    iir1 = rig.inb(UART_IIR)
    rig.outb(UART_IER, 0)
    rig.outb(UART_IER, UART_IER_THRI)
    iir = rig.inb(UART_IIR)
    rig.outb(UART_IER, 0)
    bug_thre = not iir1 & UART_IIR_NO_INT and iir & UART_IIR_NO_INT
    assert not bug_thre
    assert iir1 & IIR_ID_MASK == UART_IIR_THRI and iir & IIR_ID_MASK == UART_IIR_THRI
    # TXEN test
    rig.outb(UART_LCR, LCR_WLEN8)
    rig.outb(UART_MCR, UART_MCR_OUT2 | UART_MCR_DTR | UART_MCR_RTS)
    rig.outb(UART_IER, UART_IER_THRI)
    lsr = rig.inb(UART_LSR)
    iir = rig.inb(UART_IIR)
    rig.outb(UART_IER, 0)
    bug_txen = lsr & UART_LSR_TEMT and iir & UART_IIR_NO_INT
    assert not bug_txen
    assert not rig.irq.level


def test_linux_tx_interrupt_cycle(rig: Rig) -> None:
    """start_tx sets ETBEI; each interrupt the driver reads IIR then loads up to 16 bytes."""
    message = b"x" * 40
    rig.outb(UART_FCR, UART_FCR_ENABLE_FIFO | UART_FCR_TRIGGER_8)
    rig.outb(UART_IER, UART_IER_RDI)
    rig.outb(UART_IER, UART_IER_RDI | UART_IER_THRI)     # __start_tx
    pos = interrupts = 0
    while rig.irq.level:
        interrupts += 1
        iir = rig.inb(UART_IIR)
        assert not iir & UART_IIR_NO_INT
        if rig.inb(UART_LSR) & UART_LSR_THRE:
            if pos == len(message):
                rig.outb(UART_IER, UART_IER_RDI)           # __stop_tx
            for byte in message[pos:pos + FIFO_SIZE]:
                rig.outb(UART_TX, byte)
            pos = min(pos + FIFO_SIZE, len(message))
        assert interrupts < 10
    assert bytes(rig.out) == message
    assert interrupts == 4


def test_console_write_restores_ier_and_rearms_thre(rig: Rig) -> None:
    """serial8250_console_write saves IER, clears it, polls LSR, writes, restores IER."""
    rig.outb(UART_IER, UART_IER_RDI | UART_IER_THRI)
    rig.inb(UART_IIR)                                    # THRE consumed
    assert not rig.irq.level
    ier = rig.inb(UART_IER)
    rig.outb(UART_IER, 0)
    for byte in b"printk\n":
        while not rig.inb(UART_LSR) & UART_LSR_THRE:
            pass
        rig.outb(UART_TX, byte)
    assert not rig.irq.level, "no interrupts while IER is clear"
    rig.outb(UART_IER, ier)
    assert rig.irq.level and rig.iir_id() == UART_IIR_THRI
    assert bytes(rig.out) == b"printk\n"


def test_reset_returns_to_power_on_state(rig: Rig) -> None:
    rig.outb(UART_LCR, UART_LCR_DLAB)
    rig.outb(0, 3)
    rig.outb(UART_LCR, LCR_WLEN8)
    rig.outb(UART_FCR, UART_FCR_ENABLE_FIFO)
    rig.outb(UART_IER, UART_IER_ALL_INTR)
    rig.outb(UART_MCR, UART_MCR_LOOP | UART_MCR_OUT2)
    rig.outb(UART_SCR, 0x42)
    rig.uart.feed(b"pending")
    assert rig.irq.level
    rig.uart.reset()
    assert not rig.irq.level and rig.irq.calls[-1] is False
    assert rig.inb(UART_IER) == 0
    assert rig.inb(UART_IIR) == UART_IIR_NO_INT
    assert rig.inb(UART_LCR) == 0
    assert rig.inb(UART_MCR) == 0
    assert rig.inb(UART_LSR) == UART_LSR_THRE | UART_LSR_TEMT
    assert rig.inb(UART_MSR) == UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS
    assert rig.inb(UART_SCR) == 0
    assert rig.uart.divisor == 0 and rig.uart.baud is None
    assert rig.uart.rx_pending == 0
    rig.outb(UART_TX, ord("k"))
    assert rig.out.endswith(b"k")


def test_bad_accesses_are_counted_not_raised(rig: Rig) -> None:
    assert rig.uart.read(8, 1) == b"\xff"
    assert rig.uart.read(-1, 1) == b"\xff"
    assert rig.uart.read(0, 0) == b""
    rig.uart.write(9, b"\x00")
    rig.uart.write(0, b"")
    assert rig.uart.bad_accesses == 5
    # A 2-byte access at 7 reads SCR then an unclaimed offset.
    rig.outb(UART_SCR, 0x33)
    assert rig.uart.read(7, 2) == b"\x33\xff"
    assert rig.uart.bad_accesses == 6


def test_wide_access_splits_into_consecutive_registers(rig: Rig) -> None:
    rig.outb(UART_LCR, UART_LCR_DLAB)
    rig.uart.write(0, b"\x34\x12")           # outw: DLL then DLM
    assert rig.uart.divisor == 0x1234
    assert rig.uart.read(0, 2) == b"\x34\x12"


def test_output_failure_is_contained() -> None:
    calls = []

    def broken(data: bytes) -> None:
        calls.append(data)
        raise BrokenPipeError("gone")

    uart = Serial16550(FakeIrq(), broken)
    uart.write(UART_TX, b"a")
    uart.write(UART_TX, b"b")
    assert calls == [b"a", b"b"]
    assert uart.output_errors == 2


def test_feed_from_thread_while_vcpu_reads(rig: Rig) -> None:
    data = bytes(i & 0xFF for i in range(20000))
    rig.outb(UART_FCR, UART_FCR_ENABLE_FIFO | UART_FCR_TRIGGER_8)
    rig.outb(UART_IER, UART_IER_RDI | UART_IER_THRI)

    def producer() -> None:
        for i in range(0, len(data), 37):
            rig.uart.feed(data[i:i + 37])

    thread = threading.Thread(target=producer)
    thread.start()
    got = bytearray()
    while len(got) < len(data):
        rig.inb(UART_IIR)
        if rig.inb(UART_LSR) & UART_LSR_DR:
            got.append(rig.inb(UART_RX))
        rig.outb(UART_TX, 0x2E)
        assert thread.is_alive() or rig.uart.rx_pending or len(got) == len(data)
    thread.join()
    assert bytes(got) == data
    assert rig.uart.rx_dropped == 0
    # The recorded levels must alternate: the device only reports changes.
    calls = rig.irq.calls
    assert all(a != b for a, b in zip(calls, calls[1:]))


# ---- property test ------------------------------------------------------

_ops = st.one_of(
    st.tuples(st.just("r"), st.integers(0, 7)),
    st.tuples(st.just("w"), st.integers(0, 7), st.integers(0, 255)),
    st.tuples(st.just("feed"), st.binary(min_size=1, max_size=24)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_ops, max_size=60))
def test_random_register_traffic_stays_consistent(ops: list[tuple]) -> None:
    r = Rig(rx_limit=64)
    fifo_on = False
    for op in ops:
        if op[0] == "r":
            r.inb(op[1])
        elif op[0] == "w":
            _, offset, value = op
            r.outb(offset, value)
            if offset == UART_FCR:
                fifo_on = bool(value & UART_FCR_ENABLE_FIFO)
        else:
            r.uart.feed(op[1])

        # The pin shows exactly whether IIR reports an interrupt.
        level = r.irq.level
        assert level == r.uart.irq_level
        iir = r.inb(UART_IIR)
        assert bool(iir & UART_IIR_NO_INT) != level
        assert iir & 0x30 == 0
        assert iir & IIR_FIFO_BITS == (IIR_FIFO_BITS if fifo_on else 0)
        assert iir & IIR_ID_MASK in (UART_IIR_NO_INT, UART_IIR_MSI, UART_IIR_THRI,
                                     UART_IIR_RDI, UART_IIR_RLSI, UART_IIR_RX_TIMEOUT)
        # LSR: transmitter always idle; DR exactly when bytes wait.
        lsr = r.inb(UART_LSR)
        assert lsr & (UART_LSR_THRE | UART_LSR_TEMT) == UART_LSR_THRE | UART_LSR_TEMT
        assert bool(lsr & UART_LSR_DR) == (r.uart.rx_pending > 0)
        # With line status just cleared, pending data must be what IIR reports.
        lcr = r.inb(UART_LCR)
        if not lcr & UART_LCR_DLAB:
            ier = r.inb(UART_IER)
            iid = r.inb(UART_IIR) & IIR_ID_MASK
            data_iid = iid in (UART_IIR_RDI, UART_IIR_RX_TIMEOUT)
            assert data_iid == bool(ier & UART_IER_RDI and lsr & UART_LSR_DR)
            if iid == UART_IIR_MSI:
                assert ier & UART_IER_MSI
        assert r.uart.rx_pending <= 64
        assert r.irq.level == r.uart.irq_level
    calls = r.irq.calls
    assert all(a != b for a, b in zip(calls, calls[1:]))
    assert r.uart.bad_accesses == 0
