"""QMP event rate limits: first of a burst at once, the newest at the end of the period."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pyvmm.qmp.event_throttle import EventThrottle


class FakeTimers:
    def __init__(self) -> None:
        self.now = 0.0
        self.due: list[tuple[float, object]] = []

    def schedule(self, delay: float, fn) -> None:
        self.due.append((self.now + delay, fn))

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while True:
            ready = sorted((t, i) for i, (t, _) in enumerate(self.due) if t <= end)
            if not ready:
                break
            t, i = ready[0]
            self.now = t
            _, fn = self.due.pop(i)
            fn()
        self.now = end


def make():
    sent: list[object] = []
    timers = FakeTimers()
    return EventThrottle(send=sent.append, schedule=timers.schedule), sent, timers


def size_change(path: str, size: int) -> tuple[str, dict, tuple]:
    data = {"id": path, "size": size, "qom-path": path}
    return "MEMORY_DEVICE_SIZE_CHANGE", data, (path, size)


def test_unlimited_events_pass_straight_through() -> None:
    throttle, sent, _ = make()
    for i in range(5):
        throttle.offer("RESET", {"guest": True}, i)
    assert sent == [0, 1, 2, 3, 4]


def test_burst_sends_first_at_once_and_newest_after_the_period() -> None:
    throttle, sent, timers = make()
    for size in (1, 2, 3, 4):
        throttle.offer(*size_change("/machine/peripheral/vm0", size))
    assert sent == [("/machine/peripheral/vm0", 1)]
    timers.advance(0.99)
    assert len(sent) == 1
    timers.advance(0.02)
    assert sent[-1] == ("/machine/peripheral/vm0", 4)
    assert throttle.delayed == 3
    timers.advance(5)
    assert len(sent) == 2  # nothing more was pending


def test_devices_are_limited_independently() -> None:
    throttle, sent, _ = make()
    throttle.offer(*size_change("/machine/peripheral/vm0", 1))
    throttle.offer(*size_change("/machine/peripheral/vm1", 1))
    assert len(sent) == 2


def test_quiet_period_lets_the_next_event_through_at_once() -> None:
    throttle, sent, timers = make()
    throttle.offer(*size_change("a", 1))
    timers.advance(1.5)  # window closed with nothing pending
    throttle.offer(*size_change("a", 2))
    assert sent == [("a", 1), ("a", 2)]


@given(st.lists(st.tuples(st.floats(0, 3), st.sampled_from(["a", "b"])), max_size=40))
def test_last_event_per_device_always_arrives_and_rate_holds(steps) -> None:
    throttle, sent, timers = make()
    times: list[tuple[float, str]] = []
    throttle.send = lambda payload: (sent.append(payload), times.append((timers.now, payload[0])))
    last: dict[str, int] = {}
    for n, (gap, dev) in enumerate(steps):
        timers.advance(gap)
        throttle.offer(*size_change(dev, n))
        last[dev] = n
    timers.advance(10)
    for dev, n in last.items():
        assert [p for p in sent if p[0] == dev][-1] == (dev, n)
    for dev in ("a", "b"):
        stamps = [t for t, d in times if d == dev]
        assert all(b - a >= 1.0 - 1e-9 for a, b in zip(stamps, stamps[1:]))
