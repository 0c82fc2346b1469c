"""`pyvmm trace summary`: counts and percentiles from synthetic traces, a truncated last line,
and bad files (one-line error, exit status 2)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pyvmm.cli import main
from pyvmm.trace_summary import percentile, summarize
from vmm.tracing import Tracer

START = {"t": 100.0, "ev": "trace-start", "version": 1, "pid": 4242, "wall": "2026-11-23T20:00:00.000Z"}


def write_trace(path: Path, events: list[dict], *, end: bool = True, tail: str = "") -> Path:
    lines = [START, *events] + ([{"t": 200.0, "ev": "trace-end", "dropped": 3}] if end else [])
    path.write_text("".join(json.dumps(e) + "\n" for e in lines) + tail)
    return path


def responses(kind: str, resp: str, us_values: list[float]) -> list[dict]:
    return [{"t": 101.0 + i / 10, "ev": "virtio-mem.response", "id": "vm0", "type": kind, "addr": 0,
             "nb-blocks": 1, "resp": resp, "us": us} for i, us in enumerate(us_values)]


def run_cli(capsys: pytest.CaptureFixture, path: Path) -> tuple[int, str, str]:
    code = main(["trace", "summary", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("samples,q,expected", [
    (list(range(1, 101)), 0.50, 50),
    (list(range(1, 101)), 0.99, 99),
    (list(range(100, 0, -1)), 0.99, 99),   # order does not matter
    ([7.0], 0.99, 7.0),
    ([1, 2, 3, 4], 0.50, 2),               # nearest rank: ceil(0.5 * 4) = 2nd smallest
    ([1, 2, 3, 4], 0.99, 4),
    ([10, 20], 0.50, 10),
])
def test_percentile_is_nearest_rank(samples, q, expected) -> None:
    assert percentile(samples, q) == expected


def test_counts_and_latencies_per_group(tmp_path: Path) -> None:
    plug_us = [float(v) for v in range(1, 201)]          # p50 100, p99 198, max 200
    events = (responses("plug", "ack", plug_us) + responses("plug", "nack", [5.0, 7.0])
              + responses("unplug", "ack", [30.0])
              + [{"t": 150.0, "ev": "memslot.add", "slot": 2, "gpa": 1 << 32, "size": 128 << 20,
                  "owner": "virtio-mem:vm0", "us": 40.0},
                 {"t": 151.0, "ev": "memslot.remove", "slot": 2, "gpa": 1 << 32, "size": 128 << 20,
                  "owner": "virtio-mem:vm0", "us": 400.0},
                 {"t": 152.0, "ev": "vmbus.message", "dir": "guest", "type": "initiate_contact"},
                 {"t": 152.5, "ev": "vmbus.message", "dir": "host", "type": "version_response"},
                 {"t": 153.0, "ev": "hv-balloon.message", "dir": "guest", "type": "DM_STATUS_REPORT"},
                 {"t": 153.1, "ev": "hv-balloon.message", "dir": "guest", "type": "DM_STATUS_REPORT"},
                 {"t": 154.0, "ev": "qmp.command", "command": "qom-set", "result": "ok", "us": 900.0},
                 {"t": 155.0, "ev": "qmp.command", "command": "qom-set", "result": "GenericError", "us": 100.0},
                 {"t": 156.0, "ev": "unplugged-access", "device": "vm0", "gpa": 1 << 32, "kind": "read"},
                 {"t": 157.0, "ev": "from-a-newer-pyvmm", "whatever": 1}])
    path = write_trace(tmp_path / "t.jsonl", events)
    s = summarize(path)
    assert s.events["virtio-mem.response"] == 203 and s.events["from-a-newer-pyvmm"] == 1
    plug = s.virtio_mem[("plug", "ack")]
    assert plug.count == 200
    assert (percentile(plug.samples, 0.5), percentile(plug.samples, 0.99), max(plug.samples)) == (100.0, 198.0, 200.0)
    assert s.virtio_mem[("plug", "nack")].count == 2
    assert s.memslots["memslot.remove"].samples == [400.0]
    assert s.vmbus == {("guest", "initiate_contact"): 1, ("host", "version_response"): 1}
    assert s.hv_balloon == {("guest", "DM_STATUS_REPORT"): 2}
    assert s.qmp["qom-set"].count == 2 and s.qmp_errors["qom-set"] == 1
    assert s.end == {"t": 200.0, "ev": "trace-end", "dropped": 3}
    assert s.last_t - s.first_t == 100.0


def test_cli_prints_a_readable_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    events = responses("plug", "ack", [float(v) for v in range(1, 101)]) + [
        {"t": 154.0, "ev": "qmp.command", "command": "qom-set", "result": "ok", "us": 900.0}]
    code, out, err = run_cli(capsys, write_trace(tmp_path / "t.jsonl", events))
    assert code == 0 and err == ""
    assert "format 1, pid 4242" in out and "100.0 s" in out and "3 events dropped" in out
    rows = {line.split()[0] + " " + line.split()[1]: line.split() for line in out.splitlines() if line.startswith("  ")}
    assert rows["plug ack"] == ["plug", "ack", "100", "50.0", "99.0", "100.0"]
    assert rows["qom-set 1"] == ["qom-set", "1", "0", "900.0", "900.0", "900.0"]
    assert rows["virtio-mem.response 100"] == ["virtio-mem.response", "100"]


def test_truncated_last_line_is_skipped_with_a_note(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torn = '{"t": 160.0, "ev": "virtio-mem.resp'
    path = write_trace(tmp_path / "t.jsonl", responses("plug", "ack", [1.0, 2.0]), end=False, tail=torn)
    code, out, err = run_cli(capsys, path)
    assert code == 0, err
    assert "cut short" in out and "no trace-end" in out
    assert summarize(path).events["virtio-mem.response"] == 2


def test_a_tracer_file_reads_back(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "t.jsonl"
    tracer = Tracer(path)
    tracer.emit("virtio-mem.response", id="vm0", type="plug", addr=0, nb_blocks=1, resp="ack", us=12.5)
    tracer.close()
    s = summarize(path)
    assert s.virtio_mem[("plug", "ack")].samples == [12.5] and s.end["dropped"] == 0


@pytest.mark.parametrize("content,message", [
    (None, "no such file"),
    ("", "empty"),
    ("\n\n", "empty"),
    (json.dumps(START) + "\nthis is not json\n" + json.dumps(START) + "\n", ": line 2 is not"),
    (json.dumps(START) + "\n[1, 2]\n" + json.dumps(START) + "\n", ": line 2 is not"),
    (json.dumps(START) + '\n{"t": "soon", "ev": "x"}\n' + json.dumps(START) + "\n", ": line 2 lacks a numeric 't'"),
    ('{"t": 1.0, "ev": "memslot.add"}\n', "first event is not trace-start"),
    ("name,value\nfoo,1\n", "line 1 is not JSON"),
    (b"\xff\xfe\x00binary", "not a text file"),
])
def test_bad_files_give_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture, content, message) -> None:
    path = tmp_path / "bad.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    code, out, err = run_cli(capsys, path)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("pyvmm: error: ") and message in err


def test_a_directory_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(capsys, tmp_path)
    assert code == 2 and "is a directory" in err and err.count("\n") == 1


def test_an_unreadable_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    locked = write_trace(tmp_path / "locked.jsonl", [])
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root reads anything: nothing to check then
        pytest.skip("running as root: mode 000 does not stop reads")
    code, _, err = run_cli(capsys, locked)
    assert code == 2 and "cannot read" in err and err.count("\n") == 1


def test_trace_without_an_action_exits_2(capsys: pytest.CaptureFixture) -> None:
    assert main(["trace"]) == 2
    assert "summary FILE" in capsys.readouterr().err
