"""`SharedDir`'s rules by themselves, on a local directory with calls that block on purpose (sleeps, events, and a
FIFO, whose open blocks until a writer comes): the timeout counts from when a call runs, not while it waits for a
thread; a call running past it marks the directory down and releases every call waiting; the prober is never queued
behind busy calls; an open given up is closed when it finally returns. The same on real sshfs: test_shared_sshfs."""

from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path

import pytest
import trio

from modelfs.shared import THREADS_PER_DIR, SharedDir, SharedUnavailable

TIMEOUT = 0.3


def test_waiting_for_a_thread_is_not_counted(tmp_path):
    """Three times more calls than threads, each well within the timeout: the last ones wait for a thread longer
    than the timeout, and nothing is marked down."""
    shared = SharedDir(tmp_path, TIMEOUT)
    done: list[float] = []

    async def main() -> None:
        started = trio.current_time()

        async def one() -> None:
            await shared.call(time.sleep, 0.15)
            done.append(trio.current_time() - started)

        async with trio.open_nursery() as nursery:
            for _ in range(3 * THREADS_PER_DIR):
                nursery.start_soon(one)

    trio.run(main)
    assert len(done) == 3 * THREADS_PER_DIR and max(done) > TIMEOUT
    assert shared.available, shared.reason


def test_a_call_past_the_timeout_marks_the_directory_down_and_releases_the_waiters(tmp_path):
    shared = SharedDir(tmp_path, TIMEOUT)
    hung = threading.Event()
    outcomes: list[tuple[str, float]] = []

    async def main() -> None:
        started = trio.current_time()

        async def one() -> None:
            try:
                await shared.call(hung.wait)
                outcomes.append(("answered", 0.0))
            except SharedUnavailable:
                outcomes.append(("skipped", trio.current_time() - started))

        async with trio.open_nursery() as nursery:
            for _ in range(THREADS_PER_DIR + 4):  # 8 hang in their threads, 4 wait for one
                nursery.start_soon(one)

    try:
        trio.run(main)
    finally:
        hung.set()
    assert [what for what, _ in outcomes] == ["skipped"] * (THREADS_PER_DIR + 4)
    assert max(seconds for _, seconds in outcomes) < TIMEOUT + 0.5
    assert not shared.available and f"no answer within {TIMEOUT:g}s" in shared.reason


def test_the_prober_is_never_queued_behind_busy_calls(tmp_path):
    """Every thread of the directory busy with calls that answer (slowly but within the timeout), many more
    queued: a probe answers at once, and the directory stays up."""
    shared = SharedDir(tmp_path, TIMEOUT)
    probe_seconds: list[float] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(4 * THREADS_PER_DIR):
                nursery.start_soon(shared.call, time.sleep, 0.2)
            await trio.sleep(0.05)
            started = trio.current_time()
            await shared.probe()
            probe_seconds.append(trio.current_time() - started)

    trio.run(main)
    assert probe_seconds[0] < TIMEOUT and shared.available, (probe_seconds, shared.reason)


def open_descriptors() -> int:
    gc.collect()  # descriptors of objects of earlier tests that are already garbage
    return len(os.listdir("/proc/self/fd"))


def test_an_open_given_up_is_closed_when_it_returns(tmp_path):
    """`os.open` of a FIFO blocks until a writer comes: the call is given up (and the directory marked down); when
    the open returns later, its descriptor is closed, not lost."""
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    shared = SharedDir(tmp_path, TIMEOUT)
    before = open_descriptors()

    async def main() -> None:
        with pytest.raises(SharedUnavailable):
            await shared.open(fifo)

    trio.run(main)
    assert not shared.available
    writer = os.open(fifo, os.O_WRONLY)  # the abandoned open returns now
    try:
        deadline = time.monotonic() + 5
        while open_descriptors() > before + 1 and time.monotonic() < deadline:  # + the writer
            time.sleep(0.01)
        assert open_descriptors() == before + 1
    finally:
        os.close(writer)


def test_an_open_and_its_fstat_are_one_call_and_a_close_always_happens(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF-x")
    shared = SharedDir(tmp_path, TIMEOUT)

    async def main() -> None:
        before = open_descriptors()
        fd, st = await shared.open(path)
        assert st.st_size == 6 and os.pread(fd, 4, 0) == b"GGUF"
        await shared.close(fd)
        with pytest.raises(FileNotFoundError):
            await shared.open(Path(tmp_path / "gone.gguf"))
        assert open_descriptors() == before

    trio.run(main)
    assert shared.available
