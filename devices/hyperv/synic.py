"""The synthetic interrupt controller (SynIC) of every virtual processor, in user space.

Per VP: SCONTROL, SVERSION, the message page (SIMP), the event-flag page (SIEFP), EOM and the
sixteen SINTx registers. `Synic` implements `SynicPort` for VMBus:

- `post_message` queues a message per (VP, SINT). The head of the queue is written into the
  SINT's 256-byte slot of the SIMP page only while the slot is free (message_type HVMSG_NONE);
  if it is busy, msg_pending is set in the slot so the guest writes EOM once it has emptied it,
  and the EOM write delivers the next message. A written message carries msg_pending itself
  while more wait behind it. Queued messages are also delivered when SCONTROL, the SIMP or the
  SINT become enabled.
- `signal_event` sets a flag in the SINT's 256-byte area of the SIEFP page.

Both then raise the SINT's vector through `raise_interrupt(vp, vector)` (the machine sends an
MSI to the VP's local APIC), unless the SINT is in polling mode. Auto-EOI cannot be honoured
by an in-kernel APIC that knows nothing of Hyper-V; pyvmm's CPUID recommends against it.

Guest pages go through a `GuestMemoryAccess`. A SIMP or SIEFP page that is not guest memory
never raises: it is counted and logged once. One lock guards all state; interrupts are raised
after it is released.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

from devices.hyperv import hv_abi as hv
from devices.hyperv.interfaces import GuestMemoryAccess
from vmm.msr import MsrFault

log = logging.getLogger("pyvmm.hyperv.synic")

RaiseInterrupt = Callable[[int, int], None]   # (vp, vector)

# Messages waiting for one SINT slot; beyond this post_message refuses (returns False).
MESSAGE_QUEUE_LIMIT = 1024

SINT_POWER_ON = hv.HV_SYNIC_SINT_MASKED       # every SINT starts masked, vector 0


def sint_msr(index: int) -> int | None:
    """The SINT number of a SINTx MSR, else None."""
    if hv.HV_X64_MSR_SINT0 <= index <= hv.HV_X64_MSR_SINT15:
        return index - hv.HV_X64_MSR_SINT0
    return None


SYNIC_MSRS = frozenset({hv.HV_X64_MSR_SCONTROL, hv.HV_X64_MSR_SVERSION, hv.HV_X64_MSR_SIEFP,
                        hv.HV_X64_MSR_SIMP, hv.HV_X64_MSR_EOM,
                        *range(hv.HV_X64_MSR_SINT0, hv.HV_X64_MSR_SINT15 + 1)})


@dataclass
class _VpSynic:
    scontrol: int = 0
    siefp: int = 0
    simp: int = 0
    sints: list[int] = field(default_factory=lambda: [SINT_POWER_ON] * hv.HV_SYNIC_SINT_COUNT)
    queues: list[deque] = field(default_factory=lambda: [deque() for _ in range(hv.HV_SYNIC_SINT_COUNT)])


def _full_barrier() -> None:
    # A lock round trip is a locked instruction on the host CPU: a full memory barrier, so our
    # msg_pending store is visible before we re-read the slot's message type (the guest orders
    # its own clear-then-test with mb()).
    _BARRIER.acquire()
    _BARRIER.release()


_BARRIER = threading.Lock()


class Synic:
    """Every VP's SynIC. Safe to call from any thread."""

    def __init__(self, vp_count: int, memory: GuestMemoryAccess, raise_interrupt: RaiseInterrupt,
                 queue_limit: int = MESSAGE_QUEUE_LIMIT) -> None:
        if vp_count < 1:
            raise ValueError("a partition has at least one VP")
        self.vp_count = vp_count
        self._memory = memory
        self._raise = raise_interrupt
        self._queue_limit = queue_limit
        self._lock = threading.Lock()
        self._vps = [_VpSynic() for _ in range(vp_count)]
        self._counts: Counter[str] = Counter()
        self._logged: set[str] = set()

    # ------------------------------------------------------------------ SynicPort
    def post_message(self, vp: int, sint: int, message_type: int, payload: bytes) -> bool:
        if not (0 < message_type <= 0xFFFFFFFF):
            raise ValueError(f"message type {message_type!r} is not a non-zero 32-bit value")
        if len(payload) > hv.HV_MESSAGE_PAYLOAD_BYTE_COUNT:
            raise ValueError(f"message payload of {len(payload)} bytes exceeds "
                             f"{hv.HV_MESSAGE_PAYLOAD_BYTE_COUNT}")
        if not self._exists(vp, sint):
            return False
        with self._lock:
            queue = self._vps[vp].queues[sint]
            if len(queue) >= self._queue_limit:
                self._counts["messages-refused"] += 1
                self._log_once("queue-full", "SynIC: VP %d SINT %d has %d undelivered messages: "
                               "refusing more (logged once)", vp, sint, len(queue))
                return False
            queue.append((message_type, bytes(payload)))
            self._counts["messages-posted"] += 1
            irq = self._deliver(vp, sint)
        self._raise_all([irq])
        return True

    def signal_event(self, vp: int, sint: int, flag: int) -> bool:
        if not 0 <= flag < hv.HV_EVENT_FLAGS_COUNT:
            raise ValueError(f"event flag {flag!r} is not in 0..{hv.HV_EVENT_FLAGS_COUNT - 1}")
        if not self._exists(vp, sint):
            return False
        with self._lock:
            st = self._vps[vp]
            if not (st.scontrol & hv.HV_SYNIC_CONTROL_ENABLE and st.siefp & hv.HV_SYNIC_SIEFP_ENABLE
                    and not st.sints[sint] & hv.HV_SYNIC_SINT_MASKED):
                self._counts["events-refused"] += 1
                return False
            gpa = (st.siefp & hv.HV_PAGE_ADDRESS_MASK) + sint * hv.HV_EVENT_FLAGS_BYTE_COUNT + flag // 8
            old = self._read(gpa, 1, "SIEFP")
            if old is None or not self._write(gpa, bytes([old[0] | 1 << (flag % 8)]), "SIEFP"):
                return False
            self._counts["events-signalled"] += 1
            irq = self._interrupt_for(vp, sint)
        self._raise_all([irq])
        return True

    def _exists(self, vp: int, sint: int) -> bool:
        return isinstance(vp, int) and isinstance(sint, int) and 0 <= vp < self.vp_count \
            and 0 <= sint < hv.HV_SYNIC_SINT_COUNT

    # ------------------------------------------------------------------ MSRs
    def msr_read(self, vp: int, index: int) -> int:
        """RDMSR of a SynIC MSR by VP `vp`; MsrFault for an MSR that is not the SynIC's."""
        with self._lock:
            st = self._vps[vp]
            if index == hv.HV_X64_MSR_SCONTROL:
                return st.scontrol
            if index == hv.HV_X64_MSR_SVERSION:
                return hv.HV_SYNIC_VERSION_1
            if index == hv.HV_X64_MSR_SIEFP:
                return st.siefp
            if index == hv.HV_X64_MSR_SIMP:
                return st.simp
            if index == hv.HV_X64_MSR_EOM:
                return 0
            sint = sint_msr(index)
            if sint is not None:
                return st.sints[sint]
        raise MsrFault(f"MSR {index:#x} is not a SynIC register")

    def msr_write(self, vp: int, index: int, value: int) -> None:
        """WRMSR of a SynIC MSR by VP `vp`; MsrFault (#GP) for SVERSION, a SINT vector below 16
        left unmasked, or an MSR that is not the SynIC's."""
        irqs: list[tuple[int, int] | None] = []
        with self._lock:
            st = self._vps[vp]
            if index == hv.HV_X64_MSR_SCONTROL:
                st.scontrol = value & hv.HV_SYNIC_CONTROL_ENABLE
                irqs = self._deliver_all(vp)
            elif index == hv.HV_X64_MSR_SIEFP:
                self._set_page(st, "siefp", value, hv.HV_SYNIC_SIEFP_ENABLE, "SIEFP")
            elif index == hv.HV_X64_MSR_SIMP:
                self._set_page(st, "simp", value, hv.HV_SYNIC_SIMP_ENABLE, "SIMP")
                irqs = self._deliver_all(vp)
            elif index == hv.HV_X64_MSR_EOM:
                self._counts["eom"] += 1
                irqs = self._deliver_all(vp)
            elif (sint := sint_msr(index)) is not None:
                value &= hv.HV_SYNIC_SINT_WRITABLE
                if not value & hv.HV_SYNIC_SINT_MASKED and \
                        value & hv.HV_SYNIC_SINT_VECTOR_MASK < hv.HV_SYNIC_FIRST_VALID_VECTOR:
                    raise MsrFault(f"SINT{sint} vector {value & 0xFF} is below "
                                   f"{hv.HV_SYNIC_FIRST_VALID_VECTOR}")
                if value & hv.HV_SYNIC_SINT_AUTO_EOI:
                    self._log_once("auto-eoi", "SynIC: the guest asked for auto-EOI on a SINT; its "
                                   "interrupts need an ordinary EOI here (logged once)")
                st.sints[sint] = value
                irqs = [self._deliver(vp, sint)]
            elif index == hv.HV_X64_MSR_SVERSION:
                raise MsrFault("SVERSION is read-only")
            else:
                raise MsrFault(f"MSR {index:#x} is not a SynIC register")
        self._raise_all(irqs)

    def _set_page(self, st: _VpSynic, attr: str, value: int, enable: int, kind: str) -> None:
        old = getattr(st, attr)
        setattr(st, attr, value)
        moved = (old & hv.HV_PAGE_ADDRESS_MASK) != (value & hv.HV_PAGE_ADDRESS_MASK)
        if value & enable and (not old & enable or moved):
            # An overlay page starts out empty: no stale message types or event flags.
            self._write(value & hv.HV_PAGE_ADDRESS_MASK, bytes(hv.HV_HYP_PAGE_SIZE), kind)

    # ------------------------------------------------------------------ delivery (lock held)
    def _deliver_all(self, vp: int) -> list[tuple[int, int] | None]:
        return [self._deliver(vp, sint) for sint in range(hv.HV_SYNIC_SINT_COUNT)]

    def _deliver(self, vp: int, sint: int) -> tuple[int, int] | None:
        """Write the head of (vp, sint)'s queue into its slot if it can go now; returns the
        interrupt to raise, if any."""
        st = self._vps[vp]
        queue = st.queues[sint]
        if not queue or not (st.scontrol & hv.HV_SYNIC_CONTROL_ENABLE and st.simp & hv.HV_SYNIC_SIMP_ENABLE
                             and not st.sints[sint] & hv.HV_SYNIC_SINT_MASKED):
            return None
        slot = (st.simp & hv.HV_PAGE_ADDRESS_MASK) + sint * hv.HV_MESSAGE_SIZE
        if not self._slot_free(slot):
            return None
        message_type, payload = queue.popleft()
        flags = hv.HV_MESSAGE_FLAG_PENDING if queue else 0
        body = hv.HV_MESSAGE_HEADER.pack(message_type, len(payload), flags, 0, 0)[4:] + \
            payload.ljust(hv.HV_MESSAGE_PAYLOAD_BYTE_COUNT, b"\0")
        # Everything but the type first: the guest takes a slot as full once the type is set.
        if not (self._write(slot + 4, body, "SIMP") and
                self._write(slot, message_type.to_bytes(4, "little"), "SIMP")):
            queue.appendleft((message_type, payload))
            return None
        self._counts["messages-delivered"] += 1
        return self._interrupt_for(vp, sint)

    def _slot_free(self, slot: int) -> bool:
        """True if the slot holds no message. If it does, ask the guest for an EOM (msg_pending)
        and look again: the guest may have emptied it meanwhile without seeing our flag."""
        head = self._read(slot, 8, "SIMP")
        if head is None:
            return False
        if int.from_bytes(head[:4], "little") == hv.HVMSG_NONE:
            return True
        flags = head[hv.HV_MESSAGE_FLAGS_OFFSET] | hv.HV_MESSAGE_FLAG_PENDING
        if not self._write(slot + hv.HV_MESSAGE_FLAGS_OFFSET, bytes([flags]), "SIMP"):
            return False
        _full_barrier()
        again = self._read(slot, 4, "SIMP")
        return again is not None and int.from_bytes(again, "little") == hv.HVMSG_NONE

    def _interrupt_for(self, vp: int, sint: int) -> tuple[int, int] | None:
        value = self._vps[vp].sints[sint]
        if value & (hv.HV_SYNIC_SINT_MASKED | hv.HV_SYNIC_SINT_POLLING):
            return None
        return vp, value & hv.HV_SYNIC_SINT_VECTOR_MASK

    def _raise_all(self, irqs: list[tuple[int, int] | None]) -> None:
        for irq in irqs:
            if irq is None:
                continue
            try:
                self._raise(*irq)
            except Exception:
                with self._lock:
                    self._counts["interrupt-errors"] += 1
                    first = "raise" not in self._logged
                    self._logged.add("raise")
                if first:
                    log.exception("SynIC: raising vector %#x on VP %d failed (logged once)", irq[1], irq[0])
                continue
            with self._lock:
                self._counts["interrupts"] += 1

    # ------------------------------------------------------------------ guest memory (lock held)
    def _read(self, gpa: int, size: int, kind: str) -> bytes | None:
        try:
            data = self._memory.read(gpa, size)
        except Exception as e:
            self._bad_page(kind, gpa, e)
            return None
        if len(data) != size:
            self._bad_page(kind, gpa, ValueError(f"short read of {len(data)} bytes"))
            return None
        return data

    def _write(self, gpa: int, data: bytes, kind: str) -> bool:
        try:
            self._memory.write(gpa, data)
        except Exception as e:
            self._bad_page(kind, gpa, e)
            return False
        return True

    def _bad_page(self, kind: str, gpa: int, error: Exception) -> None:
        self._counts[f"bad-{kind.lower()}-accesses"] += 1
        self._log_once(f"bad-{kind}", "SynIC: the guest's %s page at %#x is not guest memory (%s); "
                       "counted, logged once", kind, gpa & hv.HV_PAGE_ADDRESS_MASK, error)

    def _log_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning(msg, *args)

    # ------------------------------------------------------------------ lifecycle
    def reset(self) -> None:
        """Power-on state for every VP; undelivered messages are dropped."""
        with self._lock:
            dropped = sum(len(q) for st in self._vps for q in st.queues)
            self._counts["messages-dropped-on-reset"] += dropped
            self._vps = [_VpSynic() for _ in range(self.vp_count)]

    def pending(self, vp: int, sint: int) -> int:
        """Messages queued for (vp, sint) and not yet in its slot."""
        with self._lock:
            return len(self._vps[vp].queues[sint])

    def stats(self) -> dict:
        with self._lock:
            out = {name: self._counts[name] for name in (
                "messages-posted", "messages-delivered", "messages-refused", "messages-dropped-on-reset",
                "events-signalled", "events-refused", "eom", "interrupts", "interrupt-errors",
                "bad-simp-accesses", "bad-siefp-accesses")}
            out["messages-pending"] = sum(len(q) for st in self._vps for q in st.queues)
            return out
