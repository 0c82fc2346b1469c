"""The SynIC: SIMP slots, msg_pending and EOM, event flags, SINT rules, hostile guest pages."""

from __future__ import annotations

import struct
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.hyperv import hv_abi as hv
from devices.hyperv.synic import Synic
from tests.hyperv_fakes import FakeGuestMemory, RecordingInterrupts
from vmm.msr import MsrFault

SIMP_GPA = 0x10000
SIEFP_GPA = 0x20000
VECTOR = 0xF3
SINT = 2


def make(vps: int = 2, **kw) -> tuple[Synic, FakeGuestMemory, RecordingInterrupts]:
    mem = FakeGuestMemory()
    irq = RecordingInterrupts()
    return Synic(vps, mem, irq, **kw), mem, irq


def enable(s: Synic, vp: int = 0, sint: int = SINT, vector: int = VECTOR, flags: int = 0) -> None:
    s.msr_write(vp, hv.HV_X64_MSR_SIMP, SIMP_GPA + vp * 0x2000 | hv.HV_SYNIC_SIMP_ENABLE)
    s.msr_write(vp, hv.HV_X64_MSR_SIEFP, SIEFP_GPA + vp * 0x2000 | hv.HV_SYNIC_SIEFP_ENABLE)
    s.msr_write(vp, hv.HV_X64_MSR_SINT0 + sint, vector | flags)
    s.msr_write(vp, hv.HV_X64_MSR_SCONTROL, hv.HV_SYNIC_CONTROL_ENABLE)


def slot(mem: FakeGuestMemory, vp: int = 0, sint: int = SINT) -> tuple[int, int, int, bytes]:
    """(message_type, payload_size, flags, payload) of a SIMP slot."""
    at = SIMP_GPA + vp * 0x2000 + sint * 256
    mtype, size, flags, _rsvd, _sender = struct.unpack_from("<IBBHQ", mem.ram, at)
    return mtype, size, flags, bytes(mem.ram[at + 16:at + 16 + size])


def guest_consume(s: Synic, mem: FakeGuestMemory, vp: int = 0, sint: int = SINT) -> tuple[int, bytes]:
    """What Linux's vmbus_signal_eom does: take the message, clear the type, EOM if pending."""
    mtype, _size, flags, payload = slot(mem, vp, sint)
    at = SIMP_GPA + vp * 0x2000 + sint * 256
    mem.ram[at:at + 4] = bytes(4)
    if flags & hv.HV_MESSAGE_FLAG_PENDING:
        s.msr_write(vp, hv.HV_X64_MSR_EOM, 0)
    return mtype, payload


# ---------------------------------------------------------------- registers


def test_power_on_values() -> None:
    s, _, _ = make()
    assert s.msr_read(1, hv.HV_X64_MSR_SCONTROL) == 0
    assert s.msr_read(1, hv.HV_X64_MSR_SVERSION) == hv.HV_SYNIC_VERSION_1 == 1
    assert s.msr_read(1, hv.HV_X64_MSR_SIMP) == 0
    assert s.msr_read(1, hv.HV_X64_MSR_SIEFP) == 0
    assert s.msr_read(1, hv.HV_X64_MSR_EOM) == 0
    for i in range(16):
        assert s.msr_read(1, hv.HV_X64_MSR_SINT0 + i) == hv.HV_SYNIC_SINT_MASKED


def test_registers_are_per_vp_and_keep_their_fields() -> None:
    s, _, _ = make()
    value = 0x40 | hv.HV_SYNIC_SINT_AUTO_EOI | hv.HV_SYNIC_SINT_POLLING | (0xFF << 24)
    s.msr_write(1, hv.HV_X64_MSR_SINT0 + 5, value)
    assert s.msr_read(1, hv.HV_X64_MSR_SINT0 + 5) == 0x40 | hv.HV_SYNIC_SINT_AUTO_EOI | hv.HV_SYNIC_SINT_POLLING
    assert s.msr_read(0, hv.HV_X64_MSR_SINT0 + 5) == hv.HV_SYNIC_SINT_MASKED
    s.msr_write(0, hv.HV_X64_MSR_SIMP, 0x1234_5000 | 1)
    assert s.msr_read(0, hv.HV_X64_MSR_SIMP) == 0x1234_5001
    assert s.msr_read(1, hv.HV_X64_MSR_SIMP) == 0


def test_sversion_is_read_only() -> None:
    s, _, _ = make()
    with pytest.raises(MsrFault):
        s.msr_write(0, hv.HV_X64_MSR_SVERSION, 2)
    assert s.msr_read(0, hv.HV_X64_MSR_SVERSION) == 1


@pytest.mark.parametrize("vector", [0, 1, 15])
def test_an_unmasked_sint_needs_a_vector_of_16_or_more(vector: int) -> None:
    s, _, _ = make()
    with pytest.raises(MsrFault):
        s.msr_write(0, hv.HV_X64_MSR_SINT0, vector)
    assert s.msr_read(0, hv.HV_X64_MSR_SINT0) == hv.HV_SYNIC_SINT_MASKED
    s.msr_write(0, hv.HV_X64_MSR_SINT0, vector | hv.HV_SYNIC_SINT_MASKED)  # masked: allowed
    s.msr_write(0, hv.HV_X64_MSR_SINT0, 16)
    assert s.msr_read(0, hv.HV_X64_MSR_SINT0) == 16


def test_not_a_synic_msr() -> None:
    s, _, _ = make()
    with pytest.raises(MsrFault):
        s.msr_read(0, hv.HV_X64_MSR_GUEST_OS_ID)
    with pytest.raises(MsrFault):
        s.msr_write(0, 0x40000085, 1)


def test_enabling_the_pages_clears_them() -> None:
    s, mem, _ = make()
    mem.ram[SIMP_GPA:SIMP_GPA + 4096] = b"\xaa" * 4096
    mem.ram[SIEFP_GPA:SIEFP_GPA + 4096] = b"\x55" * 4096
    enable(s)
    assert mem.ram[SIMP_GPA:SIMP_GPA + 4096] == bytes(4096)
    assert mem.ram[SIEFP_GPA:SIEFP_GPA + 4096] == bytes(4096)
    # Writing the same enabled value again leaves the contents alone.
    mem.ram[SIMP_GPA] = 7
    s.msr_write(0, hv.HV_X64_MSR_SIMP, SIMP_GPA | 1)
    assert mem.ram[SIMP_GPA] == 7


# ---------------------------------------------------------------- messages


def test_message_into_a_free_slot_raises_the_vector() -> None:
    s, mem, irq = make()
    enable(s)
    assert s.post_message(0, SINT, 0x10, b"hello")
    assert slot(mem) == (0x10, 5, 0, b"hello")
    assert irq.raised == [(0, VECTOR)]
    assert s.pending(0, SINT) == 0
    # The rest of the 240-byte payload area is zero, the sender too.
    at = SIMP_GPA + SINT * 256
    assert mem.ram[at + 8:at + 16] == bytes(8)
    assert mem.ram[at + 16 + 5:at + 256] == bytes(235)


def test_message_goes_to_its_own_vp_and_sint() -> None:
    s, mem, irq = make()
    enable(s, vp=1, sint=5, vector=0x80)
    assert s.post_message(1, 5, 1, b"x")
    assert slot(mem, 1, 5)[:2] == (1, 1)
    assert slot(mem, 0, 5)[0] == 0 and slot(mem, 1, SINT)[0] == 0
    assert irq.raised == [(1, 0x80)]


def test_message_waits_until_synic_simp_and_sint_are_all_enabled() -> None:
    s, mem, irq = make()
    assert s.post_message(0, SINT, 3, b"early")
    assert s.pending(0, SINT) == 1
    s.msr_write(0, hv.HV_X64_MSR_SIMP, SIMP_GPA | 1)
    s.msr_write(0, hv.HV_X64_MSR_SINT0 + SINT, VECTOR)
    assert irq.raised == [] and slot(mem)[0] == 0       # SCONTROL still off
    s.msr_write(0, hv.HV_X64_MSR_SCONTROL, 1)
    assert slot(mem) == (3, 5, 0, b"early")
    assert irq.raised == [(0, VECTOR)]


def test_masked_sint_holds_messages_until_unmasked() -> None:
    s, mem, irq = make()
    enable(s, flags=hv.HV_SYNIC_SINT_MASKED)
    assert s.post_message(0, SINT, 3, b"m")
    assert slot(mem)[0] == 0 and irq.raised == []
    s.msr_write(0, hv.HV_X64_MSR_SINT0 + SINT, VECTOR)
    assert slot(mem)[0] == 3 and irq.raised == [(0, VECTOR)]


def test_busy_slot_sets_msg_pending_and_eom_delivers_the_next() -> None:
    s, mem, irq = make()
    enable(s)
    s.post_message(0, SINT, 1, b"first")
    s.post_message(0, SINT, 2, b"second")
    assert slot(mem) == (1, 5, hv.HV_MESSAGE_FLAG_PENDING, b"first")
    assert s.pending(0, SINT) == 1
    assert irq.raised == [(0, VECTOR)]
    # EOM while the guest still holds the slot does nothing.
    s.msr_write(0, hv.HV_X64_MSR_EOM, 0)
    assert slot(mem)[0] == 1 and s.pending(0, SINT) == 1
    assert guest_consume(s, mem) == (1, b"first")
    assert slot(mem) == (2, 6, 0, b"second")
    assert irq.raised == [(0, VECTOR), (0, VECTOR)]
    assert s.stats()["messages-delivered"] == 2


def test_a_delivered_message_is_marked_pending_while_more_wait() -> None:
    s, mem, _ = make()
    enable(s)
    for i in range(1, 5):
        s.post_message(0, SINT, i, bytes([i]))
    got = []
    flags = []
    while slot(mem)[0]:
        flags.append(slot(mem)[2])
        got.append(guest_consume(s, mem))
    assert got == [(i, bytes([i])) for i in range(1, 5)]
    assert flags == [1, 1, 1, 0]


def test_slot_emptied_while_pending_is_being_set_is_not_lost() -> None:
    """The guest empties the slot right after our busy check; the re-check must deliver."""
    class RacingMemory(FakeGuestMemory):
        def write(self, gpa: int, data: bytes) -> None:
            super().write(gpa, data)
            if gpa == SIMP_GPA + SINT * 256 + hv.HV_MESSAGE_FLAGS_OFFSET:
                self.ram[gpa - 5:gpa - 1] = bytes(4)  # the guest clears message_type, sees no flag yet

    mem = RacingMemory()
    irq = RecordingInterrupts()
    s = Synic(1, mem, irq)
    enable(s)
    s.post_message(0, SINT, 1, b"a")
    s.post_message(0, SINT, 2, b"b")
    assert slot(mem)[:2] == (2, 1)
    assert s.pending(0, SINT) == 0
    assert len(irq.raised) == 2


def test_polling_sint_gets_messages_without_interrupts() -> None:
    s, mem, irq = make()
    enable(s, flags=hv.HV_SYNIC_SINT_POLLING)
    assert s.post_message(0, SINT, 9, b"p")
    assert slot(mem)[0] == 9
    assert irq.raised == []


def test_post_message_refusals() -> None:
    s, _, _ = make(vps=2)
    assert s.post_message(2, 0, 1, b"") is False
    assert s.post_message(-1, 0, 1, b"") is False
    assert s.post_message(0, 16, 1, b"") is False
    with pytest.raises(ValueError):
        s.post_message(0, 0, 1, bytes(241))
    with pytest.raises(ValueError):
        s.post_message(0, 0, 0, b"")
    assert s.post_message(0, 0, 1, bytes(240)) is True


def test_queue_limit() -> None:
    s, _, _ = make(queue_limit=2)
    assert s.post_message(0, 0, 1, b"")
    assert s.post_message(0, 0, 1, b"")
    assert not s.post_message(0, 0, 1, b"")
    assert s.stats()["messages-refused"] == 1
    assert s.post_message(0, 1, 1, b"")  # per SINT


def test_reset_drops_messages_and_masks_everything() -> None:
    s, mem, irq = make()
    enable(s)
    s.post_message(0, SINT, 1, b"a")
    s.post_message(0, SINT, 2, b"b")
    s.reset()
    assert s.pending(0, SINT) == 0
    assert s.msr_read(0, hv.HV_X64_MSR_SCONTROL) == 0
    assert s.msr_read(0, hv.HV_X64_MSR_SINT0 + SINT) == hv.HV_SYNIC_SINT_MASKED
    assert s.stats()["messages-dropped-on-reset"] == 1
    assert s.stats()["messages-pending"] == 0


def test_interrupt_failure_is_counted_not_raised() -> None:
    mem = FakeGuestMemory()
    s = Synic(1, mem, RecordingInterrupts(fail=True))
    enable(s)
    assert s.post_message(0, SINT, 1, b"a")
    assert s.signal_event(0, SINT, 3)
    assert s.stats()["interrupt-errors"] == 2
    assert s.stats()["interrupts"] == 0


def test_concurrent_posters_and_a_consuming_guest_lose_nothing() -> None:
    s, mem, _ = make(vps=1)
    enable(s)
    per_thread, threads = 150, 3
    received: list[bytes] = []
    done = threading.Event()

    def poster(t: int) -> None:
        for i in range(per_thread):
            assert s.post_message(0, SINT, 1, bytes([t, i]))

    def guest() -> None:
        deadline = time.monotonic() + 20
        while (not done.is_set() or slot(mem)[0] or s.pending(0, SINT)) and time.monotonic() < deadline:
            if slot(mem)[0]:
                received.append(guest_consume(s, mem)[1])

    g = threading.Thread(target=guest)
    g.start()
    posters = [threading.Thread(target=poster, args=(t,)) for t in range(threads)]
    for p in posters:
        p.start()
    for p in posters:
        p.join()
    done.set()
    g.join(30)
    assert not g.is_alive()
    assert len(received) == per_thread * threads
    for t in range(threads):  # FIFO per poster
        assert [r[1] for r in received if r[0] == t] == list(range(per_thread))


# ---------------------------------------------------------------- events


def test_signal_event_sets_the_flag_bit_and_raises() -> None:
    s, mem, irq = make()
    enable(s)
    assert s.signal_event(0, SINT, 0)
    assert s.signal_event(0, SINT, 13)
    assert s.signal_event(0, SINT, 2047)
    area = mem.ram[SIEFP_GPA + SINT * 256:SIEFP_GPA + (SINT + 1) * 256]
    assert int.from_bytes(area, "little") == (1 << 0) | (1 << 13) | (1 << 2047)
    assert mem.ram[SIEFP_GPA:SIEFP_GPA + SINT * 256] == bytes(SINT * 256)   # other SINTs untouched
    assert irq.raised == [(0, VECTOR)] * 3


def test_signal_event_needs_siefp_sint_and_synic() -> None:
    s, _, irq = make()
    assert not s.signal_event(0, SINT, 1)
    s.msr_write(0, hv.HV_X64_MSR_SIEFP, SIEFP_GPA | 1)
    s.msr_write(0, hv.HV_X64_MSR_SCONTROL, 1)
    assert not s.signal_event(0, SINT, 1)            # SINT masked
    s.msr_write(0, hv.HV_X64_MSR_SINT0 + SINT, VECTOR)
    assert s.signal_event(0, SINT, 1)
    s.msr_write(0, hv.HV_X64_MSR_SIEFP, SIEFP_GPA)  # disabled
    assert not s.signal_event(0, SINT, 1)
    assert not s.signal_event(5, SINT, 1)
    assert irq.raised == [(0, VECTOR)]
    with pytest.raises(ValueError):
        s.signal_event(0, SINT, 2048)


# ---------------------------------------------------------------- hostile guests

U64 = st.integers(0, (1 << 64) - 1)


def test_simp_outside_guest_memory_is_counted_never_raised() -> None:
    s, mem, irq = make()
    bad = 0xFFFF_FFFF_F000
    s.msr_write(0, hv.HV_X64_MSR_SIMP, bad | 1)
    s.msr_write(0, hv.HV_X64_MSR_SIEFP, bad | 1)
    s.msr_write(0, hv.HV_X64_MSR_SINT0 + SINT, VECTOR)
    s.msr_write(0, hv.HV_X64_MSR_SCONTROL, 1)
    assert s.post_message(0, SINT, 1, b"lost?") is True
    assert s.pending(0, SINT) == 1          # kept: the guest may fix its SIMP
    assert not s.signal_event(0, SINT, 1)
    assert irq.raised == []
    stats = s.stats()
    assert stats["bad-simp-accesses"] >= 2 and stats["bad-siefp-accesses"] >= 2
    s.msr_write(0, hv.HV_X64_MSR_SIMP, SIMP_GPA | 1)
    assert slot(mem)[0] == 1 and irq.raised == [(0, VECTOR)]


def test_simp_straddling_the_end_of_memory() -> None:
    s, mem, _ = make()
    last_page = len(mem.ram) - 4096
    s.msr_write(0, hv.HV_X64_MSR_SIMP, (last_page + 4096) | 1)  # just past the end
    s.msr_write(0, hv.HV_X64_MSR_SINT0 + 15, VECTOR)
    s.msr_write(0, hv.HV_X64_MSR_SCONTROL, 1)
    assert s.post_message(0, 15, 1, b"z")
    assert s.stats()["messages-delivered"] == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted({hv.HV_X64_MSR_SCONTROL, hv.HV_X64_MSR_SIEFP, hv.HV_X64_MSR_SIMP,
                                                  hv.HV_X64_MSR_EOM, hv.HV_X64_MSR_SINT0, hv.HV_X64_MSR_SINT0 + 7,
                                                  hv.HV_X64_MSR_SINT15})), U64), max_size=12),
       st.lists(st.tuples(st.integers(0, 15), st.integers(1, 0xFFFFFFFF), st.binary(max_size=240)), max_size=6),
       st.lists(st.tuples(st.integers(0, 15), st.integers(0, 2047)), max_size=6))
def test_any_register_values_never_raise_beyond_gp(writes, messages, events) -> None:
    s, mem, irq = make(vps=1)
    for index, value in writes:
        try:
            s.msr_write(0, index, value)
        except MsrFault:
            assert hv.HV_X64_MSR_SINT0 <= index <= hv.HV_X64_MSR_SINT15
            assert not value & hv.HV_SYNIC_SINT_MASKED and value & 0xFF < 16
        for sint, mtype, payload in messages:
            assert s.post_message(0, sint, mtype, payload) is True
        for sint, flag in events:
            s.signal_event(0, sint, flag)
    for vp, vector in irq.raised:
        assert vp == 0 and vector >= 16
    stats = s.stats()
    assert stats["messages-delivered"] + stats["messages-pending"] == stats["messages-posted"]
