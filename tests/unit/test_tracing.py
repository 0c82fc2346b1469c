"""The tracer (vmm/tracing.py): file framing, field spelling, threads, periodic flush, the
disabled path, and what a failing disk or a full buffer costs (dropped events, no crash)."""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest

from vmm import tracing
from vmm.tracing import FLUSH_INTERVAL_S, NULL_TRACER, TRACE_FORMAT_VERSION, Tracer

NEVER = 3600.0  # a flush interval that never elapses in a test: only flush()/close() write


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_framing_fields_and_spelling(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    before = time.monotonic()
    tracer = Tracer(path)
    tracer.emit("virtio-mem.request", id="vm0", type="plug", addr=1 << 32, nb_blocks=3)
    tracer.emit("odd", where=path)  # not JSON-serialisable: written as text, not lost
    tracer.close()
    after = time.monotonic()
    start, request, odd, end = read_events(path)
    assert start["ev"] == "trace-start" and start["version"] == TRACE_FORMAT_VERSION
    assert start["pid"] == os.getpid() and start["wall"].endswith("Z")
    assert request == {"t": request["t"], "ev": "virtio-mem.request", "id": "vm0", "type": "plug",
                       "addr": 1 << 32, "nb-blocks": 3}
    assert odd["where"] == str(path)
    assert end == {"t": end["t"], "ev": "trace-end", "dropped": 0}
    # t is CLOCK_MONOTONIC of this process, in seconds, in file order
    assert before <= start["t"] <= request["t"] <= odd["t"] <= end["t"] <= after
    assert path.read_text().endswith("\n")


def test_close_is_idempotent_and_later_events_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    tracer = Tracer(path)
    tracer.close()
    tracer.emit("late")
    tracer.close()
    assert [e["ev"] for e in read_events(path)] == ["trace-start", "trace-end"]


def test_events_reach_the_file_within_a_second_without_close(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    tracer = Tracer(path)
    try:
        tracer.emit("tick", n=1)
        emitted = time.monotonic()
        while "tick" not in path.read_text():
            assert time.monotonic() - emitted < 1.0 + FLUSH_INTERVAL_S, "not flushed within a second"
            time.sleep(0.02)
    finally:
        tracer.close()


def test_many_threads_lose_nothing_and_stay_in_time_order(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    tracer = Tracer(path, flush_interval=0.01)  # flushes race with the emitters
    threads_n, per_thread = 8, 2000
    go = threading.Barrier(threads_n)

    def worker(k: int) -> None:
        go.wait()
        for i in range(per_thread):
            tracer.emit("x", thread=k, seq=i)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(threads_n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    tracer.close()
    events = read_events(path)
    xs = [e for e in events if e["ev"] == "x"]
    assert len(xs) == threads_n * per_thread
    for k in range(threads_n):
        assert [e["seq"] for e in xs if e["thread"] == k] == list(range(per_thread))
    ts = [e["t"] for e in events]
    assert ts == sorted(ts)
    assert events[-1] == {"t": events[-1]["t"], "ev": "trace-end", "dropped": 0}


def test_null_tracer_is_disabled_and_inert() -> None:
    assert NULL_TRACER.enabled is False
    NULL_TRACER.emit("anything", x=1)
    NULL_TRACER.flush()
    NULL_TRACER.close()
    assert NULL_TRACER.stats() == {"enabled": False}


def test_unwritable_path_raises_for_the_caller(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        Tracer(tmp_path / "no-such-dir" / "t.jsonl")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full to fake a full disk")
def test_full_disk_counts_dropped_events_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pyvmm.trace")
    tracer = Tracer("/dev/full", flush_interval=NEVER)  # every write fails with ENOSPC
    for i in range(5):
        tracer.emit("x", i=i)
    tracer.flush()
    tracer.emit("y")
    tracer.close()  # must not raise
    # trace-start, 5 x, y, trace-end: nothing reached the disk
    assert tracer.dropped == 8 and tracer.written == 0
    warnings = [r for r in caplog.records if r.name == "pyvmm.trace"]
    assert len(warnings) == 1 and "No space left on device" in warnings[0].getMessage()


def test_a_torn_write_counts_only_whole_lines_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "t.jsonl"
    tracer = Tracer(path, flush_interval=NEVER)
    for i in range(4):
        tracer.emit("x", i=i)
    real_write_all = tracing._write_all

    def disk_fills_mid_third_line(fd: int, data: bytes) -> int:
        second_end = data.index(b"\n", data.index(b"\n") + 1) + 1
        cut = second_end + 10  # two whole events, then a piece of the third
        real_write_all(fd, data[:cut])
        e = OSError(errno.ENOSPC, "No space left on device")
        e.written = cut
        raise e

    monkeypatch.setattr(tracing, "_write_all", disk_fills_mid_third_line)
    tracer.flush()
    assert tracer.written == 1 + 2 and tracer.dropped == 2  # trace-start went out at creation
    tracer.emit("after")  # tracing has stopped: counted, not written
    tracer.close()
    assert tracer.dropped == 2 + 1 + 1  # + "after" + trace-end
    text = path.read_text()
    assert text.count("\n") == 3 and not text.endswith("\n")  # the torn line is last


def test_a_full_buffer_drops_the_newest_and_trace_end_says_how_many(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    tracer = Tracer(path, flush_interval=NEVER, max_pending=10)
    for i in range(25):
        tracer.emit("x", i=i)
    assert tracer.dropped == 15
    tracer.close()
    events = read_events(path)
    assert [e["i"] for e in events if e["ev"] == "x"] == list(range(10))
    assert events[-1]["ev"] == "trace-end" and events[-1]["dropped"] == 15
    assert tracer.stats() == {"enabled": True, "path": str(path), "written": 12, "dropped": 15,
                              "pending": 0, "failed": False}


def test_run_with_an_unwritable_trace_file_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pyvmm.cli import main

    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"not booted: the trace file is refused first")
    code = main(["run", "--kernel", str(kernel), "--trace", str(tmp_path / "missing-dir" / "t.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("pyvmm: error: cannot write the trace file") and "No such file or directory" in err


def test_run_options_trace_file_and_trace_exits() -> None:
    from pyvmm.cli import build_parser

    args = build_parser().parse_args(["run", "--trace", "out.jsonl", "--trace-exits"])
    assert args.trace == Path("out.jsonl") and args.trace_exits is True
    args = build_parser().parse_args(["run"])
    assert args.trace is None and args.trace_exits is False
