"""`pyvmm trace summary FILE`: counts and latencies from a trace (docs/trace-format.md).

The file is read line by line, so a long trace costs memory only for its latency samples.
A missing, unreadable or garbled file is a user error: one line on stderr, exit status 2.
A last line cut short (a VMM killed mid-write leaves one) is skipped with a note; a bad line
anywhere else means the file is not a trace.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pyvmm.trace_file import TraceError, read_trace

EXIT_OK = 0
EXIT_USAGE = 2


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank q-quantile (0 < q <= 1): the smallest sample with at least q of all
    samples at or below it."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass
class Latencies:
    """A count and the `us` samples of one row."""

    count: int = 0
    samples: list[float] = field(default_factory=list)

    def add(self, us: object) -> None:
        self.count += 1
        if isinstance(us, (int, float)) and not isinstance(us, bool) and math.isfinite(us):
            self.samples.append(float(us))


@dataclass
class Summary:
    header: dict = field(default_factory=dict)   # the trace-start line
    end: dict | None = None                      # the trace-end line, if the VMM exited cleanly
    first_t: float | None = None
    last_t: float | None = None
    events: Counter = field(default_factory=Counter)
    virtio_mem: dict = field(default_factory=lambda: defaultdict(Latencies))   # (type, resp)
    memslots: dict = field(default_factory=lambda: defaultdict(Latencies))     # ev
    vmbus: Counter = field(default_factory=Counter)                            # (dir, type)
    hv_balloon: Counter = field(default_factory=Counter)                       # (dir, type)
    qmp: dict = field(default_factory=lambda: defaultdict(Latencies))          # command
    qmp_errors: Counter = field(default_factory=Counter)                       # command
    unplugged: Counter = field(default_factory=Counter)                        # (device, kind)
    truncated_tail: bool = False

    def add(self, event: dict) -> None:
        ev, t = event["ev"], event["t"]
        self.events[ev] += 1
        self.first_t = t if self.first_t is None else min(self.first_t, t)
        self.last_t = t if self.last_t is None else max(self.last_t, t)
        if ev == "virtio-mem.response":
            self.virtio_mem[(str(event.get("type")), str(event.get("resp")))].add(event.get("us"))
        elif ev in ("memslot.add", "memslot.remove"):
            self.memslots[ev].add(event.get("us"))
        elif ev == "vmbus.message":
            self.vmbus[(str(event.get("dir")), str(event.get("type")))] += 1
        elif ev == "hv-balloon.message":
            self.hv_balloon[(str(event.get("dir")), str(event.get("type")))] += 1
        elif ev == "qmp.command":
            command = str(event.get("command"))
            self.qmp[command].add(event.get("us"))
            if event.get("result") != "ok":
                self.qmp_errors[command] += 1
        elif ev == "unplugged-access":
            self.unplugged[(str(event.get("device")), str(event.get("kind")))] += 1
        elif ev == "trace-start" and not self.header:
            self.header = event
        elif ev == "trace-end":
            self.end = event


# ---------------------------------------------------------------------- reading

def summarize(path: str | Path) -> Summary:
    """Read a trace file; TraceError if it is missing, unreadable or not a trace."""
    summary = Summary()
    summary.truncated_tail = read_trace(path, lambda event, _number: summary.add(event))
    return summary


# ---------------------------------------------------------------------- printing

def _us(value: float) -> str:
    return f"{value:.1f}"


def _table(title: str, columns: list[str], rows: list[list[str]]) -> list[str]:
    """A titled table: the first column left-aligned, the others right-aligned."""
    if not rows:
        return []
    widths = [max(len(r[i]) for r in [columns] + rows) for i in range(len(columns))]
    widths[0] = max(widths[0], len(title))

    def fmt(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = "  ".join(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))
        return f"  {first}  {rest}".rstrip()

    return ["", title] + [fmt(columns)] + [fmt(r) for r in rows]


def _latency_cells(lat: Latencies) -> list[str]:
    if not lat.samples:
        return ["-", "-", "-"]
    return [_us(percentile(lat.samples, 0.50)), _us(percentile(lat.samples, 0.99)), _us(max(lat.samples))]


LATENCY_COLUMNS = ["p50 us", "p99 us", "max us"]


def format_summary(path: str | Path, s: Summary) -> str:
    duration = (s.last_t - s.first_t) if s.first_t is not None and s.last_t is not None else 0.0
    version = s.header.get("version", "?")
    lines = [f"trace {path}: format {version}, pid {s.header.get('pid', '?')}, "
             f"started {s.header.get('wall', '?')}, {duration:.1f} s, {sum(s.events.values())} events"]
    if s.end is not None:
        lines.append(f"clean end, {s.end.get('dropped', 0)} events dropped")
    else:
        lines.append("no trace-end line: the VMM did not exit cleanly (or is still running)")
    if s.truncated_tail:
        lines.append("the last line was cut short and is skipped")

    lines += _table("events", ["event", "count"], [[ev, str(n)] for ev, n in sorted(s.events.items())])
    lines += _table("virtio-mem requests", ["type / response", "count", *LATENCY_COLUMNS],
                    [[f"{kind} {resp}", str(lat.count), *_latency_cells(lat)]
                     for (kind, resp), lat in sorted(s.virtio_mem.items())])
    lines += _table("memslots", ["change", "count", *LATENCY_COLUMNS],
                    [[ev.split(".", 1)[1], str(lat.count), *_latency_cells(lat)]
                     for ev, lat in sorted(s.memslots.items())])
    lines += _table("unplugged-memory accesses", ["device / kind", "count"],
                    [[f"{dev} {kind}", str(n)] for (dev, kind), n in sorted(s.unplugged.items())])
    lines += _table("vmbus messages", ["direction / type", "count"],
                    [[f"{d} {kind}", str(n)] for (d, kind), n in sorted(s.vmbus.items())])
    lines += _table("hv-balloon messages", ["direction / type", "count"],
                    [[f"{d} {kind}", str(n)] for (d, kind), n in sorted(s.hv_balloon.items())])
    lines += _table("qmp commands", ["command", "count", "errors", *LATENCY_COLUMNS],
                    [[cmd, str(lat.count), str(s.qmp_errors[cmd]), *_latency_cells(lat)]
                     for cmd, lat in sorted(s.qmp.items())])
    return "\n".join(lines)


# ---------------------------------------------------------------------- command line

def add_subcommand(sub: argparse._SubParsersAction) -> None:
    """`pyvmm trace summary FILE` on the CLI's subcommand table."""
    trace = sub.add_parser("trace", help="work with a trace written by `pyvmm run --trace FILE`")
    trace.set_defaults(handler=run)
    actions = trace.add_subparsers(dest="trace_command", metavar="ACTION", parser_class=type(trace))
    summary = actions.add_parser("summary", help="counts per event and latencies (p50, p99, max)")
    summary.add_argument("file", type=Path, metavar="FILE", help="a trace file (JSON lines)")


def run(args: argparse.Namespace) -> int:
    if args.trace_command != "summary":
        print("pyvmm: error: trace needs an action: summary FILE", file=sys.stderr)
        return EXIT_USAGE
    try:
        summary = summarize(args.file)
    except TraceError as e:
        print(f"pyvmm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(format_summary(args.file, summary))
    return EXIT_OK
