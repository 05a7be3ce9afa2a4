"""The routers' catalog: its logic by itself (a stand-in router object and trio's mock clock), then on a real mount
with the test router listing models without a size, or listing a model that has no file."""

from __future__ import annotations

import errno
import json
import os
import time
from typing import Any

import pytest
import trio
import trio.testing

from modelfs.router import NotFound, RemoteModel, RouterError
from tests.support.models import gguf_bytes, write_model

MB = 1 << 20
UNKNOWN = -1  # a list entry's size before a HEAD gave it (catalog.UNKNOWN)


class StandIn:
    """What the catalog uses of `Router`: the list and HEAD, with a delay, a failure or a hang on demand."""

    urls = ("http://router",)

    def __init__(self, listed: dict[str, int], files: dict[str, int]) -> None:
        self.listed = listed
        self.files = files
        self.heads: list[str] = []
        self.lists = 0
        self.hang: set[str] = set()
        self.list_fails = False

    async def list_models(self) -> dict[str, int]:
        self.lists += 1
        await trio.sleep(0.01)
        if self.list_fails:
            raise RouterError("no router listed its models")
        return dict(self.listed)

    async def head(self, name: str) -> RemoteModel:
        self.heads.append(name)
        if name in self.hang:
            await trio.sleep_forever()
        await trio.sleep(0.01)
        if name not in self.files:
            raise NotFound(name)
        return RemoteModel(name, self.files[name], self.urls[0])


def run(test: object, router: StandIn, ttl: float = 10.0, wait: float = 5.0) -> None:
    """Run `test(catalog)` with the catalog's refresh task beside it, as the mount's nursery would."""

    from modelfs.catalog import Catalog

    async def main() -> None:
        catalog = Catalog(router, ttl, 2.0, wait)  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            await nursery.start(catalog.run)
            await test(catalog)  # type: ignore[operator]
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_entries_listed_without_a_size_are_sized_once_and_those_without_a_file_dropped():
    router = StandIn({"a": 10, "b": UNKNOWN, "c": UNKNOWN, "ghost": UNKNOWN}, {"a": 10, "b": 20, "c": 30})

    async def test(catalog: Any) -> None:
        listed = await catalog.listing()  # the first fetch; sizes come in the background
        assert listed["a"] == 10
        # Two listings at once ask for the same sizes: each name is asked once.
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(catalog.sized, ["b", "c", "ghost"])
        assert await catalog.sized(["b", "c", "ghost"]) == {"b": 20, "c": 30}
        assert sorted(router.heads) == ["b", "c", "ghost"]
        assert catalog.known() == {"a": 10, "b": 20, "c": 30}  # the file-less entry is no model
        assert await catalog.size("ghost") is None
        assert await catalog.size("a") == 10 and router.heads.count("a") == 0  # listed with a size: no HEAD

    run(test, router)


def test_a_stale_list_answers_at_once_and_is_refreshed_in_the_background():
    router = StandIn({"a": 10}, {"a": 10, "new": 5})

    async def test(catalog: Any) -> None:
        assert await catalog.listing() == {"a": 10}
        assert router.lists == 1
        await trio.sleep(11)  # past router_list_ttl
        router.listed = {"a": 10, "new": 5}
        assert catalog.known() == {"a": 10}  # at once, the old list: the refresh is only asked for
        await trio.sleep(1)
        assert catalog.known() == {"a": 10, "new": 5} and router.lists == 2
        router.list_fails = True
        await trio.sleep(11)
        catalog.known()
        await trio.sleep(1)
        assert router.lists == 3 and catalog.known() == {"a": 10, "new": 5}  # a failed refresh keeps the list

    run(test, router)


def test_a_listing_waits_for_sizes_at_most_its_bound_and_a_given_up_head_strands_nobody():
    router = StandIn({"a": UNKNOWN, "slow": UNKNOWN}, {"a": 10, "slow": 20})
    router.hang = {"slow"}

    async def test(catalog: Any) -> None:
        await catalog.listing()
        started = trio.current_time()
        assert await catalog.sized(["a", "slow"]) == {"a": 10}
        assert trio.current_time() - started <= 1.0 + 0.1
        router.hang = set()
        # The background sizing's HEAD of `slow` still hangs in the stand-in; a new ask waits for that one.
        with trio.move_on_after(3):
            assert await catalog.size("slow") in (20, None)

    run(test, router, wait=1.0)


def test_a_head_failure_is_an_error_not_an_absent_model():
    router = StandIn({}, {})

    async def failing(name: str) -> RemoteModel:
        raise RouterError("HTTP 503")

    router.head = failing  # type: ignore[method-assign]

    async def test(catalog: Any) -> None:
        with pytest.raises(RouterError):
            await catalog.size("x")
        assert await catalog.sized(["x"]) == {}

    run(test, router)


@pytest.mark.io_paths
def test_a_router_listing_models_without_sizes_shows_their_real_sizes(mount, router, dirs):
    """llmlb may list models without `size_bytes`: each is sized by HEAD before it is shown or opened, never a
    0-byte file; a listed model without a file is ENOENT, promptly."""
    r = router()
    data = {"org/a": gguf_bytes(MB + 1), "org/b": gguf_bytes(2 * MB + 3), "top": gguf_bytes(3 * MB + 5)}
    for name, content in data.items():
        write_model(r.models_dir, name, content)
    write_model(r.models_dir, "local", gguf_bytes(4 * MB))
    write_model(dirs["store"], "local", b"GGUF-the store's")
    r.control(list_sizes=False, list_extra=["org/ghost", "ghost"])
    m = mount("--router", r.url)
    assert sorted(os.listdir(m.path)) == ["local.gguf", "org", "top.gguf"]
    assert sorted(os.listdir(m.path / "org")) == ["a.gguf", "b.gguf"]
    for name, content in data.items():
        assert os.stat(m.model(name)).st_size == len(content)
    heads = [q["name"] for q in r.stats()["requests"] if q["method"] == "HEAD"]
    assert heads.count("org/a") == 1  # each name sized once (the refresh and the listings share the answer)
    for name in ("org/ghost", "ghost"):
        started = time.monotonic()
        with pytest.raises(FileNotFoundError):
            open(m.model(name), "rb")
        assert time.monotonic() - started < 1.0
    with open(m.model("org/b"), "rb") as f:  # the first open reads the whole model, not nothing
        assert f.read() == data["org/b"]
    state = json.loads(os.getxattr(m.model("top"), "user.modelfs.state"))
    assert state == {"state": "not downloaded", "total": len(data["top"])}
    assert r.blob_gets("top") == 0


def test_a_model_gone_since_it_was_sized_reads_enoent_never_an_empty_file(mount, router):
    """As with a list that has sizes: a model removed from the router after the list (here: its HEAD) was taken
    opens, and its read fails with ENOENT once the router says 404."""
    r = router()
    write_model(r.models_dir, "org/gone", gguf_bytes(MB))
    r.control(list_sizes=False)
    m = mount("--router", r.url)
    assert os.listdir(m.path / "org") == ["gone.gguf"]
    assert os.stat(m.model("org/gone")).st_size == MB
    (r.models_dir / "org" / "gone" / "model.gguf").unlink()
    with open(m.model("org/gone"), "rb") as f, pytest.raises(OSError) as info:
        f.read()
    assert info.value.errno == errno.ENOENT
