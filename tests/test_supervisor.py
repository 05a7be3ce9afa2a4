"""The supervisor's pure parts: when a dead daemon is started again, when it gives up, and its fd store.

The supervisor itself, with real daemons, is exercised by test_restart.py.
"""

from __future__ import annotations

import os

from modelfs import fdstore
from modelfs.supervisor import BACKOFF, CRASH_LIMIT, CRASH_WINDOW, CrashPolicy


def test_a_daemon_that_served_is_restarted_at_once_and_early_deaths_back_off():
    policy = CrashPolicy()
    assert policy.died(served=True, now=0.0) == 0.0
    assert [policy.died(served=False, now=1.0 + i) for i in range(len(BACKOFF))] == list(BACKOFF)
    assert policy.died(served=False, now=9.0) == f"{len(BACKOFF) + 1} times in a row before serving"


def test_daemons_that_die_after_serving_are_a_crash_loop_too_but_not_when_spread_out():
    policy = CrashPolicy()
    delays = [policy.died(served=True, now=float(i)) for i in range(CRASH_LIMIT)]
    assert delays[:-1] == [0.0] * (CRASH_LIMIT - 1)
    assert delays[-1] == f"{CRASH_LIMIT} times in {CRASH_WINDOW:.0f}s"
    spread = CrashPolicy()
    assert all(spread.died(served=True, now=i * CRASH_WINDOW / 2) == 0.0 for i in range(3 * CRASH_LIMIT))


def test_the_fd_store_keeps_by_name_and_drops_what_it_is_told():
    store = fdstore.Store()
    a, b, c = (os.open(os.devnull, os.O_RDONLY) for _ in range(3))
    store.apply(fdstore.Message(1, {"FDSTORE": "1", "FDNAME": "fuse"}, [a]))
    store.apply(fdstore.Message(1, {"FDSTORE": "1", "FDNAME": "state-1"}, [b]))
    store.apply(fdstore.Message(1, {"READY": "1"}, [c]))  # descriptors with no FDSTORE=1 are closed
    assert store.held() == [("fuse", a), ("state-1", b)] and store.first("fuse") == a
    store.apply(fdstore.Message(1, {"FDSTOREREMOVE": "1", "FDNAME": "state-1"}, []))
    assert store.held() == [("fuse", a)] and store.first("state-1") is None
    for fd in (b, c):
        try:
            os.fstat(fd)
        except OSError:
            continue
        raise AssertionError(f"descriptor {fd} was not closed")
    store.close()
    assert store.held() == []
