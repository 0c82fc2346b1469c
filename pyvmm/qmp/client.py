"""A small synchronous QMP client for pyvmm's Python API (stdlib only).

``with QmpClient(path) as qmp: qmp.execute("query-status")``.  A reader
thread routes replies to the waiting `execute` call by id and queues events
for `events()` / `wait_event()`, so the client can be shared by threads.
Error replies raise `QmpError(error_class, desc)`.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import socket
import threading
import time
from typing import Any

log = logging.getLogger("pyvmm.qmp.client")

DEFAULT_TIMEOUT_S = 10.0
MAX_LINE_BYTES = 64 << 20  # a reply larger than this is a broken server
MAX_QUEUED_EVENTS = 10_000  # oldest events are dropped beyond this
RECV_CHUNK = 64 << 10
ID_PREFIX = "pyvmm-"


class QmpError(Exception):
    """An error reply: ``error_class`` ("GenericError", ...) and ``desc``."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(f"{error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


class QmpConnectionError(ConnectionError):
    """The connection closed, or the peer does not speak QMP."""


class _Pending:
    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.reply: dict[str, Any] | None = None


class QmpClient:
    """Connect, read the greeting and (by default) negotiate capabilities."""

    def __init__(self, path: str, *, timeout: float = DEFAULT_TIMEOUT_S, negotiate: bool = True) -> None:
        self.path = path
        self.timeout = timeout
        self.greeting: dict[str, Any] | None = None
        self.dropped_events = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError:
            self._sock.close()
            raise
        self._sock.settimeout(None)  # the reader thread blocks; close() wakes it
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._events_changed = threading.Condition(self._lock)
        self._events: collections.deque[dict[str, Any]] = collections.deque()
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count(1)
        self._greeted = threading.Event()
        self._closed = False
        self._reader = threading.Thread(target=self._read_loop, name="qmp-client-reader", daemon=True)
        self._reader.start()
        try:
            if not self._greeted.wait(timeout):
                raise QmpConnectionError(f"no QMP greeting from {path} within {timeout} s")
            if self.greeting is None:
                raise QmpConnectionError(f"{path} closed before sending a QMP greeting")
            if negotiate:
                self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    # -- commands -------------------------------------------------------------

    def execute(self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        """Run `command`; its "return" value, or QmpError for an error reply."""
        request_id = f"{ID_PREFIX}{next(self._ids)}"
        request: dict[str, Any] = {"execute": command, "id": request_id}
        if arguments is not None:
            request["arguments"] = arguments
        pending = _Pending()
        with self._lock:
            if self._closed:
                raise QmpConnectionError("QMP connection is closed")
            self._pending[request_id] = pending
        try:
            data = (json.dumps(request) + "\n").encode("utf-8")
            try:
                with self._send_lock:
                    self._sock.sendall(data)
            except OSError as exc:
                raise QmpConnectionError(f"QMP connection failed: {exc}") from exc
            if not pending.done.wait(self.timeout if timeout is None else timeout):
                raise TimeoutError(f"no reply to {command!r} within the timeout")
        finally:
            with self._lock:
                self._pending.pop(request_id, None)
        reply = pending.reply
        if reply is None:
            raise QmpConnectionError(f"QMP connection closed while waiting for {command!r}")
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            raise QmpError(str(error.get("class", "GenericError")), str(error.get("desc", "")))
        return reply.get("return")

    def hmp(self, command_line: str) -> str:
        """Run a human-monitor command and return its text output."""
        return self.execute("human-monitor-command", {"command-line": command_line})

    # -- events ---------------------------------------------------------------

    def events(self, clear: bool = True) -> list[dict[str, Any]]:
        """Events received so far, oldest first; `clear` empties the queue."""
        with self._lock:
            events = list(self._events)
            if clear:
                self._events.clear()
        return events

    def wait_event(self, name: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Remove and return the first queued event called `name` (any event
        if None), waiting up to `timeout` seconds; TimeoutError if none."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._events_changed:
            while True:
                for event in self._events:
                    if name is None or event.get("event") == name:
                        self._events.remove(event)
                        return event
                if self._closed:
                    raise QmpConnectionError(f"QMP connection closed while waiting for event {name!r}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no {name or 'QMP'} event within the timeout")
                self._events_changed.wait(remaining)

    # -- lifetime -------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the connection; blocked callers get QmpConnectionError."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        if self._reader.is_alive() and self._reader is not threading.current_thread():
            self._reader.join(DEFAULT_TIMEOUT_S)
        self._mark_closed()

    def __enter__(self) -> "QmpClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reader thread --------------------------------------------------------

    def _mark_closed(self) -> None:
        with self._lock:
            self._closed = True
            pending = list(self._pending.values())
            self._events_changed.notify_all()
        for waiter in pending:
            waiter.done.set()  # reply stays None: connection closed
        self._greeted.set()

    def _read_loop(self) -> None:
        buffer = bytearray()
        try:
            while True:
                chunk = self._sock.recv(RECV_CHUNK)
                if not chunk:
                    break
                buffer += chunk
                while True:
                    newline = buffer.find(b"\n")
                    if newline < 0:
                        break
                    line = bytes(buffer[:newline])
                    del buffer[: newline + 1]
                    if line.strip():
                        self._dispatch(line)
                if len(buffer) > MAX_LINE_BYTES:
                    log.error("QMP server sent a line over %d bytes; closing", MAX_LINE_BYTES)
                    break
        except OSError:
            pass  # closed under us
        finally:
            self._mark_closed()

    def _dispatch(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            log.warning("QMP server sent non-JSON: %r", line[:200])
            return
        if not isinstance(message, dict):
            log.warning("QMP server sent a non-object: %r", line[:200])
            return
        if "QMP" in message and self.greeting is None:
            self.greeting = message
            self._greeted.set()
            return
        if "event" in message:
            with self._lock:
                if len(self._events) >= MAX_QUEUED_EVENTS:
                    self._events.popleft()
                    self.dropped_events += 1
                self._events.append(message)
                self._events_changed.notify_all()
            return
        request_id = message.get("id")
        with self._lock:
            pending = self._pending.get(request_id) if isinstance(request_id, str) else None
        if pending is None:
            log.warning("QMP reply with unknown id dropped: %r", line[:200])
            return
        pending.reply = message
        pending.done.set()
