"""The device event loop: one thread that waits (epoll) on eventfds and runs their callbacks.

Queue notifications arrive here through ioeventfds, so a guest kick costs KVM an eventfd
signal instead of a Python exit on the vCPU thread. By default the loop reads (drains) an
eventfd before running its callback, so several kicks that arrive together run the callback
once: callbacks must process everything pending (virtqueues do). A callback that raises is
logged (once per fd with a traceback) and counted; the loop keeps running.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections import Counter
from typing import Callable

log = logging.getLogger(__name__)

_EPOLL_EVENTS = select.EPOLLIN


class EventLoop:
    def __init__(self, name: str = "pyvmm-events") -> None:
        self.name = name
        self._epoll = select.epoll()
        # A private eventfd that wakes the loop for stop().
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, _EPOLL_EVENTS)
        self._lock = threading.Lock()
        self._callbacks: dict[int, tuple[Callable[[], None], bool]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.dispatched = 0
        self.errors: Counter[int] = Counter()  # per fd

    # --- registration -------------------------------------------------------------------
    def add(self, fd: int, callback: Callable[[], None], drain: bool = True) -> None:
        """Run `callback()` on the loop thread whenever `fd` is readable.

        drain=True: `fd` is an eventfd and the loop reads its counter first. With drain=False
        the callback must consume the readiness itself, or it is called again at once.
        """
        with self._lock:
            if fd in self._callbacks:
                raise ValueError(f"{self.name}: fd {fd} is already registered")
            self._callbacks[fd] = (callback, drain)
            try:
                self._epoll.register(fd, _EPOLL_EVENTS)
            except OSError:
                del self._callbacks[fd]
                raise

    def remove(self, fd: int) -> None:
        """Stop watching `fd` (call before closing it). Unknown fds are ignored."""
        with self._lock:
            if self._callbacks.pop(fd, None) is None:
                return
            try:
                self._epoll.unregister(fd)
            except OSError:  # already closed: epoll dropped it by itself
                pass

    # --- lifetime -----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (a callback that is running finishes first)."""
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        os.eventfd_write(self._wake_fd, 1)
        if thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("%s: loop thread did not stop within %.1f s", self.name, timeout)
                return
        self._thread = None

    def close(self) -> None:
        """Stop and release the epoll and wake fds (registered fds belong to their owners)."""
        self.stop()
        self._epoll.close()
        os.close(self._wake_fd)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict:
        with self._lock:
            watched = len(self._callbacks)
        return {"running": self.running, "watched-fds": watched, "dispatched": self.dispatched,
                "callback-errors": sum(self.errors.values())}

    # --- the loop -----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            try:
                events = self._epoll.poll()
            except OSError as e:  # the epoll fd closed under us: nothing left to serve
                log.error("%s: epoll failed: %s", self.name, e)
                return
            for fd, _ in events:
                if fd == self._wake_fd:
                    self._drain(fd)
                    continue
                with self._lock:
                    entry = self._callbacks.get(fd)
                if entry is None:  # removed while this batch was pending
                    continue
                callback, drain = entry
                if drain and not self._drain_watched(fd):
                    continue
                self.dispatched += 1
                try:
                    callback()
                except Exception:
                    self.errors[fd] += 1
                    if self.errors[fd] == 1:
                        log.exception("%s: callback for fd %d raised (logged once per fd)", self.name, fd)

    @staticmethod
    def _drain(fd: int) -> bool:
        """Reset an eventfd's counter; False if there was nothing to read."""
        try:
            os.eventfd_read(fd)
            return True
        except (BlockingIOError, InterruptedError):
            return False

    def _drain_watched(self, fd: int) -> bool:
        try:
            return self._drain(fd)
        except OSError as e:
            # Not an eventfd, or broken: it would stay readable and spin the loop, so drop it.
            self.errors[fd] += 1
            log.error("%s: cannot read eventfd %d (%s); no longer watching it", self.name, fd, e)
            self.remove(fd)
            return False
