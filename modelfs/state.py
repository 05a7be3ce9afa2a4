"""The state a crash of the daemon cannot lose: what the kernel knows of the mount (node ids of directories and of
model file versions, open file and directory handles with their passthrough backing ids, the counters that must
never go back) and the connection's FUSE_INIT.

It is a journal in a memory file (memfd) that whatever holds the /dev/fuse descriptor holds too (systemd's file
descriptor store, or modelfs's supervisor): it lives exactly as long as the connection, is reachable by nobody
else, and a record is in it the moment `write` returns, before the request it describes is answered. Records
are versioned JSON objects, each framed with its length and CRC-32; a header at offset 0 says how many bytes are
committed. The journal is checked on load like any input: a bad header, a record whose CRC or content is wrong,
or fewer bytes than committed (a truncated file) is a `StateError`, never a half-restored mount.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from . import names

MAGIC = b"modelfs-state\0\0\0"
VERSION = 1
#: magic, format version, generation, committed length, CRC-32 of the fields before it.
HEADER = struct.Struct("<16sIIQI")
#: A record: payload length, CRC-32 of the payload; then the payload (a JSON object).
FRAME = struct.Struct("<II")
_HEAD = struct.Struct("<16sIIQ")
_CRC = struct.Struct("<I")
_ENCODER = json.JSONEncoder(separators=(",", ":"))
MAX_RECORD = 1 << 16
KINDS = ("local", "shared", "router")
_LIMIT = 1 << 62


class StateError(Exception):
    """The saved state cannot be trusted; the message says where and why."""


class Journal:
    """Appends records to one memory file; the header is rewritten after each record to commit it."""

    def __init__(self, fd: int, generation: int, length: int) -> None:
        self.fd = fd
        self.generation = generation
        self.length = length

    @classmethod
    def create(cls, generation: int) -> Journal:
        fd = os.memfd_create("modelfs-state", os.MFD_CLOEXEC)
        journal = cls(fd, generation, HEADER.size)
        journal._commit()
        return journal

    def append(self, record: dict[str, Any]) -> None:
        self.extend([record])

    def append_ints(self, kind: str, **fields: int) -> None:
        """`append` for a record of integers only (a handle opened or closed, an inode dropped): the most
        frequent ones, formatted without the JSON encoder."""
        payload = (f'{{"t":"{kind}",' + ",".join(f'"{key}":{int(value)}' for key, value in fields.items())
                   + "}").encode()
        self._write(FRAME.pack(len(payload), zlib.crc32(payload)) + payload)

    def extend(self, records: list[dict[str, Any]]) -> None:
        """Write the records, then commit them: a crash in between leaves them uncommitted, never half there."""
        frames = []
        for record in records:
            payload = _ENCODER.encode(record).encode()
            frames.append(FRAME.pack(len(payload), zlib.crc32(payload)) + payload)
        self._write(b"".join(frames))

    def _write(self, data: bytes) -> None:
        if os.pwrite(self.fd, data, self.length) != len(data):
            raise OSError(errno.ENOSPC, "short write to the restart journal")
        self.length += len(data)
        self._commit()

    def _commit(self) -> None:
        head = _HEAD.pack(MAGIC, VERSION, self.generation, self.length)
        os.pwrite(self.fd, head + _CRC.pack(zlib.crc32(head)), 0)

    def close(self) -> None:
        os.close(self.fd)


def read(fd: int) -> tuple[int, int, list[dict[str, Any]]]:
    """(generation, committed length, records) of a journal; StateError if anything about it is wrong."""
    size = os.fstat(fd).st_size
    head = os.pread(fd, HEADER.size, 0)
    if len(head) < HEADER.size:
        raise StateError(f"{size} bytes: no header")
    magic, version, generation, length, crc = HEADER.unpack(head)
    if magic != MAGIC:
        raise StateError("not a modelfs state (bad magic)")
    if zlib.crc32(head[: HEADER.size - 4]) != crc:
        raise StateError("header checksum mismatch")
    if version != VERSION:
        raise StateError(f"format version {version}; this modelfs reads version {VERSION}")
    if length > size:
        raise StateError(f"truncated: {size} bytes, {length} committed")
    data = os.pread(fd, length - HEADER.size, HEADER.size)
    records: list[dict[str, Any]] = []
    at = 0
    while at < len(data):
        if at + FRAME.size > len(data):
            raise StateError(f"record at byte {HEADER.size + at}: cut short")
        n, crc = FRAME.unpack_from(data, at)
        payload = data[at + FRAME.size: at + FRAME.size + n]
        if n > MAX_RECORD or len(payload) != n or zlib.crc32(payload) != crc:
            raise StateError(f"record at byte {HEADER.size + at}: checksum mismatch")
        try:
            record = json.loads(payload)
        except ValueError:
            raise StateError(f"record at byte {HEADER.size + at}: not JSON") from None
        if not isinstance(record, dict):
            raise StateError(f"record at byte {HEADER.size + at}: not an object")
        records.append(record)
        at += FRAME.size + n
    return generation, length, records


Identity = tuple[int, int, int, int]


@dataclass
class SavedVersion:
    """One model file inode as the kernel knows it: the attributes it was given and the file they belong to."""

    inode: int
    path: str  # in the mount, e.g. "org/model.gguf"
    kind: str  # local, shared, router
    backing: str  # the file it was found at (or, for a router model, its store path)
    size: int
    mtime_ns: int
    identity: Identity | None
    trusted: bool

    @property
    def name(self) -> str:
        parent, _, entry = self.path.rpartition("/")
        model = names.model_of_entry(parent, entry)
        assert model is not None  # checked on load
        return model

    def record(self) -> dict[str, Any]:
        return {"t": "ver", "i": self.inode, "p": self.path, "k": self.kind, "b": self.backing, "s": self.size,
                "m": self.mtime_ns, "id": list(self.identity) if self.identity else None, "tr": self.trusted}


@dataclass
class Saved:
    """Everything a journal says, checked."""

    generation: int
    length: int  # bytes committed: where the next record goes
    mountpoint: str
    started_ns: int
    init_request: bytes = b""
    init_reply: bytes = b""
    device: tuple[int, int] = (0, 0)  # of the kernel mount (/proc/self/mountinfo): which mount the journal is of
    restarts: int = 0
    dirs: dict[int, str] = field(default_factory=dict)
    versions: dict[int, SavedVersion] = field(default_factory=dict)
    handles: dict[int, tuple[int, int]] = field(default_factory=dict)  # fh -> (inode, backing id)
    dir_handles: dict[int, int] = field(default_factory=dict)  # fh -> directory inode
    next_inode: int = 2
    next_fh: int = 1
    next_dir_fh: int = 1

    def records(self) -> list[dict[str, Any]]:
        """The records that say all of it: what a compacted journal holds."""
        out: list[dict[str, Any]] = [
            {"t": "mount", "mountpoint": self.mountpoint, "started_ns": self.started_ns},
            {"t": "init", "req": self.init_request.hex(), "rep": self.init_reply.hex(), "dev": list(self.device)},
            {"t": "restart", "count": self.restarts},
            {"t": "next", "inode": self.next_inode, "fh": self.next_fh, "dfh": self.next_dir_fh}]
        out += [{"t": "dir", "i": inode, "p": path} for inode, path in self.dirs.items()]
        out += [version.record() for version in self.versions.values()]
        out += [{"t": "open", "fh": fh, "i": inode, "b": backing} for fh, (inode, backing) in self.handles.items()]
        out += [{"t": "dopen", "fh": fh, "i": inode} for fh, inode in self.dir_handles.items()]
        return out


def _int(record: dict[str, Any], key: str, low: int = 0) -> int:
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value < _LIMIT:
        raise StateError(f"{record.get('t')} record: bad {key!r}: {value!r}")
    return value


def _str(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or len(value) > 4096 or "\0" in value:
        raise StateError(f"{record.get('t')} record: bad {key!r}")
    return value


def _dir_path(path: str) -> str:
    try:
        names.validate_dir(path)
    except names.InvalidName as exc:
        raise StateError(f"directory {path!r}: {exc}") from None
    return path


def _file_path(path: str) -> str:
    parent, _, entry = path.rpartition("/")
    try:
        if parent:
            names.validate_dir(parent)
        if names.model_of_entry(parent, entry) is None:
            raise StateError(f"{path!r} is not a model file of the mount")
    except names.InvalidName as exc:
        raise StateError(f"file {path!r}: {exc}") from None
    return path


def _version(record: dict[str, Any]) -> SavedVersion:
    kind = record.get("k")
    if kind not in KINDS:
        raise StateError(f"ver record: bad kind {kind!r}")
    ident = record.get("id")
    identity: Identity | None = None
    if ident is not None:
        if not isinstance(ident, list) or len(ident) != 4:
            raise StateError("ver record: bad identity")
        identity = (_int({"id": ident[0]}, "id"), _int({"id": ident[1]}, "id"), _int({"id": ident[2]}, "id"),
                    _int({"id": ident[3]}, "id"))
    trusted = record.get("tr")
    if not isinstance(trusted, bool):
        raise StateError("ver record: bad 'tr'")
    return SavedVersion(_int(record, "i", 2), _file_path(_str(record, "p")), kind, _str(record, "b"),
                        _int(record, "s"), _int(record, "m"), identity, trusted)


def parse(generation: int, length: int, records: list[dict[str, Any]]) -> Saved:
    """Replay the records into one `Saved`; StateError on anything inconsistent."""
    saved: Saved | None = None
    top_inode = top_fh = top_dfh = 0
    for record in records:
        kind = record.get("t")
        if kind == "mount":
            if saved is not None:
                raise StateError("mount record repeated")
            saved = Saved(generation, length, _str(record, "mountpoint"), _int(record, "started_ns"))
            continue
        if saved is None:
            raise StateError(f"{kind} record before the mount record")
        if kind == "init":
            try:
                saved.init_request = bytes.fromhex(_str(record, "req"))
                saved.init_reply = bytes.fromhex(_str(record, "rep"))
            except ValueError:
                raise StateError("init record: not hex") from None
            device = record.get("dev")
            if not isinstance(device, list) or len(device) != 2:
                raise StateError("init record: bad 'dev'")
            saved.device = (_int({"dev": device[0]}, "dev"), _int({"dev": device[1]}, "dev"))
        elif kind == "restart":
            saved.restarts = _int(record, "count")
        elif kind == "next":
            top_inode = max(top_inode, _int(record, "inode") - 1)
            top_fh = max(top_fh, _int(record, "fh") - 1)
            top_dfh = max(top_dfh, _int(record, "dfh") - 1)
        elif kind == "dir":
            inode = _int(record, "i", 2)
            if inode in saved.versions:
                raise StateError(f"inode {inode} is a file and a directory")
            saved.dirs[inode] = _dir_path(_str(record, "p"))
            top_inode = max(top_inode, inode)
        elif kind == "ver":
            version = _version(record)
            if version.inode in saved.dirs:
                raise StateError(f"inode {version.inode} is a file and a directory")
            saved.versions[version.inode] = version
            top_inode = max(top_inode, version.inode)
        elif kind == "drop":
            inode = _int(record, "i")
            if saved.versions.pop(inode, None) is None:
                raise StateError(f"drop of unknown inode {inode}")
            if any(held == inode for held, _ in saved.handles.values()):
                raise StateError(f"drop of inode {inode}, which has open handles")
        elif kind == "open":
            fh, inode = _int(record, "fh", 1), _int(record, "i", 2)
            if inode not in saved.versions or fh in saved.handles:
                raise StateError(f"open of fh {fh} on inode {inode}: unknown inode or fh in use")
            saved.handles[fh] = (inode, _int(record, "b"))
            top_fh = max(top_fh, fh)
        elif kind == "close":
            if saved.handles.pop(_int(record, "fh"), None) is None:
                raise StateError(f"release of unknown fh {record['fh']}")
        elif kind == "dopen":
            fh, inode = _int(record, "fh", 1), _int(record, "i", 1)
            if inode != 1 and inode not in saved.dirs:
                raise StateError(f"opendir of unknown directory inode {inode}")
            saved.dir_handles[fh] = inode
            top_dfh = max(top_dfh, fh)
        elif kind == "dclose":
            if saved.dir_handles.pop(_int(record, "fh"), None) is None:
                raise StateError(f"releasedir of unknown fh {record['fh']}")
        else:
            raise StateError(f"unknown record type {kind!r}")
    if saved is None:
        raise StateError("no mount record")
    if not saved.init_request or not saved.init_reply:
        raise StateError("no FUSE_INIT recorded")
    saved.next_inode, saved.next_fh, saved.next_dir_fh = top_inode + 1, top_fh + 1, top_dfh + 1
    saved.next_inode = max(saved.next_inode, 2)
    return saved


def load(fd: int) -> Saved:
    return parse(*read(fd))

