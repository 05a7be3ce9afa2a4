"""The ranged-GET protocol of a download, as pure functions: what to ask (Range, If-Range) and what an answer
means (200, 206 or 416; Content-Range; validators; digests). No I/O here, so every rule has a unit test.

Bytes already on disk are continued only with an answer that proves it is the same version: a 206 for exactly the
byte asked, of the same size, validator and digest. A validator guards a range only if it is strong (RFC 9110
13.1.5): a strong ETag, or, when there is no ETag at all, a Last-Modified at least a second older than the
response's Date (8.8.2.2). llmlb sends neither and ignores Range: a 200 with the whole body, from byte 0.
A caching proxy may say it is still filling the blob from the origin (`cache_filling`): parts there would only wait.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')  # a structured field's quoted string, escapes included
_CONTENT_RANGE = re.compile(r"bytes[ \t]+(?:(\d+)-(\d+)|\*)/(\d+|\*)", re.IGNORECASE)


class BadAnswer(Exception):
    """The server broke the protocol (a 206 for bytes not asked, an impossible Content-Range): try again."""


@dataclass(frozen=True)
class Version:
    """What a server said about the file: two answers about the same version agree on all three."""

    total: int | None  # the file's size, if known
    validator: str | None  # a strong ETag or Last-Modified, for If-Range
    digest: str | None  # SHA-256 as lowercase hex, checked before the file becomes a model


@dataclass(frozen=True)
class Answer:
    """One response to a blob GET, as far as the download cares."""

    status: int  # 200, 206 or 416
    start: int  # where the body starts in the file (0 for a 200)
    length: int | None  # body bytes, if the server said (Content-Length or the Content-Range span)
    version: Version


class Verdict(enum.Enum):
    """What an answer means for the bytes on disk."""

    CONTINUE = "continue"  # a 206 of the version on disk, at the byte asked: write on
    WHOLE = "whole"  # a 200: the whole body from byte 0 (no Range support, or If-Range saw a new version)
    NEW_VERSION = "new version"  # the server has another version than the one on disk


def request_headers(start: int, end: int | None, validator: str | None) -> dict[str, str]:
    """Range for bytes [start, end) (end None: to the end of the file), guarded by If-Range once a validator is
    known, so that a changed file comes back whole (200) instead of as a range of the new version."""
    headers = {"Range": f"bytes={start}-" if end is None else f"bytes={start}-{end - 1}"}
    if validator:
        headers["If-Range"] = validator
    return headers


def parse(status: int, headers: Mapping[str, str]) -> Answer:
    """An answer from its status and headers (names in lowercase). BadAnswer if they contradict each other."""
    version = Version(None, strong_validator(headers), parse_digest(headers))
    length = _content_length(headers)
    if status == 416:  # `Content-Range: bytes */SIZE`: the byte asked is past the end of the server's file
        _, _, total = parse_content_range(headers.get("content-range", ""), unsatisfied=True)
        return Answer(416, 0, 0, Version(total, version.validator, version.digest))
    if status == 206:
        first, last, total = parse_content_range(headers.get("content-range", ""))
        span = last - first + 1
        if length is not None and length != span:
            raise BadAnswer(f"206 for bytes {first}-{last} with Content-Length {length}")
        return Answer(206, first, span, Version(total, version.validator, version.digest))
    if status == 200:
        return Answer(200, 0, length, Version(length, version.validator, version.digest))
    raise BadAnswer(f"HTTP {status} to a blob GET")


def judge(answer: Answer, asked: int, held: Version | None) -> tuple[Verdict, str]:
    """What `answer` to a GET from byte `asked` means, given the version whose bytes are on disk (None: nothing
    kept yet). Returns the verdict and, for NEW_VERSION, why. BadAnswer for a 206 that starts elsewhere."""
    got = answer.version
    if answer.status == 200:
        return Verdict.WHOLE, "the server sent the whole file"
    if answer.status == 416:
        return Verdict.NEW_VERSION, f"the server cannot send byte {asked} (its file has {got.total} bytes)"
    if answer.start != asked:
        raise BadAnswer(f"asked for byte {asked}, got a body starting at {answer.start}")
    if held is not None:
        differs = [f"{what} {new!r}, was {old!r}" for what, new, old in (
            ("size", got.total, held.total), ("validator", got.validator, held.validator),
            ("digest", got.digest, held.digest)) if new != old and (what != "digest" or (new and old))]
        if differs:
            return Verdict.NEW_VERSION, "the server has another version (" + "; ".join(differs) + ")"
    return Verdict.CONTINUE, ""


def cache_filling(headers: Mapping[str, str]) -> bool:
    """Whether a caching proxy says it is still fetching this blob from the origin: a miss, in nginx's
    `X-Cache-Status` (as the shipped configs add it), squid 5's `X-Cache` (sent to every request that joined the
    fill too), or RFC 9211's `Cache-Status` without `hit` at the cache nearest to us (squid 6 sends only that one,
    `NAME;detail=match` to a request that joined the fill). Parallel parts would only wait there, for bytes the
    fill has not reached (squid) or for its end (nginx), and N nodes times parallel parts would pile onto the one
    fill; a hit, or no such header, says nothing against them."""
    for header in ("x-cache-status", "x-cache"):
        words = headers.get(header, "").split()
        if words and words[0].upper() in ("MISS", "EXPIRED"):
            return True
    status = _QUOTED.sub('""', headers.get("cache-status", ""))  # separators inside quoted strings are not ones
    if status.strip():
        nearest = status.split(",")[-1]
        params = {part.split("=", 1)[0].strip().lower() for part in nearest.split(";")[1:]}
        return "hit" not in params
    return False


def parse_content_range(value: str, unsatisfied: bool = False) -> tuple[int, int, int | None]:
    """(first, last, total) of `bytes FIRST-LAST/TOTAL` (total None for `*`); with `unsatisfied`, the 416 form
    `bytes */TOTAL` is expected and first = last = -1."""
    match = _CONTENT_RANGE.fullmatch(value.strip())
    if not match or (match.group(1) is None) != unsatisfied:
        raise BadAnswer(f"bad Content-Range {value!r}")
    total = None if match.group(3) == "*" else int(match.group(3))
    if unsatisfied:
        if total is None:
            raise BadAnswer(f"bad Content-Range {value!r}")
        return -1, -1, total
    first, last = int(match.group(1)), int(match.group(2))
    if last < first or (total is not None and last >= total):
        raise BadAnswer(f"impossible Content-Range {value!r}")
    return first, last, total


def strong_validator(headers: Mapping[str, str]) -> str | None:
    """A validator fit for If-Range: a strong ETag; or, with no ETag at all, a Last-Modified at least one second
    older than the response's Date. A weak ETag means none (a client with an ETag must not use the date)."""
    etag = headers.get("etag", "").strip()
    if etag:
        return None if etag.startswith("W/") else etag
    modified = headers.get("last-modified", "").strip()
    if not modified:
        return None
    try:
        age = (parsedate_to_datetime(headers.get("date", "")) - parsedate_to_datetime(modified)).total_seconds()
    except (TypeError, ValueError):
        return None
    return modified if age >= 1 else None


def parse_digest(headers: Mapping[str, str]) -> str | None:
    """A SHA-256 from `Repr-Digest: sha-256=:b64:` (RFC 9530) or `Digest: sha-256=b64` (RFC 3230), as hex."""
    for header in ("repr-digest", "digest"):
        for item in headers.get(header, "").split(","):
            key, _, value = item.strip().partition("=")
            if key.strip().lower() != "sha-256" or not value:
                continue
            try:
                raw = base64.b64decode(value.strip().strip(":"), validate=True)
            except (binascii.Error, ValueError):
                return None
            return raw.hex() if len(raw) == 32 else None
    return None


def _content_length(headers: Mapping[str, str]) -> int | None:
    value = headers.get("content-length", "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise BadAnswer(f"bad Content-Length {value!r}")
    return int(value)
