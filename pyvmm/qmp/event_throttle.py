"""Rate limits for chatty QMP events, as QEMU's monitor applies them.

An event type with a limit is sent at once when none of its kind (per key, such as the
device's qom-path) went out in the last period. Within the period only the newest one is
kept, and it is sent when the period ends, which starts a new period. So a client sees the
first and the last of a burst, never a flood, and never misses the final state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

# QEMU's rates (monitor/monitor.c): one per second per device for the size/balloon reports.
EVENT_PERIODS_S: dict[str, tuple[float, str | None]] = {
    "MEMORY_DEVICE_SIZE_CHANGE": (1.0, "qom-path"),
    "BALLOON_CHANGE": (1.0, None),
    "HV_BALLOON_STATUS_REPORT": (1.0, None),
}

Schedule = Callable[[float, Callable[[], None]], Any]


@dataclass
class _Window:
    pending: Any = None
    has_pending: bool = False


@dataclass
class EventThrottle:
    """Call `throttle.offer(name, data, payload)`; `send(payload)` runs now or later.

    `schedule(delay, fn)` runs `fn` after `delay` seconds on the same thread as `offer`
    (the server's event loop: `loop.call_later`), so no locking is needed.
    """
    send: Callable[[Any], None]
    schedule: Schedule
    periods: dict[str, tuple[float, str | None]] = field(default_factory=lambda: dict(EVENT_PERIODS_S))
    delayed: int = 0   # events held back and later replaced or sent

    def __post_init__(self) -> None:
        self._windows: dict[tuple[str, Any], _Window] = {}

    def offer(self, name: str, data: dict | None, payload: Any) -> None:
        rule = self.periods.get(name)
        if rule is None:
            self.send(payload)
            return
        period, key_field = rule
        key = (name, (data or {}).get(key_field) if key_field else None)
        window = self._windows.get(key)
        if window is None:
            self.send(payload)
            self._windows[key] = _Window()
            self.schedule(period, lambda: self._window_ends(key, period))
        else:
            self.delayed += 1
            window.pending, window.has_pending = payload, True

    def _window_ends(self, key: tuple[str, Any], period: float) -> None:
        window = self._windows[key]
        if window.has_pending:
            self.send(window.pending)
            window.pending, window.has_pending = None, False
            self.schedule(period, lambda: self._window_ends(key, period))
        else:
            del self._windows[key]
