"""Hypercalls: the page code, the port, and every status path of HvPostMessage/HvSignalEvent."""

from __future__ import annotations

import struct
import threading

import capstone
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.hyperv import hv_abi as hv
from devices.hyperv import interfaces as hvi
from devices.hyperv.connections import Connections
from devices.hyperv.hypercalls import (HV_HYPERCALL_PORT, HypercallDispatcher, HypercallPort, HypercallRegisters,
                                       current_vcpu_registers, hypercall_page, hypercall_page_code)
from tests.hyperv_fakes import FakeGuestMemory, FakeVcpu
from vmm.vcpu import set_current_vcpu

INPUT = 0x3000
FAST = hv.HV_HYPERCALL_FAST_BIT
ALL_STATUSES = {getattr(hvi, n) for n in dir(hvi) if n.startswith("HV_STATUS_")}


class Recorder:
    def __init__(self, status: int = hvi.HV_STATUS_SUCCESS) -> None:
        self.status = status
        self.messages: list[tuple[int, bytes]] = []
        self.events = 0

    def message(self, message_type: int, payload: bytes) -> int:
        self.messages.append((message_type, payload))
        return self.status

    def event(self) -> int:
        self.events += 1
        return self.status


def setup(conn_id: int = 1, event_id: int = 0x2001, **event_kw):
    mem = FakeGuestMemory()
    conns = Connections()
    rec = Recorder()
    conns.register_message(conn_id, rec.message)
    conns.register_event(event_id, rec.event, **event_kw)
    return HypercallDispatcher(mem, conns), mem, rec, conns


def post_input(mem: FakeGuestMemory, conn: int, mtype: int, payload: bytes, size: int | None = None,
               at: int = INPUT) -> int:
    size = len(payload) if size is None else size
    mem.ram[at:at + 256] = struct.pack("<IIII", conn, 0, mtype, size) + payload.ljust(240, b"\0")[:240]
    return at


# ---------------------------------------------------------------- the page


def test_page_code_is_in_eax_port_then_ret() -> None:
    code = hypercall_page_code()
    assert code == bytes([0xE5, HV_HYPERCALL_PORT, 0xC3])
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    insns = [(i.mnemonic, i.op_str) for i in md.disasm(code, 0)]
    assert insns == [("in", f"eax, {HV_HYPERCALL_PORT:#x}"), ("ret", "")]
    page = hypercall_page()
    assert len(page) == 4096 and page.startswith(code) and set(page[len(code):]) == {0xCC}
    assert b"\x0f\x01\xc1" not in page   # never vmcall


def test_port_is_an_imm8_port_nobody_else_uses() -> None:
    assert 0 <= HV_HYPERCALL_PORT <= 0xFF
    used = {0x80, 0x64, 0x70, 0x71, 0x20, 0x21, 0xA0, 0xA1, 0x40, 0x41, 0x42, 0x43, 0x60, 0x61, 0xED, 0xE9}
    assert not used & set(range(HV_HYPERCALL_PORT, HV_HYPERCALL_PORT + 4))
    with pytest.raises(ValueError):
        hypercall_page_code(0x100)


# ---------------------------------------------------------------- HvPostMessage


def test_post_message_reaches_the_handler() -> None:
    d, mem, rec, _ = setup()
    post_input(mem, 1, 0x10, b"hello")
    assert d.call(hv.HVCALL_POST_MESSAGE, INPUT) == hvi.HV_STATUS_SUCCESS
    assert rec.messages == [(0x10, b"hello")]


def test_post_message_payload_is_exactly_payload_size_bytes() -> None:
    d, mem, rec, _ = setup()
    post_input(mem, 1, 0x10, b"abcdef" * 40, size=7)
    assert d.call(hv.HVCALL_POST_MESSAGE, INPUT) == 0
    assert rec.messages == [(0x10, b"abcdefa")]
    post_input(mem, 1, 0x7FFFFFFF, bytes(range(240)), size=240)
    assert d.call(hv.HVCALL_POST_MESSAGE, INPUT) == 0
    assert rec.messages[-1] == (0x7FFFFFFF, bytes(range(240)))


def test_post_message_handler_status_is_passed_through() -> None:
    d, mem, rec, _ = setup()
    rec.status = hvi.HV_STATUS_INSUFFICIENT_BUFFERS
    post_input(mem, 1, 1, b"")
    assert d.call(hv.HVCALL_POST_MESSAGE, INPUT) == hvi.HV_STATUS_INSUFFICIENT_BUFFERS


@pytest.mark.parametrize("gpa", [INPUT + 1, INPUT + 4, INPUT + 0xF08])  # misaligned; spans into the next page
def test_post_message_bad_alignment(gpa: int) -> None:
    d, mem, rec, _ = setup()
    post_input(mem, 1, 1, b"x", at=gpa & ~7)
    assert d.call(hv.HVCALL_POST_MESSAGE, gpa) == hvi.HV_STATUS_INVALID_ALIGNMENT
    assert rec.messages == []


def test_post_message_at_the_last_slot_of_a_page_is_fine() -> None:
    d, mem, rec, _ = setup()
    post_input(mem, 1, 1, b"x", at=INPUT + 0xF00)
    assert d.call(hv.HVCALL_POST_MESSAGE, INPUT + 0xF00) == 0


@pytest.mark.parametrize("gpa", [1 << 20, (1 << 64) - 8, 0xFFFF_FFFF_F000])
def test_post_message_input_outside_guest_memory(gpa: int) -> None:
    d, _, rec, _ = setup()
    assert d.call(hv.HVCALL_POST_MESSAGE, gpa) == hvi.HV_STATUS_INVALID_ALIGNMENT
    assert rec.messages == []


@pytest.mark.parametrize("size", [241, 255, 0xFFFFFFFF])
def test_post_message_payload_too_big(size: int) -> None:
    d, mem, rec, _ = setup()
    post_input(mem, 1, 1, b"", size=size)
    assert d.call(hv.HVCALL_POST_MESSAGE, INPUT) == hvi.HV_STATUS_INVALID_PARAMETER
    assert rec.messages == []


@pytest.mark.parametrize("mtype", [0, 0x80000000, 0x80000010, 0xFFFFFFFF])
def test_post_message_type_reserved_for_the_hypervisor_or_none(mtype: int) -> None:
    d, mem, rec, _ = setup()
    post_input(mem, 1, mtype, b"x")
    assert d.call(hv.HVCALL_POST_MESSAGE, INPUT) == hvi.HV_STATUS_INVALID_PARAMETER
    assert rec.messages == []


def test_post_message_unknown_connection() -> None:
    d, mem, rec, conns = setup()
    post_input(mem, 2, 1, b"x")
    assert d.call(hv.HVCALL_POST_MESSAGE, INPUT) == hvi.HV_STATUS_INVALID_CONNECTION_ID
    conns.unregister_message(1)
    post_input(mem, 1, 1, b"x")
    assert d.call(hv.HVCALL_POST_MESSAGE, INPUT) == hvi.HV_STATUS_INVALID_CONNECTION_ID
    assert rec.messages == []


def test_post_message_has_no_fast_form() -> None:
    d, mem, rec, _ = setup()
    post_input(mem, 1, 1, b"x")
    assert d.call(hv.HVCALL_POST_MESSAGE | FAST, INPUT) == hvi.HV_STATUS_INVALID_HYPERCALL_INPUT
    assert rec.messages == []


def test_failing_handler_gives_invalid_parameter_and_is_counted() -> None:
    d, mem, _, conns = setup()

    def boom(message_type: int, payload: bytes) -> int:
        raise RuntimeError("vmbus bug")

    conns.register_message(7, boom)
    conns.register_message(8, lambda t, p: "not a status")  # type: ignore[arg-type, return-value]
    conns.register_message(9, lambda t, p: 0x10000)
    for conn in (7, 8, 9):
        post_input(mem, conn, 1, b"")
        assert d.call(hv.HVCALL_POST_MESSAGE, INPUT) == hvi.HV_STATUS_INVALID_PARAMETER
    assert d.stats()["handler-errors"] == 3


# ---------------------------------------------------------------- HvSignalEvent


def test_fast_signal_event() -> None:
    d, _, rec, _ = setup()
    assert d.call(hv.HVCALL_SIGNAL_EVENT | FAST, 0x2001) == 0
    assert d.call(hv.HVCALL_SIGNAL_EVENT | FAST, 0x2001 | 5 << 32, 0xDEAD) == 0
    assert rec.events == 2


def test_slow_signal_event() -> None:
    d, mem, rec, _ = setup()
    mem.ram[INPUT:INPUT + 8] = struct.pack("<IHH", 0x2001, 3, 0)
    assert d.call(hv.HVCALL_SIGNAL_EVENT, INPUT) == 0
    assert rec.events == 1
    assert d.call(hv.HVCALL_SIGNAL_EVENT, INPUT + 4) == hvi.HV_STATUS_INVALID_ALIGNMENT
    assert d.call(hv.HVCALL_SIGNAL_EVENT, 1 << 40) == hvi.HV_STATUS_INVALID_ALIGNMENT
    assert rec.events == 1


def test_signal_event_unknown_connection_wins_over_a_bad_flag() -> None:
    d, _, rec, conns = setup()
    assert d.call(hv.HVCALL_SIGNAL_EVENT | FAST, 0x2002) == hvi.HV_STATUS_INVALID_CONNECTION_ID
    assert d.call(hv.HVCALL_SIGNAL_EVENT | FAST, 0x2002 | 0xFFFF << 32) == hvi.HV_STATUS_INVALID_CONNECTION_ID
    conns.unregister_event(0x2001)
    assert d.call(hv.HVCALL_SIGNAL_EVENT | FAST, 0x2001) == hvi.HV_STATUS_INVALID_CONNECTION_ID
    assert rec.events == 0


def test_signal_event_flag_number_must_be_below_the_ports_flag_count() -> None:
    d, _, rec, conns = setup()
    assert d.call(hv.HVCALL_SIGNAL_EVENT | FAST, 0x2001 | 2047 << 32) == 0
    assert d.call(hv.HVCALL_SIGNAL_EVENT | FAST, 0x2001 | 2048 << 32) == hvi.HV_STATUS_INVALID_PARAMETER
    conns.register_event(0x30, rec.event, flag_count=1)
    assert d.call(hv.HVCALL_SIGNAL_EVENT | FAST, 0x30) == 0
    assert d.call(hv.HVCALL_SIGNAL_EVENT | FAST, 0x30 | 1 << 32) == hvi.HV_STATUS_INVALID_PARAMETER
    assert rec.events == 2


# ---------------------------------------------------------------- the control value


def test_unknown_codes() -> None:
    d, _, _, _ = setup()
    for code in (0, 1, 0x2, 0x5B, 0x5E, 0x8001, 0xFFFF):
        assert d.call(code, INPUT) == hvi.HV_STATUS_INVALID_HYPERCALL_CODE
        assert d.call(code | FAST, INPUT) == hvi.HV_STATUS_INVALID_HYPERCALL_CODE


@pytest.mark.parametrize("bits", [1 << 17, 1 << 26, 1 << 27, 1 << 31, 1 << 32, 1 << 43, 1 << 44, 1 << 48,
                                  1 << 59, 1 << 60, 1 << 63])
def test_reserved_bits_rep_counts_and_varheads_are_refused(bits: int) -> None:
    d, mem, rec, _ = setup()
    post_input(mem, 1, 1, b"x")
    assert d.call(hv.HVCALL_POST_MESSAGE | bits, INPUT) == hvi.HV_STATUS_INVALID_HYPERCALL_INPUT
    assert d.call(hv.HVCALL_SIGNAL_EVENT | FAST | bits, 0x2001) == hvi.HV_STATUS_INVALID_HYPERCALL_INPUT
    assert rec.messages == [] and rec.events == 0


def test_stats_count_by_code_and_status() -> None:
    d, mem, _, _ = setup()
    post_input(mem, 1, 1, b"x")
    d.call(hv.HVCALL_POST_MESSAGE, INPUT)
    d.call(hv.HVCALL_POST_MESSAGE, INPUT)
    d.call(hv.HVCALL_SIGNAL_EVENT | FAST, 0x9999)
    d.call(0x99, 0)
    assert d.stats()["calls"] == {
        "HvPostMessage": {"HV_STATUS_SUCCESS": 2},
        "HvSignalEvent": {"HV_STATUS_INVALID_CONNECTION_ID": 1},
        "0x0099": {"HV_STATUS_INVALID_HYPERCALL_CODE": 1},
    }


U64 = st.integers(0, (1 << 64) - 1)


@settings(max_examples=400, deadline=None)
@given(control=st.one_of(U64, st.sampled_from([0x5C, 0x5D, 0x1005D]).map(int)), rdx=U64, r8=U64,
       page=st.binary(min_size=256, max_size=256))
def test_hostile_hypercalls_never_raise(control: int, rdx: int, r8: int, page: bytes) -> None:
    d, mem, _, _ = setup()
    mem.ram[INPUT:INPUT + 256] = page
    for gpa in (rdx, INPUT, INPUT + (rdx & 0xFFF)):
        status = d.call(control, gpa, r8)
        assert status in ALL_STATUSES
        if control & 0xFFFF not in (0x5C, 0x5D):
            assert status == hvi.HV_STATUS_INVALID_HYPERCALL_CODE


# ---------------------------------------------------------------- the port


def test_port_runs_a_hypercall_with_the_callers_registers() -> None:
    d, mem, rec, _ = setup()
    post_input(mem, 1, 4, b"regs")
    regs = HypercallRegisters(0, hv.HVCALL_POST_MESSAGE, INPUT, 0)
    port = HypercallPort(d, enabled=lambda: True, registers=lambda: regs)
    assert port.read(0, 4) == bytes(4)
    assert rec.messages == [(4, b"regs")]
    regs = HypercallRegisters(0, hv.HVCALL_SIGNAL_EVENT | FAST, 0x777, 0)
    assert int.from_bytes(port.read(0, 4), "little") == hvi.HV_STATUS_INVALID_CONNECTION_ID


def test_port_does_nothing_while_the_page_is_disabled_or_on_odd_accesses() -> None:
    d, mem, rec, _ = setup()
    post_input(mem, 1, 4, b"regs")
    enabled = [False]
    port = HypercallPort(d, enabled=lambda: enabled[0],
                         registers=lambda: HypercallRegisters(0, hv.HVCALL_POST_MESSAGE, INPUT, 0))
    assert port.read(0, 4) == b"\xff" * 4
    enabled[0] = True
    assert port.read(0, 1) == b"\xff"
    assert port.read(1, 2) == b"\xff\xff"
    port.write(0, b"\0\0\0\0")
    assert rec.messages == []
    assert port.stats() == {"page-disabled": 1, "odd-access": 2, "write": 1}


def test_current_vcpu_registers_come_from_the_calling_vcpu_thread() -> None:
    d, mem, rec, _ = setup()
    post_input(mem, 1, 6, b"thread")
    port = HypercallPort(d, enabled=lambda: True)   # default: the current vCPU's registers
    results: dict[int, bytes] = {}

    def vcpu_thread(index: int, control: int, rdx: int) -> None:
        set_current_vcpu(FakeVcpu(index, rcx=control, rdx=rdx, r8=0))  # type: ignore[arg-type]
        assert current_vcpu_registers() == HypercallRegisters(index, control, rdx, 0)
        results[index] = port.read(0, 4)

    t0 = threading.Thread(target=vcpu_thread, args=(0, hv.HVCALL_POST_MESSAGE, INPUT))
    t1 = threading.Thread(target=vcpu_thread, args=(1, 0x77, 0))
    for t in (t0, t1):
        t.start()
        t.join()
    assert results == {0: bytes(4), 1: hvi.HV_STATUS_INVALID_HYPERCALL_CODE.to_bytes(4, "little")}
    assert rec.messages == [(6, b"thread")]
    set_current_vcpu(None)
    with pytest.raises(RuntimeError):
        current_vcpu_registers()
