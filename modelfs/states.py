"""A model's download state as the daemon reports it and the tools read it: a small JSON object, and its words.

The daemon (`snapshot`) builds these; `modelfs status` and `modelfs prefetch` read them from the
`user.modelfs.state` and `user.modelfs.entries` xattrs. What passes between the two is JSON, never text written for
people and parsed back. `describe` is the one place that puts a state into words (the `user.modelfs.progress`
xattr, the status table).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TypedDict

#: Every model that is not a router model still being fetched: a local or shared file, or a promoted download.
COMPLETE = "complete"
DOWNLOADING = "downloading"
VERIFYING = "verifying"  # every byte is on disk; length, magic and digest are checked, then it is renamed in place
PARTIAL = "partial"  # a router model with a partial file kept for resume, no download running
NOT_DOWNLOADED = "not downloaded"
FAILED = "failed"  # the last download of a router model failed


class ModelState(TypedDict, total=False):
    state: str  # one of the words above
    bytes: int  # on disk (downloading, verifying, partial)
    total: int | None  # the model's size, when known
    rate: float  # bytes per second since the download (re)started
    parts: list[list[int]]  # [start, next byte, end] of each ranged GET in flight (end -1: size unknown)
    errno: int  # failed: what readers got
    reason: str  # failed: why, for people
    cause: str  # failed download: why, from a fixed set (errors.Reason: not_found, store_full, corrupt, ...)


def describe(state: Mapping[str, Any]) -> str:
    """A state in words, e.g. `downloading 41.0% (…/… bytes) at 12.3 MB/s, 8 parts in flight`."""
    word = str(state.get("state", "unknown"))
    done = int(state.get("bytes") or 0)
    total = state.get("total")
    if word == DOWNLOADING:
        percent = f"{100 * done / total:.1f}% " if total else ""
        flight = len(state.get("parts") or ())
        parts = f", {flight} parts in flight" if flight > 1 else ""
        return f"downloading {percent}({done}/{total or '?'} bytes) at {float(state.get('rate') or 0) / 1e6:.1f} " \
               f"MB/s{parts}"
    if word == VERIFYING:
        return f"verifying ({done} bytes on disk)"
    if word == PARTIAL:
        return f"partial {done}/{total} bytes"
    if word == FAILED:
        return f"failed: {state.get('reason') or os.strerror(int(state.get('errno') or 0))}"
    return word
