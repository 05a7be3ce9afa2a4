"""Unit tests of the version rules, without a mount: what a file's identity is and when it proves a file
(`identity`), when a name's file is the same version (`Version.same_file`, through `Inodes.entry`), and when an open
adopts the file it found, keeps the kernel's cached pages, or sends the opener to a new inode with ESTALE
(`Inodes._adopt`, through `Inodes.open`). The mounted behaviour is tests/test_integrity.py's."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from modelfs.errors import Failure
from modelfs.identity import STABLE_AFTER_NS, Identity, settled
from modelfs.inodes import Inodes
from modelfs.resolver import LOCAL, ROUTER, SHARED, Source

A = Identity(1, 100, 4096, 1_000)
A_LATER = Identity(1, 100, 4096, 2_000)  # the same inode rewritten: another mtime
B_SAME_SIZE = Identity(1, 200, 4096, 3_000)
C_OTHER_SIZE = Identity(1, 300, 8192, 4_000)


def source(identity: Identity | None, kind: str = LOCAL, trusted: bool = True, size: int | None = None) -> Source:
    return Source(kind, "org/m", Path("/store/org/m/model.gguf"), identity.size if identity else size or 0,
                  identity.mtime_ns if identity else 0, identity=identity, trusted=trusted)


class FakeReader:
    """What `inodes` needs of a reader: its identity and whether it proves the file; counts its closes."""

    source = "local"
    path = "/store/org/m/model.gguf"
    fd = -1
    complete = True

    def __init__(self, identity: Identity, trusted: bool = True) -> None:
        self.identity = identity
        self.trusted = trusted
        self.closed = 0

    async def close(self) -> None:
        self.closed += 1


class FakeOpener:
    def __init__(self, *readers: FakeReader) -> None:
        self.readers = list(readers)
        self.in_use: set[str] = set()

    async def open(self, name: str, in_use: Callable[[], set[str]]) -> FakeReader:
        self.in_use = in_use()
        return self.readers.pop(0)


class FakeResolver:
    def __init__(self, now: Source) -> None:
        self.now = now

    async def resolve(self, name: str) -> Source:
        return self.now


class DaemonPath:
    async def register(self, reader: object) -> tuple[int, str]:
        return 0, ""

    def unregister(self, backing_id: int) -> None:
        raise AssertionError("nothing was registered")


def inodes(*readers: FakeReader, now: Source | None = None) -> tuple[Inodes, FakeOpener, FakeResolver]:
    opener = FakeOpener(*readers)
    resolver = FakeResolver(now or source(A))
    return Inodes(resolver, opener, DaemonPath()), opener, resolver  # type: ignore[arg-type]


def stale(call: Callable[[], object]) -> None:
    with pytest.raises(Failure) as info:
        trio.run(call)  # type: ignore[arg-type]
    assert info.value.errno == errno.ESTALE


def test_identity_is_what_stat_says_and_proves_a_file_once_settled():
    st = os.stat(__file__)
    assert Identity.of(st) == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    assert Identity.of(st).size == st.st_size
    now = 10 * STABLE_AFTER_NS
    assert settled(now - STABLE_AFTER_NS - 1, now)
    assert not settled(now - STABLE_AFTER_NS, now)  # changed within the window: proves nothing yet
    assert not settled(now, now)


def test_same_identity_is_the_same_inode_and_any_change_a_new_one():
    table, _, _ = inodes()
    first = table.entry("org/m.gguf", source(A))
    assert table.entry("org/m.gguf", source(A)) is first
    assert table.entry("org/m.gguf", source(A_LATER)).inode != first.inode  # rewritten in place
    changed = table.entry("org/m.gguf", source(B_SAME_SIZE))
    assert changed.inode != first.inode and table.version(first.inode) is None  # unused: forgotten


def test_a_router_model_without_a_file_is_the_same_version_while_its_size_is():
    table, _, _ = inodes()
    first = table.entry("org/m.gguf", source(None, ROUTER, size=4096))
    assert table.entry("org/m.gguf", source(None, ROUTER, size=4096)) is first
    assert table.entry("org/m.gguf", source(None, ROUTER, size=8192)) is not first
    assert not first.same_file(source(A))  # a download began: a file now, which the version has not seen


def test_an_unsettled_identity_proves_nothing_while_the_version_is_open():
    """A shared file changed in the last seconds: equal identities may hide a same-second replacement."""
    reader = FakeReader(A, trusted=False)
    table, _, _ = inodes(reader)
    version = table.entry("org/m.gguf", source(A, SHARED, trusted=False))
    assert version.same_file(source(A, SHARED, trusted=False))  # nothing open: nothing to be wrong about

    async def open_it() -> None:
        await table.open(version)

    trio.run(open_it)
    assert not version.same_file(source(A, SHARED, trusted=False))
    assert table.entry("org/m.gguf", source(A, SHARED, trusted=False)) is not version


def test_an_open_that_finds_the_same_proven_file_keeps_the_cached_pages():
    reader = FakeReader(A)
    table, opener, _ = inodes(reader)
    version = table.entry("org/m.gguf", source(A))

    async def scenario() -> None:
        fh, file, keep_cache = await table.open(version)
        assert keep_cache and file.reader is reader and file.handles == 1
        assert opener.in_use == set()  # asked before this open's file existed
        assert table.open_names() == {"org/m"} and table.open_counts() == {"org/m": 1}
        fh2, file2, keep2 = await table.open(version)  # joins: the name is still this file
        assert file2 is file and keep2 and file.handles == 2
        await table.release(fh)
        assert reader.closed == 0
        await table.release(fh2)
        assert reader.closed == 1 and version.file is None and table.open_counts() == {}

    trio.run(scenario)


def test_an_open_adopts_another_file_of_the_same_size_and_drops_the_pages():
    """The file changed between lookup and open (or a router model's download began): the kernel's attributes
    still hold, so the newest inode adopts it, with its identity and mtime, and renews its pages."""
    table, _, _ = inodes(FakeReader(B_SAME_SIZE))
    version = table.entry("org/m.gguf", source(A))

    async def scenario() -> None:
        _, _, keep_cache = await table.open(version)
        assert not keep_cache
        assert version.source.identity == B_SAME_SIZE and version.source.mtime_ns == B_SAME_SIZE.mtime_ns

    trio.run(scenario)


def test_an_unproven_file_never_keeps_the_pages_even_when_identities_match():
    table, _, _ = inodes(FakeReader(A, trusted=False))
    version = table.entry("org/m.gguf", source(A, SHARED, trusted=False))

    async def scenario() -> None:
        _, _, keep_cache = await table.open(version)
        assert not keep_cache and not version.source.trusted

    trio.run(scenario)


def test_another_size_or_an_older_inode_is_estale_and_its_file_is_closed():
    other_size = FakeReader(C_OTHER_SIZE)
    table, _, _ = inodes(other_size)
    version = table.entry("org/m.gguf", source(A))
    stale(lambda: table.open(version))
    assert other_size.closed == 1 and version.file is None

    same_size = FakeReader(B_SAME_SIZE)
    table, _, _ = inodes(same_size)
    old = table.entry("org/m.gguf", source(A))
    table.entry("org/m.gguf", source(A_LATER))  # a newer version is the name's now
    stale(lambda: table.open(old))
    assert same_size.closed == 1


def test_an_open_joining_handles_is_estale_once_the_name_is_another_file():
    reader = FakeReader(A)
    table, _, resolver = inodes(reader)
    version = table.entry("org/m.gguf", source(A))

    async def first() -> None:
        await table.open(version)

    trio.run(first)
    resolver.now = source(B_SAME_SIZE)
    stale(lambda: table.open(version))
    assert version.file is not None and version.file.handles == 1 and reader.closed == 0  # the open one is kept
