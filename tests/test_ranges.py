"""RangeSet: the bookkeeping of which bytes of a partial download are on disk."""

from __future__ import annotations

from modelfs.ranges import RangeSet


def test_add_merges_overlapping_and_touching_ranges():
    ranges = RangeSet([(10, 20), (30, 40)])
    ranges.add(20, 30)
    assert list(ranges) == [(10, 40)]
    ranges.add(0, 5)
    ranges.add(50, 60)
    ranges.add(55, 70)
    assert list(ranges) == [(0, 5), (10, 40), (50, 70)]
    ranges.add(3, 52)
    assert list(ranges) == [(0, 70)] and ranges.size == 70


def test_covers_gaps_and_prefix():
    ranges = RangeSet([(0, 10), (20, 30)])
    assert ranges.covers(0, 10) and ranges.covers(22, 25) and ranges.covers(5, 5)
    assert not ranges.covers(5, 15) and not ranges.covers(10, 11)
    assert ranges.gaps(0, 40) == [(10, 20), (30, 40)]
    assert ranges.gaps(25, 28) == [] and ranges.gaps(5, 22) == [(10, 20)]
    assert RangeSet().gaps(0, 8) == [(0, 8)]
    assert ranges.prefix() == 10 and RangeSet([(5, 9)]).prefix() == 0
