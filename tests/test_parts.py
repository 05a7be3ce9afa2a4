"""The part scheduler and the stream growth policy (modelfs.parts), pure: which bytes go next, whom a write
wakes, and how many streams run for a given throughput."""

from __future__ import annotations

from modelfs.parts import ALIGN, Growth, Parts
from modelfs.ranges import RangeSet

MB = 1 << 20


def parts(total: int | None, done: list[tuple[int, int]] = (), part_size: int = 4 * MB) -> Parts:  # type: ignore[assignment]
    p = Parts(part_size)
    p.reset(total, RangeSet(done))
    return p


def test_parts_take_the_lowest_missing_bytes_bounded_by_the_part_size():
    p = parts(10 * MB, [(0, MB)])
    first, second, third = p.claim(), p.claim(), p.claim()
    assert [p.span(x) for x in (first, second, third)] == [(MB, 5 * MB), (5 * MB, 9 * MB), (9 * MB, 10 * MB)]
    assert p.claim() is None  # everything is on disk or in flight
    p.release(second)
    assert p.span(p.claim()) == (5 * MB, 9 * MB)  # a released part's bytes are free again
    assert p.in_flight() == [[MB, MB, 5 * MB], [5 * MB, 5 * MB, 9 * MB], [9 * MB, 9 * MB, 10 * MB]]


def test_unknown_size_means_one_stream_from_the_first_missing_byte_to_the_end():
    p = parts(None, [(0, 3 * MB), (5 * MB, 6 * MB)])
    part = p.claim()
    assert p.span(part) == (3 * MB, None)
    assert p.claim() is None
    p.set_total(10 * MB, part, 3 * MB)  # the first 206 told the size: the part becomes bounded
    assert p.span(part) == (3 * MB, 7 * MB)
    assert p.span(p.claim()) == (7 * MB, 10 * MB)  # ...and others may start after it


def test_a_reader_offset_steers_the_next_part_aligned_down():
    p = parts(64 * MB)
    p.claim()  # [0, 4M) in flight
    assert not p.wait(40 * MB + 12345, 40 * MB + 13000)
    assert not p.wait(50 * MB, 51 * MB)
    assert p.span(p.claim()) == (40 * MB, 44 * MB)  # the lowest waiting offset first, aligned to ALIGN
    assert (40 * MB) % ALIGN == 0
    assert p.span(p.claim()) == (50 * MB, 54 * MB)
    assert p.span(p.claim()) == (4 * MB, 8 * MB)  # then the lowest missing bytes again


def test_a_reader_inside_bytes_in_flight_or_on_disk_does_not_steer():
    p = parts(64 * MB, [(8 * MB, 16 * MB)])
    p.claim()  # [0, 4M)
    p.wait(MB, 2 * MB)  # in flight
    p.wait(10 * MB, 11 * MB)  # on disk but not yet confirmed
    assert p.span(p.claim()) == (4 * MB, 8 * MB)
    p2 = parts(64 * MB)
    p2.claim()
    p2.wait(62 * MB + 5, 63 * MB)  # a part for it may start before its aligned start, never inside a gap's end
    assert p2.span(p2.claim()) == (62 * MB, 64 * MB)


def test_writes_wake_only_readers_whose_bytes_are_all_there():
    p = parts(8 * MB)
    part = p.claim()
    assert not p.wait(0, MB)
    assert not p.wait(2 * MB, 3 * MB)
    assert not p.wait(2 * MB, 3 * MB)  # a second reader of the same bytes
    assert not p.wrote(part, 0, MB)  # not confirmed yet: the server has not answered for these bytes
    assert p.take_ready() == set()
    assert p.confirm()  # now the first reader may go
    assert not p.wrote(part, MB, 2 * MB + 100)  # the second range is only partly there: nobody new to wake
    assert p.take_ready() == {(0, MB)}
    assert p.wrote(part, 2 * MB + 100, 3 * MB)
    assert p.take_ready() == {(2 * MB, 3 * MB)}  # both of its readers go
    assert p.take_ready() == set()
    assert not p.wrote(part, 3 * MB, 4 * MB)  # nobody waits
    assert p.wait(0, 4 * MB)  # already readable: nothing registered
    assert p.progress() == 4 * MB and p.fetched == 4 * MB


def test_a_reader_that_goes_away_is_not_woken():
    p = parts(8 * MB)
    part = p.claim()
    p.confirm()
    assert not p.wait(0, MB) and not p.wait(0, MB)
    p.unwait(0, MB)  # one of the two readers was cancelled
    assert p.wrote(part, 0, MB) and p.take_ready() == {(0, MB)}  # the other one still goes
    assert not p.wait(MB, 2 * MB)
    assert p.wrote(part, MB, 2 * MB)
    p.unwait(MB, 2 * MB)  # cancelled after its bytes came, before the loop woke it
    assert p.take_ready() == set()


def test_bytes_readers_may_have_seen():
    p = parts(10 * MB, [(0, 2 * MB), (4 * MB, 5 * MB)])
    assert p.seen(0, 10 * MB) == []  # unconfirmed bytes were never served
    p.confirm()
    assert p.seen(MB, 6 * MB) == [(MB, 2 * MB), (4 * MB, 5 * MB)]
    assert p.seen(2 * MB, 4 * MB) == []
    assert p.covers(0, 2 * MB) and not p.covers(0, 3 * MB)


def feed(growth: Growth, rate_of: dict[int, float], seconds: float = 10.0, step: float = 0.05) -> list[int]:
    """Run `growth` against a link where k streams get rate_of[k] bytes/s; the targets it chose, in order."""
    now, fetched, chosen = 0.0, 0.0, [growth.target]
    while now < seconds:
        target = growth.sample(now, int(fetched))
        if target != chosen[-1]:
            chosen.append(target)
        fetched += rate_of[target] * step
        now += step
    return chosen


def test_streams_double_while_each_connection_is_capped():
    capped = {k: 25e6 * k for k in range(1, 9)}
    growth = Growth(8)
    assert feed(growth, capped) == [1, 2, 4, 8] and growth.settled


def test_one_stream_where_one_fills_the_link():
    flat = {k: 1e9 * (1 + 0.1 * (k > 1)) for k in range(1, 9)}  # a second stream adds 10%: not worth it
    growth = Growth(8)
    assert feed(growth, flat) == [1, 2, 1] and growth.settled and growth.target == 1


def test_growth_falls_back_to_the_last_count_that_paid():
    link = {1: 30e6, 2: 60e6, 3: 90e6, 4: 95e6, 5: 95e6, 6: 95e6, 7: 95e6, 8: 95e6}  # a 95 MB/s link
    growth = Growth(8)
    assert feed(growth, link) == [1, 2, 4, 8, 4]  # 4 brought 58% more than 2 (25% of the ideal 100% asked)
    assert [round(r / 1e6) for r in growth.rates] == [30, 60, 95, 95]


def test_growth_stops_at_the_limit_and_waits_a_window():
    growth = Growth(8, window=0.5)
    assert growth.sample(0.0, 0) == 1
    assert growth.sample(0.4, 10_000_000) == 1  # less than a window
    assert growth.sample(0.5, 12_000_000) == 2
    assert Growth(1).sample(0.0, 0) == 1 and Growth(1).settled
    assert feed(Growth(6), {k: 25e6 * k for k in range(1, 7)}) == [1, 2, 4, 6]
    assert feed(Growth(3), {k: 25e6 * k for k in range(1, 4)}) == [1, 2, 3]
