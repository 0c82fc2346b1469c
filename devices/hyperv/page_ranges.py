"""A set of guest page frames kept as merged, disjoint ranges (start, count).

The hv-balloon device tracks ballooned and hot-added pages in these. Adding a range merges
it with its neighbours and removing one splits what it cuts, so a guest that balloons a
terabyte in a few big runs costs a few ranges of metadata, not a bit per page. Ranges are
kept in a sorted dict keyed by their first page, so lookups are logarithmic.
"""

from __future__ import annotations

from typing import Iterator

from sortedcontainers import SortedDict


class PageRangeError(ValueError):
    """An add that overlaps pages already in the set, or a remove of pages not in it."""


class PageRanges:
    def __init__(self) -> None:
        self._ranges: SortedDict[int, int] = SortedDict()  # first page -> end page (exclusive)
        self.pages = 0

    def __len__(self) -> int:
        """Number of disjoint ranges (the metadata size), not pages."""
        return len(self._ranges)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """(start, count) of each range, in address order."""
        for start, end in self._ranges.items():
            yield start, end - start

    def __contains__(self, page: int) -> bool:
        return self.covers(page, 1)

    def _check(self, start: int, count: int) -> int:
        if start < 0 or count <= 0:
            raise PageRangeError(f"bad page range start={start} count={count}")
        return start + count

    def _before(self, page: int) -> tuple[int, int] | None:
        """The range starting at or before `page`, if any."""
        i = self._ranges.bisect_right(page) - 1
        if i < 0:
            return None
        start = self._ranges.keys()[i]
        return start, self._ranges[start]

    def overlaps(self, start: int, count: int) -> bool:
        end = self._check(start, count)
        prev = self._before(start)
        if prev is not None and prev[1] > start:
            return True
        i = self._ranges.bisect_left(start)
        return i < len(self._ranges) and self._ranges.keys()[i] < end

    def covers(self, start: int, count: int) -> bool:
        end = self._check(start, count)
        prev = self._before(start)
        return prev is not None and prev[1] >= end

    def add(self, start: int, count: int) -> None:
        """Add pages that are all absent; merges with touching neighbours."""
        end = self._check(start, count)
        if self.overlaps(start, count):
            raise PageRangeError(f"pages {start:#x}+{count:#x} overlap pages already in the set")
        prev = self._before(start)
        if prev is not None and prev[1] == start:
            start = prev[0]
        following = self._ranges.get(end)
        if following is not None:
            del self._ranges[end]
            end = following
        self._ranges[start] = end
        self.pages += count

    def remove(self, start: int, count: int) -> None:
        """Remove pages that are all present; splits the range they sit in."""
        end = self._check(start, count)
        prev = self._before(start)
        if prev is None or prev[1] < end:
            raise PageRangeError(f"pages {start:#x}+{count:#x} are not all in the set")
        first, last = prev
        del self._ranges[first]
        if first < start:
            self._ranges[first] = start
        if end < last:
            self._ranges[end] = last
        self.pages -= count

    def take(self, count: int, chunk: int | None = None) -> list[tuple[int, int]]:
        """Remove up to `count` pages, highest addresses first, as (start, count) ranges
        of at most `chunk` pages each; returns them."""
        out: list[tuple[int, int]] = []
        while count > 0 and self._ranges:
            first, last = self._ranges.peekitem(-1)
            n = min(count, last - first, chunk or count)
            self.remove(last - n, n)
            out.append((last - n, n))
            count -= n
        return out

    def clear(self) -> None:
        self._ranges.clear()
        self.pages = 0
