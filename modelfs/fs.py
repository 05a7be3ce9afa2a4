"""The FUSE layer: translates kernel requests into resolver calls and resolver answers into replies.

No policy lives here. It owns directory handles, attribute formatting, and the one place where exceptions become
errnos; inode numbers and open files (one inode per version of a model file) are `inodes`'. The mount is
read-only: every request that would change something gets EROFS.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from . import creads, metrics, names
from .errors import Failure
from .inodes import Inodes, Version
from .opener import Opener
from .passthrough import Passthrough, file_info
from .resolver import Resolver, Source
from .snapshot import Producer, Status

log = logging.getLogger(__name__)

#: How long the kernel may trust a name and its attributes; freshness of shared files hinges on it.
ENTRY_TIMEOUT = 1.0
#: How long the kernel may remember that a name does not exist.
NEGATIVE_TIMEOUT = 1.0
#: What `stat` tells readers to use as a buffer size: large reads mean few round trips to the daemon.
BLKSIZE = 1 << 20
#: Background requests (read-ahead, releases) the kernel may have in flight on the daemon path; with its default of
#: 12, reads waiting on a stopped share or a download hold every slot and other files' read-ahead queues behind
#: them (the soak in docs/performance.md). Read by the patched pyfuse3's FUSE_INIT handler.
MAX_BACKGROUND = 256
#: The extended attributes modelfs serves.
XATTR_PREFIX = "user.modelfs."

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

    # FUSE_INIT negotiates from these class attributes; mount.negotiation_difference's probe inherits them, so
    # that `modelfs restart` compares like with like.
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False
    max_background = MAX_BACKGROUND
    #: A file inode's data never changes (a new version is a new inode), but a router model's mtime does once, when
    #: its download starts: the kernel must not drop the pages it cached for it then (patched pyfuse3, 0007).
    auto_inval_data = False
    #: The patched pyfuse3 answers getxattr of every other name with ENODATA in C (`ls -l` asks each entry for
    #: ACLs and security labels); `getxattr` below does the same for an unpatched one.
    served_xattr_prefixes = (XATTR_PREFIX.encode(),)

    def __init__(self, resolver: Resolver, opener: Opener, passthrough: Passthrough | None = None) -> None:
        super().__init__()
        self.resolver = resolver
        self.passthrough = passthrough or Passthrough("off")
        self.enable_passthrough = self.passthrough.wanted  # read by the patched pyfuse3's FUSE_INIT handler
        self.inodes = Inodes(resolver, opener, self.passthrough)
        self.status = Status(resolver, opener.quota, self.passthrough, self.inodes)
        self.creads = creads.CReads()
        # Directory handles: the listing taken at opendir (None: a handle from before a restart, listed again).
        self._dirs: dict[int, tuple[str, list[tuple[str, Source | None]] | None]] = {}
        self._next_fh = 1
        self.uid = os.getuid()
        self.gid = os.getgid()

    def init(self) -> None:
        """Called in the FUSE_INIT handler, after the capabilities are negotiated and before any request."""
        self.passthrough.settle()
        dirops: Any = getattr(pyfuse3, "parallel_dirops_granted", None)  # True: offered by the kernel, requested
        if dirops is not None:
            log.info("parallel directory operations %s",
                     "requested" if dirops() else "not requested (the kernel did not offer them)")

    # Inodes and attributes.

    def _dir_path(self, inode: int) -> str:
        path = self.inodes.dir_path(inode)
        if path is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR if self.inodes.version(inode) else errno.ENOENT)
        return path

    def _version(self, inode: int) -> Version:
        version = self.inodes.version(inode)
        if version is None:
            raise pyfuse3.FUSEError(errno.EISDIR if self.inodes.dir_path(inode) is not None else errno.ENOENT)
        return version

    @staticmethod
    def _model(path: str) -> str | None:
        """The model a mount path stands for, or None for a directory."""
        parent, _, entry = path.rpartition("/")
        return names.model_of_entry(parent, entry) if path else None

    def _attrs(self, inode: int, source: Source | None) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_uid = self.uid
        attr.st_gid = self.gid
        attr.st_blksize = BLKSIZE
        # A file changed in the last seconds is not cached by name: each path walk asks again and gets an inode of
        # its own (inodes.entry), so concurrent opens of it never meet on one inode.
        timeout = ENTRY_TIMEOUT if source is None or source.trusted else 0.0
        attr.entry_timeout = timeout
        attr.attr_timeout = timeout
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

    def _entry(self, path: str, source: Source | None) -> tuple[pyfuse3.EntryAttributes, Version | None]:
        """Attributes for a name the kernel is about to learn, and the version whose lookup count it takes."""
        if source is None:
            return self._attrs(self.inodes.directory(path), None), None
        version = self.inodes.entry(path, source)
        return self._attrs(version.inode, version.source), version

    async def _find(self, path: str) -> Source | None:
        """What `path` is now: a model's source, or None for a directory; ENOENT otherwise."""
        model = self._model(path)
        if model is not None:
            try:
                return await self.resolver.resolve(model)
            except Failure as exc:
                if exc.errno != errno.ENOENT:
                    raise
        if path == "" or await self.resolver.is_dir(path):
            return None
        raise pyfuse3.FUSEError(errno.ENOENT)

    # Lookups and listings.

    @translated
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        entry = names.component(name)
        if entry.startswith("."):
            raise pyfuse3.FUSEError(errno.ENOENT)
        path = names.join(self._dir_path(parent_inode), entry)
        try:
            attrs, version = self._entry(path, await self._find(path))
            if version is not None:
                version.lookups += 1
            return attrs
        except (pyfuse3.FUSEError, Failure, names.InvalidName) as exc:
            if errno_of(exc) != errno.ENOENT:
                raise
        # A negative entry the kernel may cache briefly, so repeated misses never reach the daemon.
        negative = pyfuse3.EntryAttributes()
        negative.st_ino = 0
        negative.entry_timeout = NEGATIVE_TIMEOUT
        return negative

    @translated
    async def forget(self, inode_list: list[tuple[int, int]]) -> None:  # type: ignore[override]
        for inode, count in inode_list:
            self.inodes.forget(inode, count)

    @translated
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        # A file inode is one version: its attributes never change (a new version is a new inode).
        version = self.inodes.version(inode)
        if version is not None:
            return self._attrs(inode, version.source)
        path = self._dir_path(inode)
        if path and not await self.resolver.is_dir(path):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(inode, None)

    @translated
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        path = self._dir_path(inode)
        entries = await self.resolver.list_dir(path)
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = (path, sorted(entries.items()))
        self.inodes.recorder.dir_opened(fh, inode)
        return fh

    @translated
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        parent, entries = self._dirs[fh]
        if entries is None:
            entries = sorted((await self.resolver.list_dir(parent)).items())
            self._dirs[fh] = (parent, entries)
        for index in range(start_id, len(entries)):
            entry, source = entries[index]
            attrs, version = self._entry(names.join(parent, entry), source)
            if not pyfuse3.readdir_reply(token, entry.encode(), attrs, index + 1):
                break
            if version is not None:  # readdirplus: each entry sent is a lookup
                version.lookups += 1

    @translated
    async def releasedir(self, fh: int) -> None:
        if self._dirs.pop(fh, None) is not None:
            self.inodes.recorder.dir_released(fh)

    def dir_handles(self) -> tuple[dict[int, int], int]:
        """Open directory handles (fh -> directory inode) and the next handle number, for the restart journal."""
        inodes = {path: inode for inode, path in self.inodes.tables()[0].items()}
        return {fh: inodes[path] for fh, (path, _) in self._dirs.items() if path in inodes}, self._next_fh

    def restore_dir_handles(self, handles: dict[int, str], next_fh: int) -> None:
        """Directory handles from before a restart: listed again at their next readdir."""
        self._dirs.update((fh, (path, None)) for fh, path in handles.items())
        self._next_fh = max(self._next_fh, next_fh)

    # Open files.

    @translated
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise pyfuse3.FUSEError(errno.EROFS)
        fh, file, keep_cache = await self.inodes.open(self._version(inode))
        if not file.backing_id:
            self.creads.register(fh, file.reader)  # before the kernel learns fh: its reads never reach read()
        return file_info(fh, keep_cache, file.backing_id)

    @translated
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview | creads.FileRange:  # type: ignore[override]
        data = await self.inodes.handle(fh).reader.read(off, size)
        if isinstance(data, (bytes, memoryview)):  # a FileRange is replied by pyfuse3 from the file, and counted there
            metrics.DAEMON_READ_BYTES.inc(len(data))
        return data

    @translated
    async def release(self, fh: int) -> None:
        self.creads.unregister(fh)  # before the last handle's release closes the descriptor
        await self.inodes.release(fh)

    # Extended attributes: what modelfs did, for `getfattr` and `modelfs status` (see snapshot).

    def _xattrs(self, inode: int) -> dict[str, Producer]:
        version = self.inodes.version(inode)
        if version is None:
            return self.status.directory_xattrs(self._dir_path(inode))
        return self.status.file_xattrs(version)

    @translated
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if not name.startswith(XATTR_PREFIX.encode()):  # `ls -l` asks every entry for ACLs and labels: answer at once
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        producer = self._xattrs(inode).get(name.decode(errors="replace"))
        if producer is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return await producer()

    @translated
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [key.encode() for key in self._xattrs(inode)]

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
