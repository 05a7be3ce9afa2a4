"""The routers' models as far as they are known without fetching a byte: their list, and what a HEAD said of a name.

The list is stale-while-revalidate: fetched once when first needed, then answered at once to listings and lookups,
and refreshed by a task of the mount's nursery (`run`) once it is `router_list_ttl` old, so a stalled router never
holds a request; unmount cancels that task before the router client closes. A list entry without a size gets one
from a HEAD (HEADS_AT_ONCE at a time) before it is shown or opened: a model is never shown as a 0-byte file, and a
listed name that has no file (HEAD 404) is no model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio
from cachetools import TTLCache

from .router import NotFound, Router, RouterError

log = logging.getLogger(__name__)

#: A list entry's size before a HEAD gave it (the router listed the model without `size_bytes`).
UNKNOWN = -1
#: HEAD requests for sizes in flight at once, per mount.
HEADS_AT_ONCE = 8


@dataclass
class _Head:
    """One HEAD in flight: whoever asks for the same name meanwhile waits for its answer instead of asking again."""

    done: trio.Event = field(default_factory=trio.Event)
    size: int | None = None  # None: no router has the model
    error: RouterError | None = None


class Catalog:
    """The routers' model list and HEAD answers; all on the trio loop."""

    def __init__(self, router: Router, list_ttl: float, head_ttl: float, wait: float) -> None:
        self.router = router
        self.wait = wait  # how long a listing waits for the sizes of entries listed without one
        self._list: dict[str, int] | None = None  # name -> size or UNKNOWN; None until the first fetch ended
        self._list_ttl = list_ttl
        self._fetched_at = float("-inf")  # when the last refresh began (trio clock)
        self._wanted = trio.Event()  # a listing or lookup found the list missing or stale
        self._first = trio.Event()  # the first fetch ended (with a list, or with {} if no router answered)
        self._heads: TTLCache[str, int | None] = TTLCache(maxsize=4096, ttl=head_ttl)
        self._pending: dict[str, _Head] = {}
        self._limiter = trio.CapacityLimiter(HEADS_AT_ONCE)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Refresh the list each time it was asked for while missing or stale; runs until unmount cancels it."""
        task_status.started()
        while True:
            await self._wanted.wait()
            self._wanted = trio.Event()
            await self._refresh()

    def known(self) -> dict[str, int]:
        """The list as last fetched, at once ({} before the first fetch); asks for a refresh once it is stale.

        A listing or lookup never waits on a slow or stalled router once a list is known: at worst it sees a list
        one refresh old (a model removed since then fails its open with ENOENT).
        """
        if trio.current_time() - self._fetched_at >= self._list_ttl:
            self._wanted.set()
        return self._list or {}

    async def listing(self) -> dict[str, int]:
        """The list; waits only for the very first fetch."""
        if self._list is None:
            self._wanted.set()
            await self._first.wait()
        return self.known()

    async def size(self, name: str) -> int | None:
        """The size of model `name` on the routers: from the list, else by HEAD (a model newer than the list, or
        listed without a size). None if no router has it; RouterError if none answered."""
        listed = self.known().get(name, UNKNOWN)
        if listed > 0:
            return listed
        return await self.head(name)

    async def sized(self, names: list[str]) -> dict[str, int]:
        """Sizes of listed `names` by HEAD, HEADS_AT_ONCE at a time, waiting at most `wait`. A name that has no
        file on the routers, or got no answer in time, is left out (a listing shows no model it cannot size)."""
        found: dict[str, int] = {}

        async def one(name: str) -> None:
            try:
                size = await self.head(name)
            except RouterError as exc:
                log.info("cannot size %s, listed without a size: %s", name, exc)
                return
            if size is not None:
                found[name] = size

        with trio.move_on_after(self.wait) as scope:
            async with trio.open_nursery() as nursery:
                for name in names:
                    nursery.start_soon(one, name)
        if scope.cancelled_caught:
            log.info("listing without %d of %d models listed without a size: no HEAD answer within %gs",
                     len(names) - len(found), len(names), self.wait)
        return found

    async def head(self, name: str) -> int | None:
        """What a HEAD says of `name` (its size, or None for 404), asked once at a time per name; the answer is
        kept for `head_ttl` and written into the list."""
        if name in self._heads:
            return self._heads[name]
        pending = self._pending.get(name)
        if pending is not None:
            await pending.done.wait()
            if pending.error is not None:
                raise pending.error
            return pending.size
        pending = self._pending[name] = _Head()
        try:
            async with self._limiter:
                try:
                    pending.size = (await self.router.head(name)).size
                except NotFound:
                    pending.size = None
        except RouterError as exc:
            pending.error = exc
            raise
        except BaseException:  # cancelled (a listing's wait ran out): those waiting for it must not wait forever
            pending.error = RouterError(f"HEAD of {name!r} given up")
            raise
        finally:
            del self._pending[name]
            pending.done.set()
        self._heads[name] = pending.size
        if self._list is not None and name in self._list:
            if pending.size is None:
                del self._list[name]  # listed, but no file: no model (listed again, it is asked again)
            else:
                self._list[name] = pending.size
        return pending.size

    async def _refresh(self) -> None:
        """Fetch the list, then size its unsized entries; on failure keep the old list (or {}) and try again
        once it is `router_list_ttl` old."""
        self._fetched_at = trio.current_time()
        try:
            fresh = await self.router.list_models()
        except RouterError as exc:
            log.info("keeping the routers' model list of %s: %s", "before" if self._list else "none", exc)
            if self._list is None:
                self._list = {}
            self._first.set()
            return
        old = self._list or {}
        # Until the HEADs below answer, an entry the list gives no size keeps the size a HEAD gave it before.
        self._list = {name: size if size > 0 else old.get(name, UNKNOWN) for name, size in fresh.items()}
        self._first.set()
        unsized = [name for name, size in fresh.items() if size <= 0]
        if unsized:
            self._heads.clear()  # sizes of unsized entries are as fresh as the list, no older
            async with trio.open_nursery() as nursery:
                for name in unsized:
                    nursery.start_soon(self._size_quietly, name)

    async def _size_quietly(self, name: str) -> None:
        try:
            await self.head(name)
        except RouterError as exc:
            log.info("cannot size %s, listed without a size: %s", name, exc)
