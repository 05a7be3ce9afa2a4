"""Model names: the one place that validates a name and maps it to paths.

This module is the security boundary of modelfs. Every path that modelfs opens in the store or in a shared
directory is built here, from a name that passed `validate`, so no input can reach outside those directories.
Names follow llmlb: `a-z 0-9 - _ . /`, no empty, `.` or `..` segment, no leading or trailing `/`.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

#: The file name of a model in the llmlb layout: `<dir>/<name>/model.gguf`.
MODEL_FILE = "model.gguf"
#: The suffix a model has in the mount (`/models/<name>.gguf`) and in the flat layout (`<dir>/<name>.gguf`).
SUFFIX = ".gguf"
#: Longest path component the mount accepts, as on every Linux filesystem.
NAME_MAX = 255
#: Longest model name as a whole; llmlb sets no limit, this keeps paths under PATH_MAX with room to spare.
MODEL_NAME_MAX = 1024

_SEGMENT = re.compile(r"[a-z0-9_.\-]+")


class InvalidName(Exception):
    """A name that can never be a model; carries the errno the kernel should see."""

    def __init__(self, name: str, reason: str, err: int = errno.ENOENT) -> None:
        super().__init__(f"invalid model name {name!r}: {reason}")
        self.errno = err


def validate(name: str) -> str:
    """Return `name` if it is a valid llmlb model name, else raise InvalidName."""
    if not name:
        raise InvalidName(name, "empty")
    if len(name.encode()) > MODEL_NAME_MAX:
        raise InvalidName(name, "too long", errno.ENAMETOOLONG)
    if name.startswith("/") or name.endswith("/"):
        raise InvalidName(name, "leading or trailing '/'")
    for segment in name.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidName(name, f"segment {segment!r} not allowed")
        if len(segment.encode()) > NAME_MAX:
            raise InvalidName(name, "segment longer than 255 bytes", errno.ENAMETOOLONG)
        if segment.startswith("."):
            raise InvalidName(name, "hidden segment")
        if not _SEGMENT.fullmatch(segment):
            raise InvalidName(name, "allowed characters are a-z 0-9 - _ . /")
    return name


def validate_dir(prefix: str) -> str:
    """Validate a directory of the mount (`org` in `/models/org/model.gguf`): same rules as a name."""
    return validate(prefix)


def component(raw: bytes) -> str:
    """Decode one path component the kernel sent, rejecting what can never be part of a name."""
    if len(raw) > NAME_MAX:
        raise InvalidName(repr(raw[:32]), "component longer than 255 bytes", errno.ENAMETOOLONG)
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise InvalidName(repr(raw), "not UTF-8") from None
    if "\0" in text or "/" in text:
        raise InvalidName(text, "NUL or '/' in a component")
    return text


def model_of_entry(parent: str, entry: str) -> str | None:
    """The model name that mount entry `entry` in directory `parent` stands for, or None if it is no model file."""
    if not entry.endswith(SUFFIX) or len(entry) == len(SUFFIX):
        return None
    stem = entry[: -len(SUFFIX)]
    return validate(f"{parent}/{stem}" if parent else stem)


def join(parent: str, entry: str) -> str:
    """The mount-relative path of `entry` in directory `parent` ("" is the root)."""
    return f"{parent}/{entry}" if parent else entry


def candidates(root: Path, name: str) -> tuple[Path, Path]:
    """Where model `name` may live under `root`: the llmlb layout first, then the flat one."""
    validate(name)
    return root / name / MODEL_FILE, root / (name + SUFFIX)


def inside(root: Path, path: Path) -> bool:
    """Whether `path`, with every symlink resolved, stays under `root` (also resolved).

    Shared directories may hold symlinks (llmlb allows them); one pointing outside the directory is refused.
    Blocks on the filesystem: call it off the trio loop for shared directories.
    """
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip("/") + "/")


def name_of_path(root: Path, path: Path) -> str | None:
    """The model name a file found while walking `root` stands for, or None if it is not a model file."""
    rel = path.relative_to(root).as_posix()
    if path.name == MODEL_FILE:
        stem = rel[: -len(MODEL_FILE) - 1]
    elif rel.endswith(SUFFIX):
        stem = rel[: -len(SUFFIX)]
    else:
        return None
    try:
        return validate(stem)
    except InvalidName:
        return None
