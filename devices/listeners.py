"""Calling the control plane's listeners from device code.

Devices report events (size changes, status reports) to callbacks the machine installs. They
run on vCPU or event-loop threads, so a broken listener is logged and counted, never raised
into the device.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable


def notify(listener: Callable[[Any], None] | None, events: Iterable[Any], log: logging.Logger,
           what: str) -> int:
    """Call `listener(event)` for each event; returns how many calls failed (each logged)."""
    if listener is None:
        return 0
    failed = 0
    for event in events:
        try:
            listener(event)
        except Exception:
            failed += 1
            log.exception("%s listener failed", what)
    return failed
