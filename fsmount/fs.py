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
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from fsmount.blob import BlobStat
from fsmount.content import Content
from fsmount.errors import FetchError
from fsmount.tree import Directory, File, Node

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

BLOCK_SIZE = 128 * 1024
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
XATTR_PREFIX = "user.fsmount."


def handler(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Run a request under the mount's deadline; map every failure to an errno, never crash."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        self = args[0]
        assert isinstance(self, Operations)
        try:
            with trio.fail_after(self.request_deadline):
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


class Operations(pyfuse3.Operations):
    """Read-only filesystem over a tree of nodes (the mount's root directory is `root`)."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        root: Directory,
        content: Content,
        *,
        request_deadline: float = 90.0,
        attr_timeout: float = 60.0,
    ) -> None:
        super().__init__()
        self.stats = FuseStats()
        self.request_deadline = request_deadline
        self._attr_timeout = attr_timeout
        self._content = content
        self._uid = os.getuid()
        self._gid = os.getgid()
        self._nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: root}
        self._parents: dict[int, int] = {pyfuse3.ROOT_INODE: pyfuse3.ROOT_INODE}
        self._inodes: dict[str, int] = {root.path: pyfuse3.ROOT_INODE}
        self._lookups: dict[int, int] = {}
        self._next_inode = itertools.count(pyfuse3.ROOT_INODE + 1)
        self._next_fh = itertools.count(1)
        self._dir_handles: dict[int, list[tuple[bytes, Node, pyfuse3.EntryAttributes]]] = {}
        self._file_handles: dict[int, tuple[File, BlobStat]] = {}
        self._opened_versions: dict[int, BlobStat] = {}
        self.initialized = trio.Event()

    def init(self) -> None:
        """The kernel's INIT is being answered: settings it resets on the reply (such as its
        readahead) can be changed once this event's waiters run, which is after the reply."""
        self.initialized.set()

    # ----- inode bookkeeping -------------------------------------------------------------

    def _node(self, inode: int) -> Node:
        node = self._nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _remember(self, node: Node, parent: int, count: int = 1) -> int:
        """The inode for `node` (new, or the one its path already has), its lookup count +1."""
        inode = self._inodes.get(node.path)
        if inode is None:
            inode = next(self._next_inode)
            self._inodes[node.path] = inode
        self._nodes[inode] = node  # a refreshed listing's node replaces the old one
        self._parents[inode] = parent
        self._lookups[inode] = self._lookups.get(inode, 0) + count
        return inode

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        try:
            for inode, nlookup in inode_list:
                left = self._lookups.get(inode, 0) - nlookup
                if left > 0 or inode == pyfuse3.ROOT_INODE:
                    self._lookups[inode] = max(left, 0)
                    continue
                self._lookups.pop(inode, None)
                self._opened_versions.pop(inode, None)
                node = self._nodes.pop(inode, None)
                self._parents.pop(inode, None)
                if node is not None:
                    self._inodes.pop(node.path, None)
        except Exception:
            log.exception("forget failed")  # forget must never raise

    # ----- attributes -----------------------------------------------------------------

    async def _attributes(self, node: Node, inode: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        mtime = node.mtime or 0.0
        if isinstance(node, Directory):
            attrs.st_mode = stat.S_IFDIR | 0o555
            attrs.st_nlink = 2
            attrs.st_size = 0
        else:
            assert isinstance(node, File) and node.blob is not None
            st = await self._content.stat(node.blob)
            attrs.st_mode = stat.S_IFREG | 0o444
            attrs.st_nlink = 1
            attrs.st_size = st.size
            mtime = st.mtime or mtime
        attrs.st_ino = inode
        attrs.st_uid = self._uid
        attrs.st_gid = self._gid
        attrs.st_blksize = BLOCK_SIZE
        attrs.st_blocks = math.ceil(attrs.st_size / 512)
        ns = int(mtime * 1e9)
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = ns
        attrs.entry_timeout = self._attr_timeout
        attrs.attr_timeout = self._attr_timeout
        return attrs

    # ----- lookups and listings -------------------------------------------------------

    async def _child(self, parent: int, name: str) -> Node:
        node = self._node(parent)
        if not isinstance(node, Directory):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        child = (await node.children()).get(name)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return child

    @handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        text = os.fsdecode(name)
        if text == ".":
            return await self._attributes(self._node(parent_inode), parent_inode)
        if text == "..":
            grand = self._parents.get(parent_inode, pyfuse3.ROOT_INODE)
            return await self._attributes(self._node(grand), grand)
        child = await self._child(parent_inode, text)
        attrs = await self._attributes(child, self._inodes.get(child.path, 0))
        attrs.st_ino = self._remember(child, parent_inode)
        return attrs

    @handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._attributes(self._node(inode), inode)

    @handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        if not isinstance(node, Directory):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        children = list((await node.children()).values())
        await self._content.stat_many(c.blob for c in children if isinstance(c, File) and c.blob)
        entries = []
        for child in children:
            try:
                attrs = await self._attributes(child, 0)
            except FetchError as exc:
                log.warning("%s: left out of the listing: %s", child.path, exc)
                continue
            entries.append((os.fsencode(child.name), child, attrs))
        fh = next(self._next_fh)
        self._dir_handles[fh] = entries
        return fh

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dir_handles.get(fh, [])
        for index in range(start_id, len(entries)):
            name, child, attrs = entries[index]
            inode = self._inodes.get(child.path)
            attrs.st_ino = inode if inode is not None else self._peek_inode(child)
            if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                return
            self._remember(child, self._parent_of(child), 1)

    def _peek_inode(self, node: Node) -> int:
        """Assign an inode without counting a lookup (counted once readdir_reply accepts it)."""
        inode = next(self._next_inode)
        self._inodes[node.path] = inode
        self._nodes[inode] = node
        self._lookups.setdefault(inode, 0)
        return inode

    def _parent_of(self, node: Node) -> int:
        parent_path = node.path.rpartition("/")[0]
        return self._inodes.get(parent_path, pyfuse3.ROOT_INODE)

    async def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)

    # ----- files ----------------------------------------------------------------------

    @handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if flags & WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        if not isinstance(node, File) or node.blob is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        # The kernel keeps a file's pages across opens, unless told otherwise: it is told so
        # when the remote version changed since the last open (no notification needed, so
        # nothing can deadlock against a reader holding those pages).
        version = await self._content.stat(node.blob)
        keep = self._opened_versions.get(inode, version) == version
        self._opened_versions[inode] = version
        fh = next(self._next_fh)
        self._file_handles[fh] = (node, version)  # reads of this handle stay on this version
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep)

    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._file_handles.get(fh)
        if handle is None or handle[0].blob is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        node, version = handle
        data = await self._content.read(node.blob, off, size, version, reader=fh)
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
        value = self._xattrs(self._node(inode)).get(os.fsdecode(name))
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value.encode()

    @handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [name.encode() for name in self._xattrs(self._node(inode))]

    @staticmethod
    def _xattrs(node: Node) -> dict[str, str]:
        attrs: dict[str, Any] = dict(node.xattrs)
        if isinstance(node, File) and node.blob is not None:
            attrs.update(getattr(node.blob, "xattrs", {}))
        return {f"{XATTR_PREFIX}{k}": str(v) for k, v in attrs.items()}
