"""Host-side facts about a VM process's memory: how much of a guest region is resident."""

from __future__ import annotations

KIB = 1024


def region_rss(pid: int, host_lo: int, host_hi: int) -> int:
    """Resident bytes of process `pid`'s mappings overlapping [host_lo, host_hi), from smaps.

    A mapping that only partly overlaps the range counts whole.
    """
    total, inside = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0] if line.strip() else ""
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo < host_hi and hi > host_lo
            elif inside and head == "Rss:":
                total += int(line.split()[1]) * KIB
    return total
