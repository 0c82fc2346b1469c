"""Read a process's memory facts from /proc, for tests that check host-side effects."""

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


def region_rss(pid: int, host_lo: int, host_hi: int) -> int:
    """Resident bytes of process `pid`'s mappings inside [host_lo, host_hi) (from smaps)."""
    total, inside = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo < host_hi and hi > host_lo
            elif inside and head == "Rss:":
                total += int(line.split()[1]) * 1024
    return total
