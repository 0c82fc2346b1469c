"""The 8250/16550A UART: the register model Linux's serial8250 driver drives as ttyS0/ttyS1.

The device has no clock. A byte written to THR leaves at once (to ``output``),
so THR and the transmitter are always empty (LSR.THRE and LSR.TEMT stay set),
and every THR write is a fresh "THR became empty" event. Received bytes sit in
a host-side deque: the guest sees a 16-byte FIFO only through the trigger
levels, the bytes beyond the 16th are held back (as if still on the wire), not
lost. Only the host deque has a bound; bytes past it are dropped, counted, and
reported to the guest as an overrun (LSR.OE). An FCR receive-FIFO clear (and
reset) discards everything received so far: bytes sent before the guest
opened the port are lost, as on a real line.

Interrupts follow the 16550A datasheet priorities, highest first: receiver
line status, received data available / character timeout, THR empty, modem
status. The IRQ line is level-style from the device's side: it is high while
any enabled condition is pending. The THRE condition is latched: it is set
when THR empties (i.e. on every THR write) and when IER.ETBEI goes 0 -> 1, and
cleared by an IIR read that reports it, or by clearing ETBEI. Linux's startup
"THRE test" (serial8250_do_startup) relies on the 0 -> 1 re-arm; without it
the driver sets UART_BUG_THRE and falls back to polling with a timer.

Loopback (MCR.LOOP) behaves as the kernel's autoconfig expects: MSR reflects
MCR (RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD), THR bytes go to the receiver
through a real 16- (or 1-) byte FIFO that overruns, and nothing reaches the
host. IIR bits 4 and 5 read 0 and IER bits 4-7 are not writable, so the
16550A-variants probe finds neither an EFR, a NatSemi, a 16750 nor an XScale.
MCR.OUT2 does not gate the IRQ pin (a PC board detail): Linux always sets it
when the port has an IRQ, and gating would only add ways to lose interrupts.

Register names are Linux's (include/uapi/linux/serial_reg.h).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Callable, Protocol

log = logging.getLogger(__name__)

# Register offsets from the base port.
UART_RX = 0     # read, DLAB=0: receive buffer
UART_TX = 0     # write, DLAB=0: transmit holding register
UART_DLL = 0    # DLAB=1: divisor latch low
UART_IER = 1    # DLAB=0: interrupt enable
UART_DLM = 1    # DLAB=1: divisor latch high
UART_IIR = 2    # read: interrupt identification
UART_FCR = 2    # write: FIFO control
UART_LCR = 3
UART_MCR = 4
UART_LSR = 5
UART_MSR = 6
UART_SCR = 7
UART_NR_REGS = 8

UART_IER_RDI = 0x01     # received data available (and character timeout)
UART_IER_THRI = 0x02    # THR empty
UART_IER_RLSI = 0x04    # receiver line status
UART_IER_MSI = 0x08     # modem status
UART_IER_ALL_INTR = UART_IER_RDI | UART_IER_THRI | UART_IER_RLSI | UART_IER_MSI

UART_IIR_NO_INT = 0x01
UART_IIR_MSI = 0x00
UART_IIR_THRI = 0x02
UART_IIR_RDI = 0x04
UART_IIR_RLSI = 0x06
UART_IIR_RX_TIMEOUT = 0x0C
UART_IIR_FIFO_ENABLED_16550A = 0xC0

UART_FCR_ENABLE_FIFO = 0x01
UART_FCR_CLEAR_RCVR = 0x02
UART_FCR_CLEAR_XMIT = 0x04
UART_FCR_DMA_SELECT = 0x08
UART_FCR_TRIGGER_MASK = 0xC0
UART_FCR_TRIGGER_1 = 0x00
UART_FCR_TRIGGER_4 = 0x40
UART_FCR_TRIGGER_8 = 0x80
UART_FCR_TRIGGER_14 = 0xC0
# The bits the 16550A keeps; the clear bits self-clear and bit 5 is 16750-only.
_FCR_STORED = UART_FCR_ENABLE_FIFO | UART_FCR_DMA_SELECT | UART_FCR_TRIGGER_MASK
_RX_TRIGGER_LEVEL = {
    UART_FCR_TRIGGER_1: 1,
    UART_FCR_TRIGGER_4: 4,
    UART_FCR_TRIGGER_8: 8,
    UART_FCR_TRIGGER_14: 14,
}

UART_LCR_DLAB = 0x80

UART_MCR_DTR = 0x01
UART_MCR_RTS = 0x02
UART_MCR_OUT1 = 0x04
UART_MCR_OUT2 = 0x08
UART_MCR_LOOP = 0x10
# A 16550A has no AFE (bit 5) and bits 6-7 read 0.
_MCR_STORED = UART_MCR_DTR | UART_MCR_RTS | UART_MCR_OUT1 | UART_MCR_OUT2 | UART_MCR_LOOP

UART_LSR_DR = 0x01
UART_LSR_OE = 0x02
UART_LSR_PE = 0x04
UART_LSR_FE = 0x08
UART_LSR_BI = 0x10
UART_LSR_THRE = 0x20
UART_LSR_TEMT = 0x40
UART_LSR_BRK_ERROR_BITS = UART_LSR_BI | UART_LSR_FE | UART_LSR_PE | UART_LSR_OE
# The transmitter never holds a byte, so these two are always set.
_LSR_TX_IDLE = UART_LSR_THRE | UART_LSR_TEMT

UART_MSR_DCTS = 0x01
UART_MSR_DDSR = 0x02
UART_MSR_TERI = 0x04
UART_MSR_DDCD = 0x08
UART_MSR_CTS = 0x10
UART_MSR_DSR = 0x20
UART_MSR_RI = 0x40
UART_MSR_DCD = 0x80
UART_MSR_STATUS_BITS = UART_MSR_CTS | UART_MSR_DSR | UART_MSR_RI | UART_MSR_DCD
# Outside loopback the "modem" on the other end is always present and ready.
MSR_LINE_UP = UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS

FIFO_SIZE = 16                  # the 16550A's receive FIFO, as the guest sees it
RX_BUFFER_LIMIT = 64 * 1024     # host-side bound on bytes waiting for the guest
UART_CLOCK_HZ = 1_843_200       # the PC's 1.8432 MHz UART crystal
BAUD_BASE = UART_CLOCK_HZ // 16

# One shared bytes object per value, so a register read allocates nothing.
_BYTE = tuple(bytes((i,)) for i in range(256))


class IrqLine(Protocol):
    """The interrupt pin the UART drives (an in-kernel IOAPIC input)."""

    def set_level(self, level: bool) -> None: ...


class Serial16550:
    """One 16550A UART, a bus device spanning 8 ports from its base.

    ``read``/``write`` run on vCPU threads and ``feed`` on an I/O thread; one
    lock covers all state. ``output`` and ``irq.set_level`` are called with
    the lock released and held respectively: the IRQ level must change in the
    same order as the state that caused it, while output may block on the host.
    """

    def __init__(
        self,
        irq: IrqLine,
        output: Callable[[bytes], None],
        name: str = "ttyS0",
        rx_limit: int = RX_BUFFER_LIMIT,
    ) -> None:
        if rx_limit < FIFO_SIZE:
            raise ValueError(f"rx_limit must be at least {FIFO_SIZE}, got {rx_limit}")
        self.name = name
        self._irq = irq
        self._output = output
        self._rx_limit = rx_limit
        self._lock = threading.Lock()
        self._rx: deque[int] = deque()
        self._irq_level = False
        self._readers = (
            self._read_rx, self._read_ier, self._read_iir, self._read_lcr,
            self._read_mcr, self._read_lsr, self._read_msr, self._read_scr,
        )
        self._writers = (
            self._write_tx, self._write_ier, self._write_fcr, self._write_lcr,
            self._write_mcr, self._write_lsr, self._write_msr, self._write_scr,
        )
        # Counters: they survive reset() so a reboot does not hide earlier trouble.
        self.tx_bytes = 0           # bytes sent to output
        self.rx_bytes = 0           # bytes the guest read from RBR
        self.rx_dropped = 0         # host bytes lost to the rx_limit bound
        self.rx_flushed = 0         # bytes discarded by an FCR receive-FIFO clear or reset
        self.loop_overruns = 0      # loopback bytes lost to a full FIFO (as on hardware)
        self.bad_accesses = 0       # offsets outside 0..7 or empty writes
        self.output_errors = 0      # exceptions raised by the output callback
        self._reset_registers()

    # ---- power-on state -------------------------------------------------

    def _reset_registers(self) -> None:
        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._fcr = 0
        self._scr = 0
        self._dll = 0               # undefined at power-on; the driver programs it
        self._dlm = 0
        self._rbr = 0               # last byte read: what an empty RBR reads back
        self._rx_trigger = 1
        self._lsr_errors = 0
        self._thr_pending = False
        self._msr_status = MSR_LINE_UP
        self._msr_delta = 0
        self.rx_flushed += len(self._rx)
        self._rx.clear()

    def reset(self) -> None:
        """Return to the power-on state (VM reboot): registers, pending input, IRQ low."""
        with self._lock:
            self._reset_registers()
            self._irq_level = False
            self._irq.set_level(False)

    # ---- bus device -----------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """Read ``size`` consecutive registers from ``offset`` (as the ISA bus splits wide accesses)."""
        with self._lock:
            if size == 1 and 0 <= offset < UART_NR_REGS:
                return _BYTE[self._readers[offset]()]
            if not 0 < size <= UART_NR_REGS:
                self.bad_accesses += 1
                return b"\xff" * max(size, 0)
            return bytes(self._read_checked(offset + i) for i in range(size))

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` to consecutive registers from ``offset``; THR bytes go to output."""
        with self._lock:
            if (offset == UART_TX and len(data) == 1
                    and not (self._lcr & UART_LCR_DLAB or self._mcr & UART_MCR_LOOP)):
                # The per-byte console path. The byte leaves at once, so THR
                # is empty again: a new THRE event.
                self.tx_bytes += 1
                if not self._thr_pending:
                    self._thr_pending = True
                    if self._ier & UART_IER_THRI:
                        self._update_irq()
                # Copy only if the bus handed us a reusable buffer.
                sent = data if data.__class__ is bytes else bytes(data)
            else:
                sent = self._write_slow(offset, data)
        if sent:
            try:
                self._output(sent)
            except Exception:
                self._output_failed()

    # ---- host side ------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Queue host -> guest bytes. Thread-safe; bytes beyond the host bound are dropped and counted."""
        if not data:
            return
        with self._lock:
            rx = self._rx
            room = self._rx_limit - len(rx)
            if len(data) > room:
                lost = len(data) - room
                if not self.rx_dropped:
                    log.warning("%s: host input backlog full (%d bytes); dropping input",
                                self.name, self._rx_limit)
                self.rx_dropped += lost
                self._lsr_errors |= UART_LSR_OE
                data = data[:room]
            rx.extend(data)
            self._update_irq()

    @property
    def irq_level(self) -> bool:
        """The level the device last drove onto its IRQ line."""
        return self._irq_level

    @property
    def rx_pending(self) -> int:
        """Bytes received from the host that the guest has not read yet."""
        return len(self._rx)

    @property
    def divisor(self) -> int:
        return self._dlm << 8 | self._dll

    @property
    def baud(self) -> int | None:
        """The baud rate the guest programmed, or None before it set a divisor."""
        divisor = self.divisor
        return BAUD_BASE // divisor if divisor else None

    @property
    def fifo_enabled(self) -> bool:
        return bool(self._fcr & UART_FCR_ENABLE_FIFO)

    def stats(self) -> dict[str, int]:
        return {
            "tx_bytes": self.tx_bytes,
            "rx_bytes": self.rx_bytes,
            "rx_pending": len(self._rx),
            "rx_dropped": self.rx_dropped,
            "rx_flushed": self.rx_flushed,
            "loop_overruns": self.loop_overruns,
            "bad_accesses": self.bad_accesses,
            "output_errors": self.output_errors,
        }

    # ---- interrupt logic (lock held) ------------------------------------

    def _pending_iid(self) -> int:
        """The highest-priority enabled pending interrupt, as an IIR id (or NO_INT)."""
        ier = self._ier
        if ier & UART_IER_RLSI and self._lsr_errors:
            return UART_IIR_RLSI
        if ier & UART_IER_RDI and self._rx:
            # Below the trigger level a real FIFO raises a character timeout
            # after four idle character times; no clock here, so at once.
            if self._fcr & UART_FCR_ENABLE_FIFO and len(self._rx) < self._rx_trigger:
                return UART_IIR_RX_TIMEOUT
            return UART_IIR_RDI
        if ier & UART_IER_THRI and self._thr_pending:
            return UART_IIR_THRI
        if ier & UART_IER_MSI and self._msr_delta:
            return UART_IIR_MSI
        return UART_IIR_NO_INT

    def _update_irq(self) -> None:
        level = self._pending_iid() != UART_IIR_NO_INT
        if level != self._irq_level:
            self._irq.set_level(level)
            self._irq_level = level

    # ---- register reads (lock held) -------------------------------------

    def _read_checked(self, offset: int) -> int:
        if 0 <= offset < UART_NR_REGS:
            return self._readers[offset]()
        self.bad_accesses += 1
        return 0xFF

    def _read_rx(self) -> int:
        if self._lcr & UART_LCR_DLAB:
            return self._dll
        rx = self._rx
        if rx:
            self._rbr = rx.popleft()
            self.rx_bytes += 1
            if not rx:
                self._update_irq()
        return self._rbr

    def _read_ier(self) -> int:
        return self._dlm if self._lcr & UART_LCR_DLAB else self._ier

    def _read_iir(self) -> int:
        iid = self._pending_iid()
        if iid == UART_IIR_THRI:
            # Reading IIR while it reports THRE is one of the two ways to clear it.
            self._thr_pending = False
            self._update_irq()
        if self._fcr & UART_FCR_ENABLE_FIFO:
            return iid | UART_IIR_FIFO_ENABLED_16550A
        return iid

    def _read_lcr(self) -> int:
        return self._lcr

    def _read_mcr(self) -> int:
        return self._mcr

    def _read_lsr(self) -> int:
        value = _LSR_TX_IDLE | self._lsr_errors
        if self._rx:
            value |= UART_LSR_DR
        if self._lsr_errors:
            self._lsr_errors = 0        # error bits clear on read
            self._update_irq()
        return value

    def _read_msr(self) -> int:
        value = self._msr_status | self._msr_delta
        if self._msr_delta:
            self._msr_delta = 0         # delta bits clear on read
            self._update_irq()
        return value

    def _read_scr(self) -> int:
        return self._scr

    # ---- register writes (lock held) ------------------------------------

    def _write_slow(self, offset: int, data: bytes) -> bytes:
        """Every write but the plain THR byte; returns the bytes to transmit."""
        if not data or not 0 <= offset <= UART_NR_REGS - len(data):
            self.bad_accesses += 1
            data = data[:max(UART_NR_REGS - offset, 0)] if offset >= 0 else b""
        sent = b""
        for i, value in enumerate(data):
            if self._writers[offset + i](value):
                sent += _BYTE[value]
        return sent

    def _write_tx(self, value: int) -> bool:
        if self._lcr & UART_LCR_DLAB:
            self._dll = value
            return False
        self._thr_pending = True
        if self._mcr & UART_MCR_LOOP:
            # Loopback: the byte reaches our own receiver through a real FIFO.
            limit = FIFO_SIZE if self._fcr & UART_FCR_ENABLE_FIFO else 1
            if len(self._rx) < limit:
                self._rx.append(value)
            else:
                self.loop_overruns += 1
                self._lsr_errors |= UART_LSR_OE
            self._update_irq()
            return False
        self.tx_bytes += 1
        self._update_irq()
        return True

    def _write_ier(self, value: int) -> bool:
        if self._lcr & UART_LCR_DLAB:
            self._dlm = value
            return False
        value &= UART_IER_ALL_INTR
        if (self._ier ^ value) & UART_IER_THRI:
            # Enabling ETBEI while THR is empty (always, here) raises THRE even
            # if an IIR read had cleared it; disabling it forgets the event.
            self._thr_pending = bool(value & UART_IER_THRI)
        self._ier = value
        self._update_irq()
        return False

    def _write_fcr(self, value: int) -> bool:
        enable = value & UART_FCR_ENABLE_FIFO
        toggled = (value ^ self._fcr) & UART_FCR_ENABLE_FIFO
        # Switching FIFO mode on or off empties the FIFOs; the clear bits only
        # act while the FIFO is enabled. The transmit FIFO is always empty.
        if toggled or (enable and value & UART_FCR_CLEAR_RCVR):
            self.rx_flushed += len(self._rx)
            self._rx.clear()
        if enable:
            self._fcr = value & _FCR_STORED
            self._rx_trigger = _RX_TRIGGER_LEVEL[value & UART_FCR_TRIGGER_MASK]
        else:
            self._fcr = 0
        self._update_irq()
        return False

    def _write_lcr(self, value: int) -> bool:
        self._lcr = value
        return False

    def _write_mcr(self, value: int) -> bool:
        self._mcr = mcr = value & _MCR_STORED
        if mcr & UART_MCR_LOOP:
            status = (((mcr & UART_MCR_RTS) << 3)      # RTS  -> CTS
                      | ((mcr & UART_MCR_DTR) << 5)    # DTR  -> DSR
                      | ((mcr & UART_MCR_OUT1) << 4)   # OUT1 -> RI
                      | ((mcr & UART_MCR_OUT2) << 4))  # OUT2 -> DCD
        else:
            status = MSR_LINE_UP
        changed = self._msr_status ^ status
        if changed:
            delta = 0
            if changed & UART_MSR_CTS:
                delta |= UART_MSR_DCTS
            if changed & UART_MSR_DSR:
                delta |= UART_MSR_DDSR
            if changed & UART_MSR_DCD:
                delta |= UART_MSR_DDCD
            if self._msr_status & UART_MSR_RI and not status & UART_MSR_RI:
                delta |= UART_MSR_TERI        # ring indicator: trailing edge only
            self._msr_status = status
            self._msr_delta |= delta
            self._update_irq()
        return False

    def _write_lsr(self, value: int) -> bool:
        # LSR is read-only on a 16550A (factory test register): ignore.
        return False

    def _write_msr(self, value: int) -> bool:
        return False

    def _write_scr(self, value: int) -> bool:
        self._scr = value
        return False

    # ---- output ---------------------------------------------------------

    def _output_failed(self) -> None:
        # A broken host end must not take the vCPU thread down with it.
        self.output_errors += 1
        if self.output_errors == 1:
            log.exception("%s: output callback failed; further failures are only counted",
                          self.name)
