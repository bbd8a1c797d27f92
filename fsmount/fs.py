"""The pyfuse3 adapter: inodes <-> tree nodes, attributes, errno mapping, request deadlines.

It translates; `tree.py` decides what exists and `content.py` serves bytes. It imports no HTTP
and no service. Every handler runs under a deadline and turns any exception into an errno:
pyfuse3 lets only FUSEError out of a handler without tearing the whole mount down.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import math
import os
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import pyfuse3
import trio

from fsmount.blob import Blob, BlobStat
from fsmount.content import Content
from fsmount.errors import FetchError
from fsmount.inodes import BUDGET, InodeTable
from fsmount.lookahead import StatAhead
from fsmount.tree import Directory, File, Node

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

BLOCK_SIZE = 128 * 1024
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
XATTR_NAMESPACE = "user."
XATTR_PREFIX = "user.fsmount."
Attrs = pyfuse3.EntryAttributes
# Directories with at least this many files ask the metadata store for their sizes in one
# query when opened; smaller ones leave it to each file's getattr (a walk of many small
# directories should not pay a query for each).
_RECALL_IN_BULK = 8


def handler(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Map every failure of a request to an errno, never crash.

    The deadline is not set here but around each wait (`Operations._bounded`): a walk sends a
    few requests per directory, most answered from memory, and a cancel scope for each of
    them would cost more than the answer.
    """

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        self = args[0]
        assert isinstance(self, Operations)
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError as exc:
            if exc.errno != errno.ENOENT:
                self.stats.errors += 1
            raise
        except FetchError as exc:
            self.stats.errors += 1
            log.warning("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except trio.TooSlowError:
            self.stats.errors += 1
            log.warning("%s: no answer within %.0fs", fn.__name__, self.request_deadline)
            raise pyfuse3.FUSEError(errno.ETIMEDOUT) from None
        except Exception:
            self.stats.errors += 1
            log.exception("unexpected error in %s; answering EIO", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


@dataclass
class FuseStats:
    """What the kernel asked of us, for `fsmount status` (errors: answers other than ENOENT)."""

    bytes_served: int = 0
    reads: int = 0
    errors: int = 0
    xattr_requests: int = 0  # getxattr and listxattr, whatever their answer


class Operations(pyfuse3.Operations):
    """Read-only filesystem over a tree of nodes (the mount's root directory is `root`).

    Inodes live on the nodes themselves (`Node.ino`, `Node.lookups`) and in one map from inode
    number to node: a walk of a large archive leaves the kernel holding a reference to every
    entry it listed, so the per-inode cost here is what bounds the mount's memory.
    """

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        root: Directory,
        content: Content,
        *,
        sizes: StatAhead | None = None,
        request_deadline: float = 90.0,
        attr_timeout: float = 60.0,
        inode_budget: int = BUDGET,
    ) -> None:
        super().__init__()
        self.stats = FuseStats()
        self.request_deadline = request_deadline
        self._attr_timeout = attr_timeout
        self._content = content
        self._sizes = sizes or StatAhead(content)
        self._uid = os.getuid()
        self._gid = os.getgid()
        self._inodes = InodeTable(root, budget=inode_budget)
        self._next_fh = itertools.count(1)
        self._dir_handles: dict[int, Sequence[Node]] = {}
        self._file_handles: dict[int, tuple[Blob, BlobStat]] = {}
        self._opened_versions: dict[int, BlobStat] = {}
        self.initialized = trio.Event()

    def init(self) -> None:
        """The kernel's INIT is being answered: settings it resets on the reply (such as its
        readahead) can be changed once this event's waiters run, which is after the reply."""
        self.initialized.set()

    # ----- inode bookkeeping -------------------------------------------------------------

    def _node(self, inode: int) -> Node:
        node = self._inodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    @property
    def entries(self) -> int:
        """Files and directories the kernel holds now (bounded by the inode budget)."""
        return len(self._inodes)

    def replaced(self, old: Node, new: Node) -> None:
        self._inodes.replaced(old, new)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        try:
            for inode, nlookup in inode_list:
                if self._inodes.forget(inode, nlookup) is not None:
                    self._opened_versions.pop(inode, None)
        except Exception:
            log.exception("forget failed")  # forget must never raise

    def _used(self, directory: Directory) -> None:
        """Keep the inode table within its budget: the kernel is asked to drop the
        directories used longest ago (it sends forgets for them and what is below)."""
        self._inodes.used(directory)
        if len(self._inodes) <= self._inodes.budget:
            return
        for parent, name in self._inodes.over_budget():
            pyfuse3.invalidate_entry_async(parent, os.fsencode(name), ignore_enoent=True)

    # ----- attributes -----------------------------------------------------------------

    def _base_attributes(self, node: Node, size: int, mtime: float, timeout: float) -> Attrs:
        attrs = pyfuse3.EntryAttributes()
        if isinstance(node, Directory):
            attrs.st_mode = stat.S_IFDIR | 0o555
            attrs.st_nlink = 2
        else:
            attrs.st_mode = stat.S_IFREG | 0o444
            attrs.st_nlink = 1
        attrs.st_size = size
        attrs.st_ino = node.ino
        attrs.st_uid = self._uid
        attrs.st_gid = self._gid
        attrs.st_blksize = BLOCK_SIZE
        attrs.st_blocks = math.ceil(size / 512)
        ns = int(mtime * 1e9)
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = ns
        attrs.entry_timeout = self._attr_timeout
        attrs.attr_timeout = timeout
        return attrs

    async def _bounded(self, waiting: Awaitable[T]) -> T:
        """Wait for something remote, at most the request deadline (ETIMEDOUT after)."""
        with trio.fail_after(self.request_deadline):
            return await waiting

    async def _file_stat(self, node: File) -> BlobStat:
        """A file's exact size and version, learned now if no one knows it yet."""
        st = self._sizes.known(node)
        return st if st is not None else await self._bounded(self._content.stat(node.blob))

    async def _attributes(self, node: Node) -> Attrs:
        """Exact attributes: a file's size is learned now if it is not known yet."""
        if isinstance(node, File):
            st = await self._file_stat(node)
            mtime = st.mtime or node.mtime or 0.0
            return self._base_attributes(node, st.size, mtime, self._attr_timeout)
        return self._base_attributes(node, 0, node.mtime or 0.0, self._attr_timeout)

    def _listed_attributes(self, node: Node) -> Attrs:
        """Attributes for a directory listing, which never waits for a size.

        A file whose size is not known yet gets attributes that expire at once (timeout 0):
        the kernel keeps the entry but asks `getattr` again before it uses any attribute
        (stat, fstat, read past the end it knows, lseek from the end, mmap's fstat), so no
        program sees the placeholder; a walk that only wants names never pays for a size.
        """
        if isinstance(node, File):
            st = self._sizes.listed(node)
            if st is None:
                return self._base_attributes(node, 0, node.mtime or 0.0, 0.0)
            return self._base_attributes(
                node, st.size, st.mtime or node.mtime or 0.0, self._attr_timeout
            )
        return self._base_attributes(node, 0, node.mtime or 0.0, self._attr_timeout)

    # ----- lookups and listings -------------------------------------------------------

    def _directory(self, inode: int) -> Directory:
        node = self._node(inode)
        if not isinstance(node, Directory):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        self._used(node)
        return node

    @handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        text = os.fsdecode(name)
        parent = self._directory(parent_inode)
        if text == ".":
            return await self._attributes(parent)
        if text == "..":
            return await self._attributes(parent.parent or self._inodes.root)
        listing = parent.fresh()
        child = listing.get(text) if listing else await self._bounded(parent.child(text))
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attrs = await self._attributes(child)
        attrs.st_ino = self._inodes.remember(child)
        return attrs

    @handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._attributes(self._node(inode))

    @handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        directory = self._directory(inode)
        listing = directory.fresh() or await self._bounded(directory.children())
        files = [n.blob for n in listing.nodes if isinstance(n, File)]
        if len(files) >= _RECALL_IN_BULK:  # one query for sizes kept by earlier mounts
            self._content.recall_many(files)
        fh = next(self._next_fh)
        self._dir_handles[fh] = listing.nodes
        return fh

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dir_handles.get(fh, ())
        for index in range(start_id, len(entries)):
            child = entries[index]
            attrs = self._listed_attributes(child)
            attrs.st_ino = self._inodes.number(child)
            if not pyfuse3.readdir_reply(token, os.fsencode(child.name), attrs, index + 1):
                return
            self._inodes.remember(child)

    async def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)

    # ----- files ----------------------------------------------------------------------

    @handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if flags & WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        if not isinstance(node, File):
            raise pyfuse3.FUSEError(errno.EISDIR)
        # The kernel keeps a file's pages across opens, unless told otherwise: it is told so
        # when the remote version changed since the last open (no notification needed, so
        # nothing can deadlock against a reader holding those pages).
        version = await self._file_stat(node)
        keep = self._opened_versions.get(inode, version) == version
        self._opened_versions[inode] = version
        fh = next(self._next_fh)
        self._file_handles[fh] = (node.blob, version)  # reads of this handle stay on it
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep)

    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._file_handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        blob, version = handle
        data = await self._bounded(self._content.read(blob, off, size, version, reader=fh))
        self.stats.reads += 1
        self.stats.bytes_served += len(data)
        return data

    async def release(self, fh: int) -> None:
        self._file_handles.pop(fh, None)
        self._content.close_reader(fh)  # its queued readahead goes

    # ----- the rest of a read-only filesystem ------------------------------------------

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = BLOCK_SIZE
        data.f_frsize = BLOCK_SIZE
        data.f_namemax = 255
        return data

    @handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        self.stats.xattr_requests += 1
        text = os.fsdecode(name)
        if not text.startswith(XATTR_NAMESPACE):
            # security.selinux, system.posix_acl_*: "not supported" rather than "absent", so
            # ls, cp and rsync stop asking for this filesystem after the first file (ls -l of
            # 2,000 files otherwise costs 4,000 round trips here).
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        attrs = self._node(inode).xattrs()
        value = attrs.get(text[len(XATTR_PREFIX) :]) if text.startswith(XATTR_PREFIX) else None
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return str(value).encode()

    @handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        self.stats.xattr_requests += 1
        return [f"{XATTR_PREFIX}{name}".encode() for name in self._node(inode).xattrs()]
