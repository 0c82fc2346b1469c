"""The merging page-range set of the hv-balloon device, against a naive set of pages."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.hyperv.page_ranges import PageRangeError, PageRanges


def test_adds_merge_with_both_neighbours() -> None:
    r = PageRanges()
    r.add(0, 10)
    r.add(20, 10)
    assert len(r) == 2
    r.add(10, 10)
    assert list(r) == [(0, 30)] and r.pages == 30


def test_remove_splits_and_refuses_absent_pages() -> None:
    r = PageRanges()
    r.add(100, 50)
    r.remove(110, 5)
    assert list(r) == [(100, 10), (115, 35)]
    with pytest.raises(PageRangeError):
        r.remove(108, 5)  # 110..112 already gone
    with pytest.raises(PageRangeError):
        r.add(140, 20)    # 140..149 present: a double balloon
    assert list(r) == [(100, 10), (115, 35)] and r.pages == 45


@pytest.mark.parametrize("start,count", [(-1, 1), (0, 0), (5, -3)])
def test_bad_ranges_are_refused(start: int, count: int) -> None:
    with pytest.raises(PageRangeError):
        PageRanges().add(start, count)


def test_take_returns_highest_pages_in_chunks() -> None:
    r = PageRanges()
    r.add(0, 10)
    r.add(100, 10)
    assert r.take(15, chunk=4) == [(106, 4), (102, 4), (100, 2), (6, 4), (5, 1)]
    assert list(r) == [(0, 5)] and r.pages == 5


def test_a_terabyte_in_big_runs_is_a_few_ranges() -> None:
    r = PageRanges()
    pages_per_gib = (1 << 30) >> 12
    for gib in range(1024):  # 1 TiB, ballooned 1 GiB at a time, in order
        r.add(gib * pages_per_gib, pages_per_gib)
    assert len(r) == 1 and r.pages == 1024 * pages_per_gib


ops = st.lists(st.tuples(st.sampled_from(["add", "remove", "take"]), st.integers(0, 200), st.integers(-2, 40)),
               max_size=80)


@settings(max_examples=300)
@given(ops)
def test_matches_a_naive_set_of_pages(steps) -> None:
    r, naive = PageRanges(), set()
    for op, start, count in steps:
        span = set(range(start, start + count))
        if op == "take":
            taken = r.take(max(count, 0), chunk=7)
            pages = {p for s, n in taken for p in range(s, s + n)}
            assert pages <= naive and len(pages) == min(max(count, 0), len(naive))
            assert all(0 < n <= 7 for _, n in taken)
            naive -= pages
        elif count <= 0:
            with pytest.raises(PageRangeError):
                getattr(r, op)(start, count)
        elif op == "add":
            if span & naive:
                with pytest.raises(PageRangeError):
                    r.add(start, count)
            else:
                r.add(start, count)
                naive |= span
        else:
            if span <= naive:
                r.remove(start, count)
                naive -= span
            else:
                with pytest.raises(PageRangeError):
                    r.remove(start, count)
        ranges = list(r)
        assert {p for s, n in ranges for p in range(s, s + n)} == naive
        assert r.pages == len(naive)
        # Disjoint, sorted and merged: no two ranges touch.
        assert all(s1 + n1 < s2 for (s1, n1), (s2, _) in zip(ranges, ranges[1:]))
