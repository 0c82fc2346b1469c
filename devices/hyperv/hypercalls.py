"""Hypercalls: the code pyvmm writes into the guest's hypercall page, the I/O port that code
traps on, and the dispatcher behind it (HvPostMessage, HvSignalEvent).

The guest calls into its hypercall page with the control value in RCX, the input (a GPA, or
the value itself for a fast call) in RDX and the output GPA in R8, and takes the result from
RAX. `vmcall` cannot be used: it hangs the vCPU on some KVMs (PVM) and would reach KVM's own
Hyper-V emulation on others. The page holds `in eax, HV_HYPERCALL_PORT; ret` instead: the port
read exits to pyvmm on the calling vCPU's thread, `HypercallPort` reads that vCPU's registers,
dispatches, and the 32-bit value it returns lands zero-extended in RAX (status in bits 0-15;
the simple hypercalls implemented here complete no reps, so bits 32-43 are rightly zero).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Callable, NamedTuple

from devices.hyperv import hv_abi as hv
from devices.hyperv import interfaces as hvi
from devices.hyperv.connections import Connections
from devices.hyperv.interfaces import GuestMemoryAccess

log = logging.getLogger("pyvmm.hyperv.hypercall")

# An I/O port no pyvmm device, no in-kernel KVM device and no Linux driver of the default guest
# uses (0x80/0xed are I/O-delay ports, 0xe9 the Bochs debug port). `in eax` reads 4 of them.
HV_HYPERCALL_PORT = 0xE4
HV_HYPERCALL_PORT_SIZE = 4

_IN_EAX_IMM8 = 0xE5
_RET = 0xC3
_INT3 = 0xCC


def hypercall_page_code(port: int = HV_HYPERCALL_PORT) -> bytes:
    """`in eax, port; ret`: what the guest's hypercall page starts with."""
    if not 0 <= port <= 0xFF:
        raise ValueError(f"hypercall port {port:#x} does not fit in an imm8")
    return bytes([_IN_EAX_IMM8, port, _RET])


def hypercall_page(port: int = HV_HYPERCALL_PORT) -> bytes:
    """The whole 4 KiB page: the code, then int3 so a stray jump into the rest traps."""
    return hypercall_page_code(port).ljust(hv.HV_HYP_PAGE_SIZE, bytes([_INT3]))


class HypercallRegisters(NamedTuple):
    vp: int
    control: int   # RCX
    input: int     # RDX: input GPA, or the first input of a fast call
    output: int    # R8: output GPA, or the second input of a fast call


def current_vcpu_registers() -> HypercallRegisters:
    """RCX, RDX and R8 of the vCPU whose thread is running this (a vCPU exit handler)."""
    from vmm.vcpu import current_vcpu

    vcpu = current_vcpu()
    if vcpu is None:
        raise RuntimeError("a hypercall port access outside a vCPU thread")
    regs = vcpu.fd.get_regs()
    return HypercallRegisters(vcpu.index, regs.rcx, regs.rdx, regs.r8)


STATUS_NAMES = {getattr(hvi, name): name for name in dir(hvi) if name.startswith("HV_STATUS_")}


def status_name(status: int) -> str:
    return STATUS_NAMES.get(status, f"{status:#06x}")


_SIMPLE_CALL_MUST_BE_ZERO = (hv.HV_HYPERCALL_VARHEAD_MASK | hv.HV_HYPERCALL_RSVD_MASK
                             | hv.HV_HYPERCALL_REP_COMP_MASK | hv.HV_HYPERCALL_REP_START_MASK)
_U64 = (1 << 64) - 1


class HypercallDispatcher:
    """Runs one hypercall from its register values; counts calls by code and status."""

    def __init__(self, memory: GuestMemoryAccess, connections: Connections) -> None:
        self._memory = memory
        self._connections = connections
        self._lock = threading.Lock()
        self._calls: Counter[tuple[int, int]] = Counter()
        self.handler_errors = 0

    def call(self, control: int, input_value: int, output_value: int = 0) -> int:
        """The hypercall status (RAX) for control value `control` and inputs RDX/R8."""
        control &= _U64
        input_value &= _U64
        code = control & hv.HV_HYPERCALL_CODE_MASK
        fast = bool(control & hv.HV_HYPERCALL_FAST_BIT)
        if code == hv.HVCALL_POST_MESSAGE:
            run = self._post_message
        elif code == hv.HVCALL_SIGNAL_EVENT:
            run = self._signal_event
        else:
            run = None
        if run is None:
            status = hvi.HV_STATUS_INVALID_HYPERCALL_CODE
        elif control & _SIMPLE_CALL_MUST_BE_ZERO:
            # Reserved bits, a variable header or a rep count on a simple hypercall.
            status = hvi.HV_STATUS_INVALID_HYPERCALL_INPUT
        else:
            status = run(fast, input_value)
        with self._lock:
            self._calls[(code, status)] += 1
        return status

    # ------------------------------------------------------------------ the calls
    def _read_input(self, gpa: int, size: int) -> bytes | None:
        """The input block, or None if it is misaligned, spans pages or is not guest memory
        (all HV_STATUS_INVALID_ALIGNMENT in the TLFS)."""
        if gpa % hv.HV_HYPERCALL_INPUT_ALIGNMENT or (gpa % hv.HV_HYP_PAGE_SIZE) + size > hv.HV_HYP_PAGE_SIZE:
            return None
        try:
            data = self._memory.read(gpa, size)
        except Exception:
            return None
        return data if len(data) == size else None

    def _post_message(self, fast: bool, gpa: int) -> int:
        if fast:  # 256 bytes of input do not fit in registers
            return hvi.HV_STATUS_INVALID_HYPERCALL_INPUT
        raw = self._read_input(gpa, hv.HV_INPUT_POST_MESSAGE_SIZE)
        if raw is None:
            return hvi.HV_STATUS_INVALID_ALIGNMENT
        connection_id, _reserved, message_type, size = hv.HV_INPUT_POST_MESSAGE.unpack_from(raw)
        if size > hv.HV_MESSAGE_PAYLOAD_BYTE_COUNT:
            return hvi.HV_STATUS_INVALID_PARAMETER
        if message_type == hv.HVMSG_NONE or message_type >= hv.HV_MESSAGE_TYPE_HYPERVISOR_FIRST:
            return hvi.HV_STATUS_INVALID_PARAMETER
        handler = self._connections.message_handler(connection_id)
        if handler is None:
            return hvi.HV_STATUS_INVALID_CONNECTION_ID
        payload = raw[hv.HV_INPUT_POST_MESSAGE.size:hv.HV_INPUT_POST_MESSAGE.size + size]
        return self._run_handler(lambda: handler(message_type, payload), connection_id)

    def _signal_event(self, fast: bool, input_value: int) -> int:
        if fast:
            raw = input_value.to_bytes(8, "little")
        else:
            raw = self._read_input(input_value, hv.HV_INPUT_SIGNAL_EVENT.size)
            if raw is None:
                return hvi.HV_STATUS_INVALID_ALIGNMENT
        connection_id, flag_number, _rsvd = hv.HV_INPUT_SIGNAL_EVENT.unpack(raw)
        port = self._connections.event_port(connection_id)
        if port is None:
            return hvi.HV_STATUS_INVALID_CONNECTION_ID
        if flag_number >= port.flag_count:
            return hvi.HV_STATUS_INVALID_PARAMETER
        return self._run_handler(port.handler, connection_id)

    def _run_handler(self, fn: Callable[[], int], connection_id: int) -> int:
        try:
            status = fn()
        except Exception:
            with self._lock:
                self.handler_errors += 1
                first = self.handler_errors == 1
            if first:
                log.exception("handler of connection %#x failed (logged once)", connection_id)
            return hvi.HV_STATUS_INVALID_PARAMETER
        if not isinstance(status, int) or not 0 <= status <= hv.HV_HYPERCALL_RESULT_MASK:
            with self._lock:
                self.handler_errors += 1
            log.error("handler of connection %#x returned %r, not an HV status", connection_id, status)
            return hvi.HV_STATUS_INVALID_PARAMETER
        return status

    def stats(self) -> dict:
        with self._lock:
            calls: dict[str, dict[str, int]] = {}
            for (code, status), n in sorted(self._calls.items()):
                calls.setdefault(hv.hypercall_name(code), {})[status_name(status)] = n
            return {"calls": calls, "handler-errors": self.handler_errors}


class HypercallPort:
    """The bus device at HV_HYPERCALL_PORT: a 4-byte read at offset 0 is one hypercall by the
    reading vCPU. It answers only while the hypercall page is enabled (`enabled()`); any other
    access reads all-ones and does nothing, as an unclaimed port would."""

    def __init__(self, dispatcher: HypercallDispatcher, enabled: Callable[[], bool],
                 registers: Callable[[], HypercallRegisters] = current_vcpu_registers) -> None:
        self._dispatcher = dispatcher
        self._enabled = enabled
        self._registers = registers
        self._lock = threading.Lock()
        self.ignored: Counter[str] = Counter()

    def read(self, offset: int, size: int) -> bytes:
        if offset != 0 or size != HV_HYPERCALL_PORT_SIZE:
            return self._ignore("odd-access", size)
        if not self._enabled():
            return self._ignore("page-disabled", size)
        regs = self._registers()
        status = self._dispatcher.call(regs.control, regs.input, regs.output)
        return status.to_bytes(HV_HYPERCALL_PORT_SIZE, "little")

    def write(self, offset: int, data: bytes) -> None:
        self._ignore("write", len(data))

    def _ignore(self, why: str, size: int) -> bytes:
        with self._lock:
            self.ignored[why] += 1
        return b"\xff" * size

    def stats(self) -> dict:
        with self._lock:
            return dict(self.ignored)
