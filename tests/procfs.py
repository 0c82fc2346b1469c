"""Read this process's memory facts from /proc, for tests that check host-side effects."""

from __future__ import annotations


def maps_perms(addr: int) -> str:
    """The permission string /proc/self/maps shows for the mapping containing `addr`."""
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= addr < hi:
                return perms
    raise AssertionError(f"{addr:#x} is not mapped")
