"""Calls the VMBus host makes *after* releasing its lock, in the order it decided on them.

The bus decides under its lock what to tell the outside world (messages and event signals
to the SynIC, connection-id registrations, device callbacks) and queues those calls here; the
thread that made the decision runs the queue once the lock is released. Then no foreign code
runs under the bus lock, so neither a device calling `channel.send()` from its callback nor a
partition that holds its own lock while calling the bus can deadlock with it.

Order: calls run strictly first-in first-out, one at a time. If another thread is already
running the queue, `run()` returns at once and that thread runs the new calls too (it looks
at the queue again after letting go of it), so a caller never waits for another's callbacks.
A call that raises is logged and counted; the rest still run.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any, Callable

log = logging.getLogger(__name__)


class DeferredCalls:
    def __init__(self) -> None:
        self._queue: deque[tuple[Callable[..., Any], tuple[Any, ...], str]] = deque()
        self._runner = threading.RLock()    # re-entrant: a callback may send, which runs the queue
        self.failures = 0

    def add(self, fn: Callable[..., Any], *args: Any, what: str = "") -> None:
        """Queue `fn(*args)`; `what` names it in the log if it raises."""
        self._queue.append((fn, args, what or getattr(fn, "__qualname__", repr(fn))))

    def __len__(self) -> int:
        return len(self._queue)

    def run(self) -> None:
        """Run queued calls until the queue is empty, unless another thread is doing it."""
        while self._queue:
            if not self._runner.acquire(blocking=False):
                return
            try:
                while True:
                    try:
                        fn, args, what = self._queue.popleft()
                    except IndexError:
                        break
                    try:
                        fn(*args)
                    except Exception:
                        self.failures += 1
                        log.exception("vmbus: deferred call %s failed", what)
            finally:
                self._runner.release()
