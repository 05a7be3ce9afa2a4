"""How many bytes the store holds, and room for downloads under `store_max_size`.

Nothing here walks the store or deletes a file on the trio loop. The store is walked once, at mount start, in a
worker thread; from then on the count follows what modelfs does to it: a download's bytes count as it writes them,
it is settled when it ends (promoted, kept for resume or discarded), and an eviction subtracts what it freed.
Evictions (a walk for the markers, then unlinks of multi-GB files) run in a worker thread too. A download reserves
its full size when it begins, so two downloads never count on the same free space. Files an admin adds or removes
by hand while mounted are counted at the next mount.
"""

from __future__ import annotations

import errno
import logging

import trio

from . import metrics
from .errors import Failure
from .fetcher import Fetcher
from .store import Store, StoreFull

log = logging.getLogger(__name__)

#: How often the usage is handed to the metrics (whose thread must never read the loop's state itself).
PUBLISH_EVERY = 1.0


class Quota:
    """The store's usage, kept current on the trio loop, and evictions in worker threads."""

    def __init__(self, store: Store, limit: int | None, fetcher: Fetcher | None) -> None:
        self.store = store
        self.limit = limit
        self.fetcher = fetcher
        # Bytes of the store's files, with each download in progress at what its files held when it began.
        self._resting = 0
        self._counted = trio.Event()
        self._active: dict[str, tuple[int, int]] = {}  # downloading model -> (bytes when it began, its size)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Count the store once, in a worker thread; then hand the usage to the metrics every PUBLISH_EVERY."""
        task_status.started()
        self._resting = await trio.to_thread.run_sync(self.store.usage, abandon_on_cancel=True)  # only reads
        self._counted.set()
        while True:
            metrics.STORE_BYTES.set(self.usage())
            await trio.sleep(PUBLISH_EVERY)

    async def counted(self) -> int:
        """The usage, once the mount's first count is done (at once after that)."""
        await self._counted.wait()
        return self.usage()

    def usage(self) -> int:
        """Bytes the store holds now; downloads in progress count what they have written so far."""
        self._settle()
        usage = self._resting
        for name, (began, _size) in self._active.items():
            usage += self._written(name, began) - began
        return usage

    def _written(self, name: str, began: int) -> int:
        download = self.fetcher.downloads.get(name) if self.fetcher else None
        return download.progress if download is not None else began

    def _settle(self) -> None:
        """Downloads that ended: count what their files hold now instead of what they held when they began (a few
        `stat`s of local files)."""
        running = self.fetcher.downloads if self.fetcher else {}
        for name in [name for name in self._active if name not in running]:
            began, _size = self._active.pop(name)
            self._resting += self.store.model_bytes(name) - began

    async def reserve(self, name: str, size: int, busy: set[str]) -> None:
        """Before `name`'s download begins: note what its files hold now and, with a quota, make room for its
        `size` bytes by evicting least-recently-used downloaded models not in `busy`. Failure(ENOSPC) if even that
        would not make room. The caller serializes reservations (one eviction decision at a time)."""
        await self._counted.wait()
        self._settle()
        began = await trio.to_thread.run_sync(self.store.model_bytes, name)
        if self.limit:
            committed = self._resting + sum(max(s, self._written(n, b)) - b for n, (b, s) in self._active.items())
            excess = committed - began + size - self.limit
            if excess > 0:
                with trio.CancelScope(shield=True):  # what was freed is counted, whatever happens to the opener
                    try:
                        freed = await trio.to_thread.run_sync(self.store.evict, excess,
                                                              busy | set(self._active) | {name})
                    except StoreFull as exc:
                        log.error("cannot download %s (%d bytes) under the quota of %d bytes: %s", name, size,
                                  self.limit, exc)
                        raise Failure(errno.ENOSPC, str(exc)) from None
                    self._resting -= freed
        self._active[name] = (began, size)
