"""Tests for bus dispatch: routing, overlap checks, unclaimed accesses, contained device errors."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus import Bus, BusOverlapError


class Recorder:
    """A device that remembers every access and answers reads with a fixed pattern."""

    def __init__(self, answer: bytes = b"\x11\x22\x33\x44\x55\x66\x77\x88") -> None:
        self.answer = answer
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, size: int) -> bytes:
        self.reads.append((offset, size))
        return self.answer[:size]

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, data))


class Broken:
    def __init__(self) -> None:
        self.calls = 0

    def read(self, offset: int, size: int) -> bytes:
        self.calls += 1
        raise RuntimeError("device bug on read")

    def write(self, offset: int, data: bytes) -> None:
        self.calls += 1
        raise KeyError("device bug on write")


def test_access_goes_to_the_owner_with_a_relative_offset() -> None:
    bus = Bus("pio")
    uart, pm = Recorder(b"\xaa"), Recorder(b"\x05\x06")
    bus.register(0x3F8, 8, uart, "ttyS0")
    bus.register(0x600, 3, pm, "acpi-pm")
    assert bus.read(0x3FD, 1) == b"\xaa"
    bus.write(0x3F8, b"h")
    bus.write(0x602, b"\x01")
    assert bus.read(0x600, 2) == b"\x05\x06"
    assert uart.reads == [(5, 1)] and uart.writes == [(0, b"h")]
    assert pm.writes == [(2, b"\x01")] and pm.reads == [(0, 2)]
    assert bus.stats()["unclaimed-accesses"] == 0


def test_range_edges() -> None:
    bus = Bus("mmio")
    dev = Recorder()
    bus.register(0xD000_0000, 0x1000, dev, "virtio0")
    assert bus.find(0xD000_0000).name == "virtio0"
    assert bus.find(0xD000_0FFF).name == "virtio0"
    assert bus.find(0xCFFF_FFFF) is None
    assert bus.find(0xD000_1000) is None


@pytest.mark.parametrize("base,size", [
    (0x3F8, 8),    # identical
    (0x3F0, 9),    # overlaps the first byte
    (0x3FF, 1),    # the last byte
    (0x3FA, 2),    # inside
    (0x300, 0x200),  # contains it
])
def test_overlap_is_refused(base: int, size: int) -> None:
    bus = Bus("pio")
    bus.register(0x3F8, 8, Recorder(), "ttyS0")
    with pytest.raises(BusOverlapError) as info:
        bus.register(base, size, Recorder(), "intruder")
    assert "intruder" in str(info.value) and "ttyS0" in str(info.value)
    assert [r.name for r in bus.ranges()] == ["ttyS0"]


def test_overlap_with_a_later_neighbour_is_refused() -> None:
    bus = Bus("pio")
    bus.register(0x100, 0x10, Recorder(), "a")
    bus.register(0x200, 0x10, Recorder(), "b")
    bus.register(0x300, 0x10, Recorder(), "c")
    with pytest.raises(BusOverlapError):
        bus.register(0x180, 0x81, Recorder(), "x")   # ends on b's first byte
    with pytest.raises(BusOverlapError):
        bus.register(0x0, 0x1000, Recorder(), "y")   # covers all three
    assert [r.name for r in bus.ranges()] == ["a", "b", "c"]


def test_touching_ranges_are_allowed() -> None:
    bus = Bus("pio")
    bus.register(0x600, 3, Recorder(b"\x01"), "acpi-pm")
    bus.register(0x603, 1, Recorder(b"\x02"), "after")
    bus.register(0x5FF, 1, Recorder(b"\x03"), "before")
    assert [bus.read(p, 1) for p in (0x5FF, 0x600, 0x602, 0x603)] == [b"\x03", b"\x01", b"\x01", b"\x02"]


@pytest.mark.parametrize("base,size", [(0x100, 0), (0x100, -1), (-1, 4)])
def test_bad_ranges_are_refused(base: int, size: int) -> None:
    with pytest.raises(ValueError):
        Bus("pio").register(base, size, Recorder(), "bad")


def test_unclaimed_read_is_all_ones_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    bus = Bus("pio")
    bus.register(0x3F8, 8, Recorder(), "ttyS0")
    with caplog.at_level(logging.DEBUG, logger="pyvmm.bus"):
        assert bus.read(0x80, 1) == b"\xff"
        assert bus.read(0x80, 4) == b"\xff" * 4
        assert bus.read(0x80, 2) == b"\xff" * 2
        bus.write(0x80, b"\x12")
        assert bus.read(0x70, 1) == b"\xff"
    assert bus.unclaimed[0x80] == 4 and bus.unclaimed[0x70] == 1
    assert bus.stats()["unclaimed-accesses"] == 5
    assert bus.stats()["unclaimed-addresses"] == 2
    logged = [r.getMessage() for r in caplog.records if r.name == "pyvmm.bus"]
    assert len(logged) == 2, logged  # once per address, not per access
    assert any("0x80" in m for m in logged) and any("0x70" in m for m in logged)


def test_unclaimed_write_is_dropped_and_counted() -> None:
    bus = Bus("mmio")
    dev = Recorder()
    bus.register(0x1000, 0x10, dev, "dev")
    bus.write(0x2000, b"\x01\x02")
    assert dev.writes == [] and bus.unclaimed[0x2000] == 1


def test_device_exception_is_contained_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    bus = Bus("pio")
    broken, good = Broken(), Recorder(b"\x42")
    bus.register(0x505, 1, broken, "pvpanic")
    bus.register(0x506, 1, good, "good")
    with caplog.at_level(logging.DEBUG, logger="pyvmm.bus"):
        assert bus.read(0x505, 2) == b"\xff\xff"
        bus.write(0x505, b"\x01")
        bus.write(0x505, b"\x01")
    assert broken.calls == 3
    assert bus.stats()["device-errors"] == {"pvpanic": 3}
    assert bus.read(0x506, 1) == b"\x42", "other devices keep working"
    errors = [r for r in caplog.records if r.name == "pyvmm.bus" and r.levelno >= logging.ERROR]
    assert len(errors) == 1, "a failing device is logged once, with its traceback"
    assert errors[0].exc_info is not None and "pvpanic" in errors[0].getMessage()
    assert bus.stats()["unclaimed-accesses"] == 0, "a device error is not an unclaimed access"


def test_short_and_long_device_answers_are_fitted_to_the_access() -> None:
    bus = Bus("pio")
    bus.register(0x10, 4, Recorder(b"\x01"), "short")
    bus.register(0x20, 4, Recorder(b"\x01\x02\x03\x04\x05\x06"), "long")

    class Long:
        def read(self, offset: int, size: int) -> bytes:
            return b"\x09" * (size + 3)

        def write(self, offset: int, data: bytes) -> None:
            pass

    bus.register(0x30, 4, Long(), "too-long")
    assert bus.read(0x10, 4) == b"\x01\xff\xff\xff"
    assert bus.read(0x20, 2) == b"\x01\x02"
    assert bus.read(0x30, 2) == b"\x09\x09"


def test_unregister_frees_the_range() -> None:
    bus = Bus("mmio")
    r = bus.register(0xD000_0000, 0x1000, Recorder(), "virtio0")
    keep = bus.register(0xD000_1000, 0x1000, Recorder(), "virtio1")
    bus.unregister(r)
    assert bus.find(0xD000_0000) is None
    assert bus.find(0xD000_1000) is keep
    assert bus.read(0xD000_0000, 4) == b"\xff" * 4
    again = bus.register(0xD000_0000, 0x1000, Recorder(b"\x07"), "virtio0-new")
    assert bus.read(0xD000_0004, 1) == b"\x07"
    assert [x.name for x in bus.ranges()] == ["virtio0-new", "virtio1"]
    assert again.end == 0xD000_1000


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 0x3F), st.integers(1, 0x10)), max_size=25),
       st.lists(st.integers(0, 0x50), max_size=40))
def test_lookup_matches_a_brute_force_model(requests: list[tuple[int, int]], probes: list[int]) -> None:
    bus = Bus("model")
    owner: dict[int, str] = {}
    for i, (base, size) in enumerate(requests):
        name = f"d{i}"
        clash = any(a in owner for a in range(base, base + size))
        if clash:
            with pytest.raises(BusOverlapError):
                bus.register(base, size, Recorder(), name)
        else:
            bus.register(base, size, Recorder(), name)
            owner.update({a: name for a in range(base, base + size)})
    bases = [r.base for r in bus.ranges()]
    assert bases == sorted(bases)
    for addr in probes:
        r = bus.find(addr)
        assert (r.name if r else None) == owner.get(addr)
