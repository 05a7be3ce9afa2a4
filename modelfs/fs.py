"""The FUSE layer: translates kernel requests into resolver calls and resolver answers into replies.

No policy lives here. It owns inode numbers (one per mount path, stable while mounted, never reused), open file
and directory handles, attribute formatting, and the one place where exceptions become errnos. The mount is
read-only: every request that would change something gets EROFS.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from . import __version__, metrics, names
from .errors import Failure
from .readers import Reader
from .resolver import Resolver, Source

log = logging.getLogger(__name__)

#: How long the kernel may trust a name and its attributes; freshness of shared files hinges on it.
ENTRY_TIMEOUT = 1.0
#: How long the kernel may remember that a name does not exist.
NEGATIVE_TIMEOUT = 1.0
#: What `stat` tells readers to use as a buffer size: large reads mean few round trips to the daemon.
BLKSIZE = 1 << 20

P = ParamSpec("P")
R = TypeVar("R")


def errno_of(exc: BaseException) -> int:
    """The one mapping from an exception to what the kernel sees."""
    err = getattr(exc, "errno", None)
    return err if isinstance(err, int) and err > 0 else errno.EIO


def translated(handler: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Turn any failure of a handler into a FUSEError, logging the unexpected ones."""

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except (Failure, OSError, names.InvalidName) as exc:
            log.debug("%s: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(errno_of(exc)) from None
        except Exception:
            log.exception("unexpected error in %s", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def read_only(*_args: Any, **_kwargs: Any) -> Any:
    raise pyfuse3.FUSEError(errno.EROFS)


class ModelFS(pyfuse3.Operations):
    """`/models`: `<name>.gguf` files, with a directory for each `/` in a name."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, resolver: Resolver) -> None:
        super().__init__()
        self.resolver = resolver
        self._paths: dict[int, str] = {pyfuse3.ROOT_INODE: ""}
        self._inodes: dict[str, int] = {"": pyfuse3.ROOT_INODE}
        self._next_inode = pyfuse3.ROOT_INODE + 1
        self._files: dict[int, tuple[str, Reader]] = {}
        self._dirs: dict[int, tuple[str, list[tuple[str, Source | None]]]] = {}
        self._next_fh = 1
        self.uid = os.getuid()
        self.gid = os.getgid()

    # Inodes and attributes.

    def _inode(self, path: str) -> int:
        inode = self._inodes.get(path)
        if inode is None:
            inode = self._inodes[path] = self._next_inode
            self._paths[inode] = path
            self._next_inode += 1
        return inode

    def _path(self, inode: int) -> str:
        try:
            return self._paths[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    @staticmethod
    def _model(path: str) -> str | None:
        """The model a mount path stands for, or None for a directory."""
        parent, _, entry = path.rpartition("/")
        return names.model_of_entry(parent, entry) if path else None

    def _attrs(self, path: str, source: Source | None) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = self._inode(path)
        attr.st_uid = self.uid
        attr.st_gid = self.gid
        attr.st_blksize = BLKSIZE
        attr.entry_timeout = ENTRY_TIMEOUT
        attr.attr_timeout = ENTRY_TIMEOUT
        if source is None:
            attr.st_mode = stat.S_IFDIR | 0o555
            attr.st_nlink = 2
            mtime = self.resolver.started_ns
        else:
            attr.st_mode = stat.S_IFREG | 0o444
            attr.st_nlink = 1
            attr.st_size = source.size
            attr.st_blocks = (source.size + 511) // 512
            mtime = source.mtime_ns
        attr.st_mtime_ns = attr.st_ctime_ns = attr.st_atime_ns = mtime
        return attr

    async def _stat(self, path: str) -> pyfuse3.EntryAttributes:
        model = self._model(path)
        if model is not None:
            try:
                return self._attrs(path, await self.resolver.resolve(model))
            except Failure as exc:
                if exc.errno != errno.ENOENT:
                    raise
        if path == "" or await self.resolver.is_dir(path):
            return self._attrs(path, None)
        raise pyfuse3.FUSEError(errno.ENOENT)

    # Lookups and listings.

    @translated
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        entry = names.component(name)
        if entry.startswith("."):
            raise pyfuse3.FUSEError(errno.ENOENT)
        path = names.join(self._path(parent_inode), entry)
        try:
            return await self._stat(path)
        except (pyfuse3.FUSEError, Failure, names.InvalidName) as exc:
            if errno_of(exc) != errno.ENOENT:
                raise
        # A negative entry the kernel may cache briefly, so repeated misses never reach the daemon.
        negative = pyfuse3.EntryAttributes()
        negative.st_ino = 0
        negative.entry_timeout = NEGATIVE_TIMEOUT
        return negative

    @translated
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._stat(self._path(inode))

    @translated
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        path = self._path(inode)
        if self._model(path) is not None and not await self.resolver.is_dir(path):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        entries = await self.resolver.list_dir(path)
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = (path, sorted(entries.items()))
        return fh

    @translated
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        parent, entries = self._dirs[fh]
        for index in range(start_id, len(entries)):
            entry, source = entries[index]
            attrs = self._attrs(names.join(parent, entry), source)
            if not pyfuse3.readdir_reply(token, entry.encode(), attrs, index + 1):
                break

    @translated
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # Open files.

    @translated
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise pyfuse3.FUSEError(errno.EROFS)
        model = self._model(self._path(inode))
        if model is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        reader, keep_cache = await self.resolver.open(model)
        fh = self._next_fh
        self._next_fh += 1
        self._files[fh] = (model, reader)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache)

    @translated
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        data = await self._files[fh][1].read(off, size)
        metrics.DAEMON_READ_BYTES.inc(len(data))
        return data

    @translated
    async def release(self, fh: int) -> None:
        model, reader = self._files.pop(fh)
        await self.resolver.close(model, reader)

    # Extended attributes: what modelfs did, for `getfattr` and `modelfs status`.

    async def _xattrs(self, inode: int) -> dict[str, bytes]:
        path = self._path(inode)
        model = self._model(path)
        if model is None:
            entries = {"user.modelfs.entries": json.dumps(await self.resolver.describe_dir(path)).encode()}
            if path:
                return entries
            status = {"version": __version__, **self.resolver.status()}
            store = status["store"]
            assert isinstance(store, dict)
            return {"user.modelfs.version": __version__.encode(),
                    "user.modelfs.store_usage": str(store["usage_bytes"]).encode(),
                    "user.modelfs.shared": json.dumps(status["shared"]).encode(),
                    "user.modelfs.routers": json.dumps(status["routers"]).encode(),
                    "user.modelfs.status": json.dumps(status).encode(), **entries}
        source = await self.resolver.resolve(model)
        return {"user.modelfs.source": source.kind.encode(), "user.modelfs.path": str(source.path).encode(),
                "user.modelfs.progress": (await self.resolver.progress(model)).encode()}

    @translated
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if not name.startswith(b"user.modelfs."):  # `ls -l` asks every entry for ACLs and labels: answer at once
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        value = (await self._xattrs(inode)).get(name.decode(errors="replace"))
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @translated
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [key.encode() for key in await self._xattrs(inode)]

    @translated
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.resolver.store.root)
        data = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
            setattr(data, field, getattr(st, field))
        data.f_namemax = names.NAME_MAX
        return data

    # Everything that would change the namespace or a file.
    setattr = create = mknod = mkdir = symlink = link = unlink = rmdir = rename = write = read_only
    setxattr = removexattr = read_only
