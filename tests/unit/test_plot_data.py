"""pyvmm/plot_data.py: reading traces and replaying them into timelines and block maps.

Traces come from tests/synthetic_trace.py, which writes events as the VMM does and keeps
its own record of which blocks are plugged and which slots are mapped; the replay must
reconstruct the same states from the events alone.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.plot_data import (
    FULL,
    NO_MEMSLOT,
    PLUGGED,
    PROTECTED,
    Step,
    TraceError,
    load_trace,
    replay,
)
from pyvmm.trace_file import read_lines
from tests.synthetic_trace import GiB, MiB, TiB, VMEM_ADDR, TraceBuilder, realistic_trace

BS = 2 * MiB


def replayed(builder: TraceBuilder, **kw):
    events: list[dict] = []
    truncated = read_lines(builder.text().splitlines(True), lambda e, n: events.append({**e, "_line": n}))
    assert not truncated
    return replay(events, **kw)


def small_device(region: int = 128 * MiB, slot: int = 16 * MiB) -> TraceBuilder:
    b = TraceBuilder()
    b.virtio_mem("vm0", VMEM_ADDR, region, slot_size=slot, requested=region)
    return b


# ---------------------------------------------------------------------------- timelines


def test_realistic_trace_timelines() -> None:
    data = replayed(realistic_trace())
    assert data.duration == pytest.approx(30.0)
    assert data.started == "2026-11-23T20:00:00Z"
    vm0 = data.virtio_mem["vm0"]
    # requested: 0, 1 GiB at 2 s, 608 MiB at 8 s, 0 at 28 s
    assert vm0.requested.values == [0, GiB, 608 * MiB, 0]
    assert vm0.requested.times == pytest.approx([0.0, 2.0, 8.0, 28.0])
    assert vm0.plugged.value_at(1.0) == 0
    assert vm0.plugged.value_at(5.5) == GiB          # eight 128 MiB memory blocks
    assert vm0.plugged.value_at(12.0) == 608 * MiB   # after the sub-block unplugs
    assert vm0.plugged.value_at(21.0) == 0           # reset at 20 s
    assert vm0.plugged.value_at(27.0) == 608 * MiB
    assert vm0.plugged.value_at(29.0) == 0           # unplug-all at 28.4 s
    assert vm0.resets == pytest.approx([20.0])
    assert [(req, resp) for _, req, resp in vm0.refused] == [("plug", "nack")]
    assert [(round(t, 3), kind) for t, _, kind in vm0.unplugged_accesses] == [(9.6, "read")]
    hv = data.hv_balloon["hv0"]
    assert hv.memdev_size == 2 * GiB
    assert hv.ballooned.peak() == 256 * MiB and hv.hot_added.peak() == GiB
    assert hv.target.value_at(12.0) == GiB - 256 * MiB and hv.target.value_at(16.0) == 2 * GiB
    assert hv.hot_added.value_at(21.0) == 0
    assert hv.committed.value_at(18.0) == 2 * GiB
    assert not data.unknown_events and not data.is_empty()


def test_memslot_count_and_size_by_owner() -> None:
    data = replayed(realistic_trace())
    slots = data.memslots
    assert slots.count.value_at(1.0) == 2 and slots.total_size.value_at(1.0) == GiB  # boot RAM
    assert slots.count.value_at(5.5) == 10                                         # + 8 slots
    assert slots.size_by_owner["virtio-mem:vm0"].value_at(5.5) == GiB
    # the top memory block was unplugged whole: its slot went; the partly unplugged stay
    assert slots.size_by_owner["virtio-mem:vm0"].value_at(12.0) == 7 * 128 * MiB
    assert slots.size_by_owner["hv-balloon:hv0"].value_at(17.0) == GiB
    assert slots.size_by_owner["hv-balloon:hv0"].value_at(21.0) == 0
    assert slots.count.value_at(21.0) == 2
    for t in (0.5, 5.5, 12.0, 17.0, 21.0, 26.0, 29.5):
        assert slots.total_size.value_at(t) == sum(s.value_at(t) for s in slots.size_by_owner.values())


def test_step_keeps_only_visible_changes() -> None:
    s = Step()
    s.set(0.0, 5)
    s.set(1.0, 5)          # no change
    s.set(2.0, 7)
    s.set(2.0, 5)          # undone at the same instant
    s.set(3.0, 9)
    assert (s.times, s.values) == ([0.0, 3.0], [5, 9])
    assert s.value_at(-1.0, default=-1) == -1 and s.value_at(2.5) == 5 and s.value_at(3.0) == 9


# ---------------------------------------------------------------------------- block map


def states(data, t: float) -> list[int]:
    return data.virtio_mem["vm0"].blocks.states_at(t)


def test_plug_protect_unplug_states() -> None:
    b = small_device()          # 64 blocks, 8 per slot
    b.at(1).plug("vm0", 2, 3)
    b.at(2).unplug("vm0", 3, 1)
    b.at(3).unplug("vm0", 2, 1)
    b.at(3.5).unplug("vm0", 4, 1)  # the slot is empty now and goes
    data = replayed(b)
    blocks = data.virtio_mem["vm0"].blocks
    assert blocks.blocks_per_row == 1 and blocks.nb_blocks == 16  # used 1 slot, + 1 slot margin
    P, M, N = PLUGGED, PROTECTED, NO_MEMSLOT
    assert states(data, 0.5) == [N] * 16
    assert states(data, 1.0) == [M, M, P, P, P, M, M, M] + [N] * 8
    assert states(data, 2.0) == [M, M, P, M, P, M, M, M] + [N] * 8
    assert states(data, 3.0) == [M, M, M, M, P, M, M, M] + [N] * 8
    assert states(data, 3.5) == [N] * 16


def test_unplug_all_and_reset_clear_every_block() -> None:
    b = small_device()
    b.at(1).plug("vm0", 0, 10)
    b.at(2).unplug_all("vm0")
    b.at(3).plug("vm0", 20, 4)
    b.at(4).reset("vm0")
    data = replayed(b)
    assert states(data, 1.5).count(PLUGGED) == 10
    assert set(states(data, 2.5)) == {NO_MEMSLOT}
    assert states(data, 3.5).count(PLUGGED) == 4
    assert set(states(data, 4.5)) == {NO_MEMSLOT}
    assert data.virtio_mem["vm0"].resets == [4.0]


def test_unplug_all_before_its_slots_go_leaves_protected_blocks() -> None:
    """Between the UNPLUG_ALL answer and the slot removals the blocks are protected."""
    b = small_device()
    b.at(1).plug("vm0", 0, 10)
    b.at(2)
    b.emit("virtio-mem.response", id="vm0", type="unplug-all", addr=0, nb_blocks=0, resp="ack", us=5)
    b.at(2.5)
    b.emit("memslot.remove", slot=0, gpa=VMEM_ADDR, size=16 * MiB, owner="virtio-mem:vm0", us=1)
    data = replayed(b)
    assert states(data, 2.2)[:16] == [PROTECTED] * 16
    assert states(data, 2.7)[:16] == [NO_MEMSLOT] * 8 + [PROTECTED] * 8


def test_refused_requests_change_nothing() -> None:
    b = small_device()
    b.at(1).plug("vm0", 0, 4)
    b.at(2).plug("vm0", 8, 4, resp="nack")
    b.at(3).unplug("vm0", 0, 2, resp="error")
    b.at(4).plug("vm0", 10, 1, resp="busy")
    data = replayed(b)
    assert states(data, 5.0)[:8] == [PLUGGED] * 4 + [PROTECTED] * 4
    assert PLUGGED not in states(data, 5.0)[8:]
    assert [(t, r, a) for t, r, a in data.virtio_mem["vm0"].refused] == [
        (2.0, "plug", "nack"), (3.0, "unplug", "error"), (4.0, "plug", "busy")]


OPS = st.lists(st.one_of(
    st.tuples(st.sampled_from(["plug", "unplug"]), st.integers(0, 63), st.integers(1, 12)),
    st.tuples(st.sampled_from(["unplug-all", "reset"]), st.just(0), st.just(0)),
), max_size=25)


@settings(max_examples=60, deadline=None)
@given(OPS)
def test_replay_matches_the_builders_own_record(ops) -> None:
    b = small_device()
    expected = []
    for step, (op, first, nb) in enumerate(ops, 1):
        b.at(step)
        nb = min(nb, 64 - first)
        plugged = b.devices["vm0"]["plugged"]
        if op == "plug":
            free = not plugged & set(range(first, first + nb))
            b.plug("vm0", first, nb, resp="ack" if free else "error")
        elif op == "unplug":
            full = set(range(first, first + nb)) <= plugged
            b.unplug("vm0", first, nb, resp="ack" if full else "error")
        elif op == "unplug-all":
            b.unplug_all("vm0")
        else:
            b.reset("vm0")
        expected.append((step, b.expected_states("vm0")))
    data = replayed(b)
    blocks = data.virtio_mem["vm0"].blocks
    for t, want in expected:
        got = blocks.states_at(t)
        assert got == want[:blocks.nb_blocks]
        assert set(want[blocks.nb_blocks:]) <= {NO_MEMSLOT}  # nothing hidden above the view
        assert data.virtio_mem["vm0"].plugged.value_at(t) == want.count(PLUGGED) * BS


def test_view_stops_a_little_above_the_highest_block_used() -> None:
    b = TraceBuilder()
    b.virtio_mem("vm0", VMEM_ADDR, 64 * GiB, slot_size=128 * MiB, requested=GiB)
    b.at(1).plug("vm0", 0, 512)  # 1 GiB
    blocks = replayed(b).virtio_mem["vm0"].blocks
    shown = blocks.nb_blocks * BS
    assert blocks.region_blocks == 64 * GiB // BS
    assert shown == GiB + 128 * MiB  # one more memslot (an eighth of 1 GiB is 128 MiB too)
    untouched = small_device(region=128 * MiB, slot=128 * MiB)
    assert replayed(untouched).virtio_mem["vm0"].blocks.nb_blocks == 64  # the whole (one-slot) region


def test_downsampled_rows_record_shares_in_a_one_tib_region() -> None:
    b = TraceBuilder()
    b.virtio_mem("big", 1 << 44, TiB, slot_size=GiB, requested=TiB)
    b.at(1).plug("big", 0, 64)                 # a whole 1 GiB slot... half of it: 128 MiB
    for i in range(0, 512, 4):                 # then every fourth block of the first 1 GiB
        if i >= 64:
            b.plug("big", i, 1)
    b.at(2).plug("big", 300_000, 10)           # far up: the view stretches to cover it
    data = replayed(b, max_rows=1000)
    blocks = data.virtio_mem["big"].blocks
    assert blocks.rows <= 1000
    assert blocks.blocks_per_row & (blocks.blocks_per_row - 1) == 0   # a power of two
    assert blocks.nb_blocks * BS >= (300_010 * BS)
    per_row = blocks.blocks_per_row
    assert per_row == 512  # 300k+ blocks shown, 1000 rows at most
    plugged, protected, none = blocks.shares_at(1.5)[0]
    # row 0 = blocks 0..511: 64 + 112 plugged, the rest of the (mapped) slot protected
    assert plugged == pytest.approx((64 + 112) / 512, abs=1 / FULL)
    assert protected == pytest.approx(1 - (64 + 112) / 512, abs=1 / FULL)
    assert none == pytest.approx(0, abs=1 / FULL)
    assert blocks.states_at(1.5)[0] == PROTECTED  # most of the row
    row = 300_000 // per_row
    plugged, protected, none = blocks.shares_at(2.5)[row]
    assert plugged > 0 and round(plugged * FULL) == 5  # 10/512 of a row: small but visible
    assert blocks.states_at(2.5)[row] == PROTECTED  # 1 GiB slot covers the row, 10 blocks plugged


def test_columns_stay_bounded_and_end_in_the_final_state() -> None:
    b = small_device(region=256 * MiB)
    for i in range(2000):
        b.at(i * 0.01)
        if i % 2 == 0:
            b.plug("vm0", (i // 2) % 128, 1)
        else:
            b.unplug("vm0", (i // 2) % 128, 1)
    b.at(20.0).plug("vm0", 5, 3)
    data = replayed(b, max_columns=50)
    blocks = data.virtio_mem["vm0"].blocks
    assert 2 <= len(blocks.columns) <= 51
    assert blocks.times == sorted(blocks.times)
    assert blocks.states_at(20.0) == b.expected_states("vm0")[:blocks.nb_blocks]
    full = replayed(b)
    assert len(full.virtio_mem["vm0"].blocks.columns) > 1000  # without the cap, every change


def test_raster_samples_a_uniform_grid() -> None:
    b = small_device()
    b.at(1).plug("vm0", 0, 1)
    b.at(3).unplug("vm0", 0, 1)
    b.at(4).emit("trace-end", dropped=0)
    data = replayed(b)
    blocks = data.virtio_mem["vm0"].blocks
    columns = blocks.raster(data.duration, 4)  # bins end at 1, 2, 3, 4 s
    first_row = [col[0] for col in columns]    # row 0's plugged share
    assert first_row == [FULL, FULL, 0, 0]


# ---------------------------------------------------------------------------- reading


def write(tmp_path, text: str):
    path = tmp_path / "trace.jsonl"
    path.write_text(text)
    return path


def test_truncated_last_line_is_dropped(tmp_path) -> None:
    text = realistic_trace().text()
    cut = text[:text.rindex('"dropped"')]  # the trace-end line, half written
    data = load_trace(write(tmp_path, cut))
    assert data.truncated
    assert data.virtio_mem["vm0"].plugged.value_at(29.0) == 0
    assert not load_trace(write(tmp_path, text)).truncated


@pytest.mark.parametrize("text, message", [
    ("", "holds no trace events"),
    ("\n\n", "holds no trace events"),
    ('{"t": 1, "ev": "trace-start", "version": 1}\nnot json\n{"t": 2, "ev": "x"}\n', "line 2 is not JSON"),
    ('{"t": 1, "ev": "trace-start", "version": 1}\n[1, 2]\n', "line 2 is not a JSON object"),
    ('{"t": 1, "ev": "trace-start", "version": 1}\n{"ev": "x"}\n', "line 2 lacks a numeric 't'"),
    ('{"t": 1, "ev": "memslot.add"}\n', "not a pyvmm trace"),
    ('{"t": 1, "ev": "trace-start", "version": 2}\n', "unsupported trace version 2"),
    ('{"t": 1, "ev": "trace-start"}\n', "unsupported trace version None"),
    ('{"t": 1, "ev": "trace-start", "version": 1}\n{"t": 2, "ev": "memslot.add", "slot": 0, "gpa": -4}\n',
     "line 2: memslot.add needs an integer 'gpa' >= 0"),
    ('{"t": 1, "ev": "trace-start", "version": 1}\n'
     '{"t": 1, "ev": "virtio-mem.device", "id": "v", "addr": 0, "region-size": 3, "block-size": 2, '
     '"slot-size": 2, "requested-size": 0}\n', "region-size is not a multiple of block-size"),
])
def test_bad_traces_give_one_line_errors(tmp_path, text: str, message: str) -> None:
    with pytest.raises(TraceError) as info:
        load_trace(write(tmp_path, text))
    assert message in str(info.value)
    assert "\n" not in str(info.value) and str(info.value).startswith(str(tmp_path))


def test_missing_and_unreadable_files(tmp_path) -> None:
    with pytest.raises(TraceError, match="no such file"):
        load_trace(tmp_path / "absent.jsonl")
    with pytest.raises(TraceError, match="is a directory"):
        load_trace(tmp_path)
    binary = tmp_path / "bin"
    binary.write_bytes(b"\xff\xfe\x00garbage" * 100)
    with pytest.raises(TraceError, match="not a text file"):
        load_trace(binary)


def test_unknown_events_and_fields_are_counted_not_fatal() -> None:
    b = small_device()
    b.at(1).emit("future.event", anything=1)
    b.emit("future.event")
    b.at(2).emit("virtio-mem.size", id="ghost", size=4)
    b.emit("memslot.remove", slot=99, gpa=0, size=4096, owner="ram", us=1)
    b.at(3).plug("vm0", 0, 2)
    b.lines[-1] = json.dumps({**json.loads(b.lines[-1]), "new-field": [1, 2]})
    data = replayed(b)
    assert data.unknown_events == {"future.event": 2, "virtio-mem.size (undeclared device)": 1,
                                   "memslot.remove (unknown slot)": 1}
    assert data.virtio_mem["vm0"].plugged.value_at(3.0) == 4 * MiB


def test_a_trace_with_only_bookkeeping_is_empty() -> None:
    b = TraceBuilder()
    b.at(1).emit("qmp.command", command="query-status", result="ok", us=10)
    b.at(2).emit("trace-end", dropped=0)
    data = replayed(b)
    assert data.is_empty() and data.duration == 2.0


def test_a_change_undone_within_one_column_keeps_the_earlier_columns() -> None:
    b = small_device()
    b.at(0.5).plug("vm0", 0, 1)      # column width is 1 s below: bucket 0
    b.at(1.2).plug("vm0", 1, 1)      # bucket 1 ...
    b.at(1.3).unplug("vm0", 1, 1)    # ... undone in the same bucket
    b.at(1.4).plug("vm0", 2, 1)      # ... and another change there
    b.at(4.0).emit("trace-end", dropped=0)
    blocks = replayed(b, max_columns=4).virtio_mem["vm0"].blocks
    assert blocks.states_at(0.8)[:3] == [PLUGGED, PROTECTED, PROTECTED]
    assert blocks.states_at(1.5)[:3] == [PLUGGED, PROTECTED, PLUGGED]
    assert blocks.times == pytest.approx([0.5, 1.4])


def test_events_slightly_out_of_order_are_replayed_in_time_order() -> None:
    b = small_device()
    b.at(1).plug("vm0", 0, 2)
    b.at(2).unplug("vm0", 0, 2)
    # the unplug's lines were written before the plug's (two threads racing for the file)
    start = next(i for i, line in enumerate(b.lines) if '"type": "plug"' in line)
    plug_lines = b.lines[start:start + 4]    # request, memslot.add, response, size
    unplug_lines = b.lines[start + 4:]
    assert len(plug_lines) == 4 and '"memslot.remove"' in unplug_lines[-1]
    b.lines[start:] = unplug_lines + plug_lines
    data = replayed(b)
    assert states(data, 1.5)[:2] == [PLUGGED, PLUGGED]
    assert set(states(data, 2.5)) == {NO_MEMSLOT}
    assert data.memslots.count.value_at(1.5) == 1 and data.memslots.count.value_at(2.5) == 0
