"""Event tracing: one JSON object per line in a file (the format is docs/trace-format.md).

A traced component holds a tracer and guards every event with one attribute check, so an
untraced run pays only that check:

    if self.tracer.enabled:
        self.tracer.emit("memslot.add", slot=3, gpa=gpa, size=size, owner=owner, us=12.5)

`NULL_TRACER` (enabled is False) is every component's default; `Tracer(path)` writes a file.
Field names are given as Python keywords, and `_` becomes `-` in the file (`nb_blocks` is
written `nb-blocks`), which is the format's spelling.

`emit` is safe from any thread (vCPUs, the virtio event loop, the QMP worker): it stamps the
event with `time.monotonic()` and appends it to a buffer under one lock, so the file's order
is the order of the stamps. Encoding and writing happen on a flusher thread every
FLUSH_INTERVAL_S and on `close`. A write that fails (disk full, file system gone) must not
take the VMM down: the tracer logs it once, stops writing, and counts every event it loses
from then on in `dropped`, as it does when the buffer overflows.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from bisect import bisect_right
from datetime import datetime, timezone
from itertools import accumulate
from typing import Any, Callable

log = logging.getLogger("pyvmm.trace")

TRACE_FORMAT_VERSION = 1
# The format promises events reach the file within a second; half that leaves slack for a
# busy host.
FLUSH_INTERVAL_S = 0.5
# Events waiting for the flusher. A stalled disk must not grow the VMM without bound: beyond
# this the newest events are dropped (and counted).
MAX_PENDING_EVENTS = 200_000
CLOSE_JOIN_TIMEOUT_S = 5.0
FILE_MODE = 0o644


class NullTracer:
    """Tracing off: `enabled` is False, so call sites never build an event."""

    enabled = False
    dropped = 0

    def emit(self, ev: str, **fields: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def stats(self) -> dict:
        return {"enabled": False}


NULL_TRACER = NullTracer()


def _encode(t: float, ev: str, fields: dict[str, Any]) -> str:
    record: dict[str, Any] = {"t": round(t, 6), "ev": ev}
    for key, value in fields.items():
        record[key.replace("_", "-")] = value
    # default=str: an odd value (a Path, an enum) becomes text instead of losing the event.
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=str) + "\n"


def _write_all(fd: int, data: bytes) -> int:
    """Write all of `data`; on an error, raise it with `.written` = bytes that got out."""
    done = 0
    view = memoryview(data)
    while done < len(data):
        try:
            n = os.write(fd, view[done:])
        except OSError as e:
            e.written = done  # type: ignore[attr-defined]
            raise
        done += n
    return done


class Tracer:
    """A JSON Lines trace file; see the module docstring. `close()` writes `trace-end`."""

    enabled = True

    def __init__(self, path: str | os.PathLike[str], *, flush_interval: float = FLUSH_INTERVAL_S,
                 max_pending: int = MAX_PENDING_EVENTS, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = os.fspath(path)
        # OSError (no such directory, permission) goes to the caller: a bad --trace is a
        # user error, reported before the VM starts.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        self._clock = clock
        self._max_pending = max_pending
        self._lock = threading.Lock()        # the buffer and the counters
        self._write_lock = threading.Lock()  # one writer at a time, so batches stay in order
        self._pending: list[tuple[float, str, dict[str, Any]]] = []
        self._closed = False
        self._broken = False
        self._warned_full = False
        self.dropped = 0
        self.written = 0
        wall = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        self.emit("trace-start", version=TRACE_FORMAT_VERSION, pid=os.getpid(), wall=wall)
        self.flush()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flush_loop, args=(flush_interval,),
                                        name="trace-flush", daemon=True)
        self._thread.start()

    def emit(self, ev: str, **fields: Any) -> None:
        """Record event `ev` now; any thread. Never raises, never blocks on the disk."""
        warn = False
        with self._lock:
            if self._closed:
                return
            if self._broken or len(self._pending) >= self._max_pending:
                self.dropped += 1
                if not self._broken and not self._warned_full:
                    self._warned_full = warn = True
            else:
                self._pending.append((self._clock(), ev, fields))
        if warn:
            log.warning("trace %s: %d events wait for the disk; newer ones are dropped (and counted)",
                        self.path, self._max_pending)

    def flush(self) -> None:
        """Write what is buffered; any thread."""
        with self._write_lock:
            with self._lock:
                batch, self._pending = self._pending, []
                broken = self._broken
            if not batch:
                return
            if broken:
                with self._lock:
                    self.dropped += len(batch)
                return
            lines = []
            for t, ev, fields in batch:
                try:
                    lines.append(_encode(t, ev, fields).encode())
                except (TypeError, ValueError, RecursionError):
                    log.warning("trace: cannot encode a %s event, dropped", ev)
                    with self._lock:
                        self.dropped += 1
            try:
                _write_all(self._fd, b"".join(lines))
                written, error = len(lines), None
            except OSError as e:
                # Only whole lines count as written; a torn last line is what a reader tolerates.
                written = bisect_right(list(accumulate(len(line) for line in lines)), getattr(e, "written", 0))
                error = e
            with self._lock:
                self.written += written
                if error is not None:
                    self._broken = True
                    self.dropped += len(lines) - written
            if error is not None:
                log.warning("trace %s: cannot write (%s); tracing stops here, lost events are counted",
                            self.path, error.strerror or error)

    def close(self) -> None:
        """Write `trace-end` (with the dropped count) as the last line and close the file."""
        with self._lock:
            if self._closed:
                return
            self._pending.append((self._clock(), "trace-end", {"dropped": self.dropped}))
            self._closed = True
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(CLOSE_JOIN_TIMEOUT_S)
        self.flush()
        try:
            os.close(self._fd)
        except OSError as e:  # e.g. NFS reporting a late write error
            log.warning("trace %s: closing failed: %s", self.path, e.strerror)

    def stats(self) -> dict:
        with self._lock:
            return {"enabled": True, "path": self.path, "written": self.written, "dropped": self.dropped,
                    "pending": len(self._pending), "failed": self._broken}

    def _flush_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.flush()
            except Exception:  # a bug here must not end tracing silently for the rest of the run
                log.exception("trace: flush failed")


# What components hold: a file tracer or the null one.
AnyTracer = Tracer | NullTracer
