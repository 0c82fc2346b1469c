"""Reading pyvmm trace files (docs/trace-format.md): one validated event at a time.

Shared by `pyvmm trace summary` and `pyvmm plot`. A line that is not an event means the file
is not a trace (TraceError, one line), except the last one: a VMM killed mid-write leaves half
a line, which is dropped and reported as a truncated trace.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Iterable

TRACE_VERSION = 1


class TraceError(Exception):
    """The file cannot be read as a trace (one-line message)."""


def _check(obj: object, number: int) -> dict:
    if not isinstance(obj, dict):
        raise TraceError(f"line {number} is not a JSON object")
    t = obj.get("t")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) \
            or not isinstance(obj.get("ev"), str):
        raise TraceError(f"line {number} lacks a numeric 't' or a string 'ev'")
    return obj


def read_lines(lines: Iterable[str], on_event: Callable[[dict, int], None]) -> bool:
    """Pass each event of a trace's lines to `on_event(event, line number)`; returns whether
    the last line was cut off. TraceError if it is not a trace."""
    pending_error: str | None = None
    seen = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if pending_error is not None:
            raise TraceError(pending_error)
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            pending_error = f"line {number} is not JSON"
            continue
        event = _check(obj, number)
        if not seen:
            if event["ev"] != "trace-start":
                raise TraceError("not a pyvmm trace (the first event is not trace-start)")
            # New events and fields come without a version change (readers ignore them);
            # a new version means a meaning changed, which this reader cannot know.
            version = event.get("version")
            if isinstance(version, bool) or version != TRACE_VERSION:
                raise TraceError(f"unsupported trace version {version!r} (this pyvmm reads version {TRACE_VERSION})")
        seen += 1
        on_event(event, number)
    if not seen:
        raise TraceError(pending_error or "empty: the file holds no trace events")
    return pending_error is not None


def read_trace(path: str | Path, on_event: Callable[[dict, int], None]) -> bool:
    """`read_lines` over a file; every error (missing, unreadable, not a trace) is a
    TraceError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return read_lines(f, on_event)
    except FileNotFoundError:
        raise TraceError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise TraceError(f"{path}: is a directory") from None
    except UnicodeDecodeError:
        raise TraceError(f"{path}: not a text file") from None
    except OSError as e:
        raise TraceError(f"{path}: {e.strerror or e}") from None
    except TraceError as e:
        raise TraceError(f"{path}: {e}") from None
