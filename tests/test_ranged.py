"""The ranged-GET protocol (modelfs.ranged), pure: request headers, parsing of 200/206/416 answers, validators,
digests, what an answer means for the bytes already on disk, and whether a caching proxy says it is still filling."""

from __future__ import annotations

import base64
import hashlib

import pytest

from modelfs.ranged import (
    Answer,
    BadAnswer,
    Verdict,
    Version,
    cache_filling,
    judge,
    parse,
    parse_content_range,
    parse_digest,
    request_headers,
    strong_validator,
)

SIZE = 1000
V = Version(SIZE, '"v1"', None)


def test_request_headers_ask_a_range_guarded_by_if_range_once_a_validator_is_known():
    assert request_headers(0, None, None) == {"Range": "bytes=0-"}
    assert request_headers(100, 200, None) == {"Range": "bytes=100-199"}
    assert request_headers(5, None, '"abc"') == {"Range": "bytes=5-", "If-Range": '"abc"'}
    assert request_headers(0, 1, "Tue, 01 Dec 2026 10:00:00 GMT")["If-Range"] == "Tue, 01 Dec 2026 10:00:00 GMT"


@pytest.mark.parametrize(("value", "expected"), [
    ("bytes 0-999/1000", (0, 999, 1000)),
    ("bytes 10-19/*", (10, 19, None)),
    ("BYTES  5-5/6", (5, 5, 6)),
    (" bytes 0-0/1 ", (0, 0, 1)),
])
def test_content_range_is_parsed(value, expected):
    assert parse_content_range(value) == expected


@pytest.mark.parametrize("value", ["", "bytes 0-9", "bytes 9-0/10", "bytes 0-10/10", "bytes */10", "items 0-1/2",
                                   "bytes 0-1/2, 4-5/6", "bytes -1-5/10", "bytes 0-x/10"])
def test_bad_content_range_is_a_bad_answer(value):
    with pytest.raises(BadAnswer):
        parse_content_range(value)


def test_unsatisfied_content_range_of_a_416():
    assert parse_content_range("bytes */1234", unsatisfied=True) == (-1, -1, 1234)
    for value in ("bytes */*", "bytes 0-1/2", ""):
        with pytest.raises(BadAnswer):
            parse_content_range(value, unsatisfied=True)


def test_parse_a_206():
    answer = parse(206, {"content-range": "bytes 100-199/1000", "content-length": "100", "etag": '"v1"'})
    assert answer == Answer(206, 100, 100, Version(1000, '"v1"', None))
    assert parse(206, {"content-range": "bytes 0-9/10"}).length == 10  # no Content-Length: the span says
    with pytest.raises(BadAnswer):  # the two disagree
        parse(206, {"content-range": "bytes 0-9/10", "content-length": "11"})
    with pytest.raises(BadAnswer):  # a 206 must say which bytes
        parse(206, {"content-length": "10"})


def test_parse_a_200_and_a_416():
    assert parse(200, {"content-length": "1000"}) == Answer(200, 0, 1000, Version(1000, None, None))
    assert parse(200, {}) == Answer(200, 0, None, Version(None, None, None))  # to the end of the body
    assert parse(416, {"content-range": "bytes */500"}) == Answer(416, 0, 0, Version(500, None, None))
    with pytest.raises(BadAnswer):
        parse(416, {})
    with pytest.raises(BadAnswer):
        parse(200, {"content-length": "12abc"})
    with pytest.raises(BadAnswer):
        parse(204, {})


@pytest.mark.parametrize(("headers", "expected"), [
    ({"etag": '"abc"'}, '"abc"'),
    ({"etag": 'W/"abc"'}, None),  # weak: may not guard a range
    ({"etag": 'W/"abc"', "last-modified": "Mon, 30 Nov 2026 10:00:00 GMT",
      "date": "Tue, 01 Dec 2026 10:00:00 GMT"}, None),  # a client with an ETag must not fall back on the date
    ({"last-modified": "Mon, 30 Nov 2026 10:00:00 GMT", "date": "Tue, 01 Dec 2026 10:00:00 GMT"},
     "Mon, 30 Nov 2026 10:00:00 GMT"),  # a date a second or more older than the response: strong
    ({"last-modified": "Tue, 01 Dec 2026 10:00:00 GMT", "date": "Tue, 01 Dec 2026 10:00:00 GMT"}, None),
    ({"last-modified": "Mon, 30 Nov 2026 10:00:00 GMT"}, None),  # no Date: cannot tell
    ({"last-modified": "yesterday", "date": "Tue, 01 Dec 2026 10:00:00 GMT"}, None),
    ({}, None),
])
def test_only_strong_validators_guard_ranges(headers, expected):
    assert strong_validator(headers) == expected


def test_digests_from_repr_digest_and_digest():
    data = b"GGUF model bytes"
    b64 = base64.b64encode(hashlib.sha256(data).digest()).decode()
    hexdigest = hashlib.sha256(data).hexdigest()
    assert parse_digest({"repr-digest": f"sha-256=:{b64}:"}) == hexdigest
    assert parse_digest({"repr-digest": f"sha-512=:AAAA:, sha-256=:{b64}:"}) == hexdigest
    assert parse_digest({"digest": f"SHA-256={b64}"}) == hexdigest
    assert parse_digest({"digest": "md5=abc"}) is None
    assert parse_digest({"digest": "sha-256=not base64!"}) is None
    assert parse_digest({"digest": "sha-256=" + base64.b64encode(b"short").decode()}) is None  # not 32 bytes
    assert parse_digest({}) is None


def test_a_206_of_the_same_version_at_the_byte_asked_continues():
    answer = Answer(206, 100, 900, V)
    assert judge(answer, 100, V) == (Verdict.CONTINUE, "")
    assert judge(answer, 100, None) == (Verdict.CONTINUE, "")  # nothing kept yet: any version starts
    with pytest.raises(BadAnswer):
        judge(answer, 50, V)  # bytes not asked for


@pytest.mark.parametrize(("got", "why"), [
    (Version(SIZE + 1, '"v1"', None), "size"),
    (Version(SIZE, '"v2"', None), "validator"),
    (Version(SIZE, None, None), "validator"),
])
def test_a_206_of_another_version_is_a_new_version(got, why):
    verdict, reason = judge(Answer(206, 0, SIZE, got), 0, V)
    assert verdict is Verdict.NEW_VERSION and why in reason


def test_digests_decide_only_when_both_sides_have_one():
    held = Version(SIZE, '"v1"', "aa" * 32)
    assert judge(Answer(206, 0, SIZE, Version(SIZE, '"v1"', "bb" * 32)), 0, held)[0] is Verdict.NEW_VERSION
    assert judge(Answer(206, 0, SIZE, Version(SIZE, '"v1"', None)), 0, held)[0] is Verdict.CONTINUE
    assert judge(Answer(206, 0, SIZE, Version(SIZE, '"v1"', "aa" * 32)), 0, V)[0] is Verdict.CONTINUE


def test_a_200_is_the_whole_file_and_a_416_a_new_version():
    assert judge(Answer(200, 0, SIZE, V), 500, V)[0] is Verdict.WHOLE
    verdict, why = judge(Answer(416, 0, 0, Version(400, None, None)), 500, V)
    assert verdict is Verdict.NEW_VERSION and "400 bytes" in why


@pytest.mark.parametrize(("headers", "filling"), [
    ({"x-cache-status": "MISS"}, True),  # nginx, as the shipped configs add it
    ({"x-cache": "MISS from cache-1"}, True),  # squid, also to requests collapsed onto the fill
    ({"x-cache-status": "EXPIRED"}, True),  # nginx refetching a stale entry
    ({"x-cache": "miss from cache-1"}, True),
    ({"x-cache-status": "HIT"}, False),
    ({"x-cache": "HIT from cache-1"}, False),
    ({"x-cache-status": "UPDATING"}, False),  # a stale entry served while it is refreshed: all there
    ({"x-cache-status": ""}, False),
    ({}, False),  # no cache in front, or one that says nothing: parallel parts as usual
    # RFC 9211, as squid 6 sends it (seen from squid 6.13): the fill, a request joined to it, a hit.
    ({"cache-status": "vm;detail=mismatch"}, True),
    ({"cache-status": "vm;detail=match"}, True),
    ({"cache-status": "vm;hit;detail=match"}, False),
    ({"cache-status": "origin-cache;hit, edge;fwd=miss;stored"}, True),  # the cache nearest to us is the last
    ({"cache-status": "origin-cache;fwd=miss, edge;hit;ttl=30"}, False),
    ({"cache-status": 'edge;hit;detail="a; b, c"'}, False),  # separators inside a quoted string
    ({"cache-status": r'edge;hit;detail="a \" ; b, c"'}, False),  # and after an escaped quote in it
    ({"cache-status": r'edge;detail="x, y;hit"'}, True),  # `hit` inside a quoted string is not the parameter
    ({"cache-status": " "}, False),
])
def test_a_cache_that_says_it_is_filling_is_recognised(headers, filling):
    assert cache_filling(headers) is filling
