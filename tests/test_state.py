"""The restart journal (`modelfs.state`): what a new daemon trusts, and everything it must refuse.

Pure: memory files, no mount. The real-mount side (crashes, tampering through the supervisor's descriptors) is in
test_restart.py.
"""

from __future__ import annotations

import os
import struct
import zlib

import pytest

from modelfs import state
from modelfs.state import HEADER, Journal, Saved, SavedVersion, StateError

INIT = (b"\x68\x00\x00\x00\x1a\x00\x00\x00" + bytes(96), b"\x50\x00\x00\x00" + bytes(76))


def journal_with(*records: dict[str, object]) -> Journal:
    journal = Journal.create(1)
    journal.extend([{"t": "mount", "mountpoint": "/models", "started_ns": 5},
                    {"t": "init", "req": INIT[0].hex(), "rep": INIT[1].hex(), "dev": [0, 42]}, *records])
    return journal


def version(inode: int, path: str = "org/m.gguf", backing: str = "/store/org/m/model.gguf") -> dict[str, object]:
    return SavedVersion(inode, path, "local", backing, 10, 7, (1, 2, 10, 7), True).record()


def test_a_journal_replays_into_the_tables_it_recorded():
    journal = journal_with({"t": "dir", "i": 2, "p": "org"}, version(3), version(4),
                           {"t": "open", "fh": 1, "i": 3, "b": 0}, {"t": "open", "fh": 2, "i": 4, "b": 9},
                           {"t": "close", "fh": 1}, {"t": "drop", "i": 3}, {"t": "dopen", "fh": 1, "i": 2},
                           {"t": "restart", "count": 2})
    saved = state.load(journal.fd)
    assert saved.mountpoint == "/models" and saved.started_ns == 5
    assert (saved.init_request, saved.init_reply, saved.device) == (*INIT, (0, 42))
    assert saved.dirs == {2: "org"} and list(saved.versions) == [4]
    assert saved.versions[4].identity == (1, 2, 10, 7) and saved.versions[4].name == "org/m"
    assert saved.handles == {2: (4, 9)} and saved.dir_handles == {1: 2}
    # Counters never go back, whatever was dropped or closed.
    assert (saved.next_inode, saved.next_fh, saved.next_dir_fh, saved.restarts) == (5, 3, 2, 2)
    assert saved.length == journal.length == os.fstat(journal.fd).st_size


def test_integer_records_written_fast_read_the_same():
    journal = journal_with(version(3))
    journal.append_ints("open", fh=7, i=3, b=11)
    journal.append_ints("dopen", fh=2, i=1)
    saved = state.load(journal.fd)
    assert saved.handles == {7: (3, 11)} and saved.dir_handles == {2: 1} and saved.next_fh == 8


def test_a_compacted_journal_says_the_same():
    saved = state.load(journal_with({"t": "dir", "i": 2, "p": "org"}, version(7),
                                    {"t": "open", "fh": 4, "i": 7, "b": 0}).fd)
    saved.next_inode, saved.next_fh = 20, 9  # inodes 8..19 were minted and dropped since
    compact = Journal.create(2)
    compact.extend(saved.records())
    again = state.load(compact.fd)
    assert (again.generation, again.dirs, again.versions, again.handles) == (2, saved.dirs, saved.versions,
                                                                            saved.handles)
    assert (again.next_inode, again.next_fh, again.init_request) == (20, 9, INIT[0])


def test_an_uncommitted_tail_is_not_read():
    journal = journal_with(version(3))
    committed = journal.length
    os.pwrite(journal.fd, b"\x20\x00\x00\x00garbage of a record the crash cut", committed)
    assert list(state.load(journal.fd).versions) == [3]


def flip(fd: int, offset: int) -> None:
    byte = os.pread(fd, 1, offset)
    os.pwrite(fd, bytes([byte[0] ^ 0x40]), offset)


@pytest.mark.parametrize("damage, message", [
    (lambda j: os.ftruncate(j.fd, j.length - 3), "truncated"),
    (lambda j: flip(j.fd, j.length - 5), "checksum mismatch"),
    (lambda j: flip(j.fd, 3), "magic"),
    (lambda j: flip(j.fd, 20), "header checksum"),
    (lambda j: os.ftruncate(j.fd, 10), "no header"),
])
def test_damage_is_refused(damage, message):
    journal = journal_with(version(3), {"t": "open", "fh": 1, "i": 3, "b": 0})
    damage(journal)
    with pytest.raises(StateError, match=message):
        state.load(journal.fd)


def forged(*records: dict[str, object]) -> int:
    """A journal whose records have valid frames: what someone able to write the memory file could make."""
    return journal_with(*records).fd


@pytest.mark.parametrize("records, message", [
    ([{"t": "open", "fh": 1, "i": 3, "b": 0}], "unknown inode"),
    ([version(3), {"t": "drop", "i": 3}, {"t": "drop", "i": 3}], "drop of unknown inode"),
    ([version(3), {"t": "open", "fh": 1, "i": 3, "b": 0}, {"t": "drop", "i": 3}], "open handles"),
    ([{"t": "close", "fh": 5}], "unknown fh"),
    ([{"t": "dir", "i": 2, "p": "../etc"}], "directory"),
    ([version(3, path="../../etc/passwd")], "not a model file|file"),
    ([version(3, path="org/.hidden.gguf")], "not a model file|file"),
    ([{"t": "dir", "i": 3, "p": "org"}, version(3)], "file and a directory"),
    ([{**version(3), "k": "elsewhere"}], "kind"),
    ([{**version(3), "id": [1, 2, 3]}], "identity"),
    ([{**version(3), "s": -1}], "'s'"),
    ([{**version(3), "i": 1 << 70}], "'i'"),
    ([{"t": "what"}], "unknown record type"),
])
def test_inconsistent_records_are_refused(records, message):
    with pytest.raises(StateError, match=message):
        state.load(forged(*records))


def test_a_record_before_the_mount_record_or_no_init_is_refused():
    journal = Journal.create(1)
    journal.extend([version(3)])
    with pytest.raises(StateError, match="before the mount record"):
        state.load(journal.fd)
    journal = Journal.create(1)
    journal.extend([{"t": "mount", "mountpoint": "/m", "started_ns": 1}])
    with pytest.raises(StateError, match="no FUSE_INIT"):
        state.load(journal.fd)


def test_a_newer_format_is_refused_with_its_version():
    journal = journal_with()
    head = struct.pack("<16sIIQ", state.MAGIC, state.VERSION + 1, 1, journal.length)
    os.pwrite(journal.fd, HEADER.pack(state.MAGIC, state.VERSION + 1, 1, journal.length, zlib.crc32(head)), 0)
    with pytest.raises(StateError, match="format version 2"):
        state.load(journal.fd)


def test_saved_records_round_trip_every_field():
    saved = Saved(3, 0, "/models", 9, *INIT, device=(0, 42), restarts=4, dirs={2: "a", 5: "a/b"},
                  versions={6: SavedVersion(6, "a/b/c.gguf", "router", "/s/a/b/c/model.gguf", 0, 9, None, True)},
                  handles={1: (6, 0)}, dir_handles={3: 5}, next_inode=8, next_fh=2, next_dir_fh=4)
    journal = Journal.create(3)
    journal.extend(saved.records())
    again = state.load(journal.fd)
    saved.length = again.length
    assert again == saved
