"""The words for a model's state (what `user.modelfs.progress` and the status table show) from its JSON, and the
cause label of a passthrough fallback: pure functions."""

from __future__ import annotations

import errno

from modelfs import metrics
from modelfs.states import describe


def test_each_state_in_words():
    assert describe({"state": "complete"}) == "complete"
    assert describe({"state": "not downloaded", "total": 10}) == "not downloaded"
    assert describe({"state": "downloading", "bytes": 410, "total": 1000, "rate": 2.5e6, "parts": [[0, 410, 1000]]}) \
        == "downloading 41.0% (410/1000 bytes) at 2.5 MB/s"
    assert describe({"state": "downloading", "bytes": 5, "total": None, "rate": 0, "parts": [[0, 5, -1], [8, 9, 16]]}) \
        == "downloading (5/? bytes) at 0.0 MB/s, 2 parts in flight"
    assert describe({"state": "verifying", "bytes": 1000, "total": 1000}) == "verifying (1000 bytes on disk)"
    assert describe({"state": "partial", "bytes": 3, "total": 9}) == "partial 3/9 bytes"
    assert describe({"state": "failed", "errno": errno.EIO, "reason": "HTTP 500"}) == "failed: HTTP 500"
    assert describe({"state": "failed", "errno": errno.ENOENT}) == "failed: No such file or directory"


def test_fallback_causes_are_a_small_fixed_set():
    assert metrics.fallback_cause(None) == "no_shared_mmap"
    assert metrics.fallback_cause(errno.EMFILE) == "EMFILE"
    assert metrics.fallback_cause(errno.ELOOP) == "ELOOP"
    assert metrics.fallback_cause(errno.EXDEV) == "other"
    assert set(metrics.FALLBACK_CAUSES) >= {metrics.fallback_cause(e) for e in errno.errorcode}
