"""Bounded waits that fail with what was expected and what was last seen, never hang.

Used by the scenarios' context and by the pytest plugin's helpers. Every figure here comes
from the PVM host this was written on, where guest kernel code is interpreted: plugging
128 MiB takes about 3 s, hot-adding 128 MiB over hv-balloon about 20 s, a boot 1 to 3.5
minutes. The timeouts are several times those figures, and `scale` stretches them for a
slower machine.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

from pyvmm.check.outcomes import CheckFailed, GuestGone

T = TypeVar("T")
MiB = 1 << 20

BOOT_TIMEOUT_S = 420.0
DRIVER_BIND_TIMEOUT_S = 60.0
# virtio-mem: fixed part (request round trips, a memory block's memmap) + per 128 MiB
PLUG_BASE_S = 60.0
PLUG_PER_128M_S = 15.0
# hv-balloon: hot-add onlines whole memory blocks with interpreted code
HOT_ADD_BASE_S = 90.0
HOT_ADD_PER_128M_S = 60.0
BALLOON_BASE_S = 60.0
BALLOON_PER_128M_S = 20.0
# Linux's hv_balloon posts its first status report 45 of its seconds after it binds, then
# every second; on a PVM host the first one came about 80 s after the agent answered.
STATUS_REPORT_TIMEOUT_S = 240.0
POLL_INTERVAL_S = 0.5


def size_timeout(change: int, base: float, per_128m: float, scale: float = 1.0) -> float:
    """Seconds allowed for the guest to move `change` bytes of memory."""
    return scale * (base + per_128m * abs(change) / (128 * MiB))


def mib(size: int) -> str:
    """A byte count for messages: '384 MiB', or '6 KiB' when not a whole MiB."""
    if size % MiB == 0:
        return f"{size // MiB} MiB"
    return f"{size / 1024:g} KiB"


def wait_until(predicate: Callable[[], T], timeout: float, expected: str,
               seen: Callable[[], str] | None = None, alive: Callable[[], int | None] | None = None,
               interval: float = POLL_INTERVAL_S) -> T:
    """Poll `predicate` until it is truthy and return its value.

    After `timeout` seconds raise CheckFailed("expected <expected> within N s; saw <seen()>").
    `alive()` returns the VM's exit status once it has exited (then GuestGone at once).
    """
    start = time.monotonic()
    deadline = start + timeout
    while True:
        value = predicate()
        if value:
            return value
        if alive is not None:
            code = alive()
            if code is not None:
                raise GuestGone(f"the VM exited (status {code}) while waiting for {expected}")
        if time.monotonic() >= deadline:
            saw = ""
            if seen is not None:
                try:
                    saw = f"; saw {seen()}"
                except Exception as e:  # the observation itself failed: say so, keep the verdict
                    saw = f"; could not observe the state ({type(e).__name__}: {e})"
            raise CheckFailed(f"expected {expected} within {timeout:.3g} s{saw}")
        time.sleep(interval)
