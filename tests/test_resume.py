"""The resume record of a partial download (modelfs.resume), on real files in a temporary store: what it loads
(today's format, older single-stream records, damaged ones), and that a record never claims bytes of another
version than the one it names."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from modelfs.ranged import Version
from modelfs.ranges import RangeSet
from modelfs.resume import ResumeRecord
from modelfs.store import Store

V1 = Version(100, '"v1"', "ab" * 32)


@pytest.fixture
def partial(tmp_path: Path) -> tuple[Store, int]:
    store = Store(tmp_path)
    path = store.partial_path("org/m")
    path.parent.mkdir(parents=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(fd, b"x" * 60, 0)
    yield store, fd
    os.close(fd)


def sidecar(store: Store) -> dict[str, object]:
    return json.loads(store.sidecar_path("org/m").read_text())


def test_a_record_round_trips(partial):
    store, fd = partial
    record = ResumeRecord(store, "org/m", fd)
    record.begin(V1)
    assert sidecar(store) == {"total": 100, "validator": '"v1"', "digest": "ab" * 32, "ranges": []}
    record.save(lambda: RangeSet([(0, 10), (20, 60)]))
    again = ResumeRecord(store, "org/m", fd)
    assert again.load() == (V1, RangeSet([(0, 10), (20, 60)])) and again.version == V1


def test_recorded_ranges_are_cut_to_what_the_file_holds(partial):
    store, fd = partial
    store.write_sidecar("org/m", {"total": 100, "validator": None, "digest": None, "ranges": [[0, 80], [-5, 3]]})
    assert ResumeRecord(store, "org/m", fd).load() == (Version(100, None, None), RangeSet([(0, 60)]))


def test_a_single_stream_record_without_ranges_means_the_file_so_far(partial):
    store, fd = partial
    store.write_sidecar("org/m", {"total": 100, "validator": '"v1"'})
    assert ResumeRecord(store, "org/m", fd).load() == (Version(100, '"v1"', None), RangeSet([(0, 60)]))


@pytest.mark.parametrize("ranges", ["all", [[0]], [["a", "b"]], 7])
def test_damaged_ranges_keep_nothing(partial, ranges):
    store, fd = partial
    store.write_sidecar("org/m", {"total": "many", "validator": 5, "ranges": ranges})
    assert ResumeRecord(store, "org/m", fd).load() == (Version(None, None, None), RangeSet())


def test_a_partial_file_without_a_record_is_emptied(partial):
    store, fd = partial
    assert ResumeRecord(store, "org/m", fd).load() == (None, RangeSet())
    assert os.fstat(fd).st_size == 0


def test_restart_forgets_every_byte_and_save_then_records_nothing(partial):
    store, fd = partial
    record = ResumeRecord(store, "org/m", fd)
    record.begin(V1)
    record.restart("a new version")
    assert os.fstat(fd).st_size == 0 and not store.sidecar_path("org/m").exists() and record.version is None
    record.save(lambda: RangeSet([(0, 60)]))  # a late save of the old run's ranges
    assert not store.sidecar_path("org/m").exists()


def test_the_snapshot_is_taken_under_the_record_lock(partial):
    """A save racing a restart and a new version's start never records the old run's ranges for the new one."""
    store, fd = partial
    record = ResumeRecord(store, "org/m", fd)
    record.begin(V1)
    v2 = Version(100, '"v2"', None)
    ranges = {"now": RangeSet([(0, 60)])}
    in_snapshot, proceed = threading.Event(), threading.Event()

    def slow_snapshot() -> RangeSet:
        in_snapshot.set()
        proceed.wait(5)
        return ranges["now"]

    saver = threading.Thread(target=record.save, args=(slow_snapshot,))
    saver.start()
    in_snapshot.wait(5)
    restarter = threading.Thread(target=lambda: (record.restart(None), ranges.update(now=RangeSet()),
                                                 record.begin(v2)))
    restarter.start()
    restarter.join(0.2)
    assert restarter.is_alive()  # waits for the save, which holds the lock
    proceed.set()
    saver.join(5)
    restarter.join(5)
    assert sidecar(store) == {"total": 100, "validator": '"v2"', "digest": None, "ranges": []}
