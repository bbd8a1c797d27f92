"""The tree the user sees: directories with lazily listed children, files backed by Blobs.

This module decides names: what is safe as a path component, which of two colliding entries
wins, and how a service's relative paths become nested directories. Sources build nodes with
these rules; the FUSE layer only walks the result.

Nodes are small on purpose: a walk of a 100,000-item archive leaves the kernel holding close to
a million of them, so they carry slots, not dicts, a parent pointer instead of a path string
(`path` is derived), and no per-node copies of what their directory already knows. Sources
subclass `File` and `Directory` to compute blobs and extended attributes from one compact
record when asked, instead of storing them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import trio

from fsmount.blob import Blob

log = logging.getLogger(__name__)

NAME_MAX = 255  # bytes, as the kernel counts them
_INDEXED = 16  # listings longer than this get a name index; shorter ones are scanned
NO_XATTRS: Mapping[str, str] = {}


def _keep(old: Node, new: Node) -> None:
    """The default for `TreeContext.replaced`: nothing outside the tree keeps nodes."""


@dataclass
class TreeContext:
    """What every directory shares: the listing TTL, the first-seen clock (kept on disk), and
    the generation that SIGHUP advances.

    `replaced(old, new)` is called when a refreshed listing brings a new node for a name that
    had one (same kind): the FUSE layer hands the old node's inode to the new one, so the
    kernel's view stays valid and the old subtree can be freed.
    """

    first_seen_many: Callable[[list[str]], Mapping[str, float]]
    listing_ttl: float = 300.0
    generation: int = 0
    replaced: Callable[[Node, Node], None] = _keep
    loading: dict[Directory, trio.Event] = field(default_factory=dict)

    def invalidate_all(self) -> None:
        """SIGHUP: every listing is asked for again before use (a counter, not a list of
        directories: nothing here keeps a directory alive)."""
        self.generation += 1


class Node:
    """Something with a name under a parent directory.

    `ino` and `lookups` are the FUSE layer's bookkeeping (the inode number the kernel knows
    this node by, and how many references the kernel holds); the tree only moves them from an
    old node to its replacement through `TreeContext.replaced`.
    """

    __slots__ = ("ino", "lookups", "mtime", "name", "parent")

    def __init__(self, name: str, mtime: float | None = None) -> None:
        self.name = name
        self.parent: Directory | None = None
        self.mtime = mtime
        self.ino = 0
        self.lookups = 0

    @property
    def path(self) -> str:
        """Where the node is, from the mount root ("" for the root itself)."""
        parts: list[str] = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return "/".join(reversed(parts))

    def xattrs(self) -> Mapping[str, str]:
        """Extended attributes (names without the `user.fsmount.` prefix)."""
        return NO_XATTRS

    def succeeds(self, previous: Node, ctx: TreeContext) -> None:
        """A refreshed listing brought this node where `previous` was (same name and kind)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path!r}>"


class File(Node):
    """A regular file; `blob` names its bytes. Sources may compute the blob on each access."""

    __slots__ = ("_blob", "_xattrs")

    def __init__(
        self,
        name: str,
        blob: Blob | None = None,
        *,
        mtime: float | None = None,
        xattrs: Mapping[str, str] = NO_XATTRS,
    ) -> None:
        super().__init__(name, mtime)
        self._blob = blob
        self._xattrs = xattrs

    @property
    def blob(self) -> Blob:
        assert self._blob is not None, f"{self.path}: a file without content"
        return self._blob

    def xattrs(self) -> Mapping[str, str]:
        blob_attrs = getattr(self.blob, "xattrs", None)
        return {**self._xattrs, **blob_attrs} if blob_attrs else self._xattrs


class Listing:
    """A directory's entries in the service's order, findable by name."""

    __slots__ = ("_index", "nodes")

    def __init__(self, nodes: Sequence[Node]) -> None:
        self.nodes = tuple(nodes)
        self._index = {n.name: n for n in self.nodes} if len(self.nodes) > _INDEXED else None

    def get(self, name: str) -> Node | None:
        if self._index is not None:
            return self._index.get(name)
        for node in self.nodes:
            if node.name == name:
                return node
        return None


class Directory(Node):
    """A directory whose entries are known when it is made (or, in subclasses, built later
    without I/O). `ctx`, if given, dates undated entries by the time the cache first saw them,
    once their paths are known (see `_adopt`)."""

    __slots__ = ("_listing", "_predecessor", "_xattrs")

    def __init__(
        self,
        name: str,
        ctx: TreeContext | None = None,
        *,
        children: Iterable[Node] = (),
        xattrs: Mapping[str, str] = NO_XATTRS,
        mtime: float | None = None,
    ) -> None:
        super().__init__(name, mtime)
        self._xattrs = xattrs
        self._listing: Listing | None = None
        self._predecessor: Listing | None = None
        self._listing = self._adopt(list(children), ctx)

    def xattrs(self) -> Mapping[str, str]:
        return self._xattrs

    def cached(self) -> Listing | None:
        """The listing if it is in memory (fresh or not): what can be had without I/O."""
        return self._listing

    def without_io(self) -> Listing | None:
        """The listing if it can be had without asking a service (a walk ahead uses this)."""
        return self._listing

    def fresh(self) -> Listing | None:
        """The listing if it can be used as it is, without waiting for anything."""
        return self._listing

    async def children(self) -> Listing:
        listing = self.fresh()
        assert listing is not None
        return listing

    async def child(self, name: str) -> Node | None:
        """The entry called `name`, listing the directory if needed."""
        return (await self.children()).get(name)

    def _adopt(self, nodes: list[Node], ctx: TreeContext | None) -> Listing:
        """Name -> node; first wins on a clash; undated entries take the time the cache first
        saw their path. Entries that replace an entry of the last listing are announced
        (`TreeContext.replaced`) so their inode carries over."""
        seen: set[str] = set()
        kept: list[Node] = []
        for node in nodes:
            if node.name in seen:
                log.warning("%s: two entries named %r; keeping the first", self.path, node.name)
                continue
            seen.add(node.name)
            node.parent = self
            kept.append(node)
        if ctx is None:
            return Listing(kept)
        attached = self.parent is not None or not self.name  # else paths are not known yet
        undated = list(_undated(kept)) if attached else []
        if undated:
            times = ctx.first_seen_many([n.path for n in undated])
            for node in undated:
                node.mtime = times[node.path]
        for node in kept:
            previous = self._previous(node.name)
            same_kind = isinstance(previous, Directory) == isinstance(node, Directory)
            if previous is not None and previous is not node and same_kind:
                ctx.replaced(previous, node)
                node.succeeds(previous, ctx)
        return Listing(kept)

    def succeeds(self, previous: Node, ctx: TreeContext) -> None:
        """Entries take over the inodes of the entries of the same names in `previous`: now
        for entries known already, else when this directory is first listed. A refresh then
        leaves the kernel's view (and its page cache) of unchanged files alone."""
        old = previous.cached() if isinstance(previous, Directory) else None
        if old is None:
            return
        if self._listing is None:
            self._predecessor = old
            return
        for node in self._listing.nodes:
            before = old.get(node.name)
            if before is not None and isinstance(before, Directory) == isinstance(node, Directory):
                ctx.replaced(before, node)
                node.succeeds(before, ctx)

    def _previous(self, name: str) -> Node | None:
        """The node a new listing's entry `name` replaces, if any."""
        listing = self._listing if self._listing is not None else self._predecessor
        return listing.get(name) if listing is not None else None

    def forgotten(self) -> None:
        """The kernel no longer knows this directory: what it can rebuild, it may drop."""

    def install(self, nodes: list[Node], ctx: TreeContext | None = None) -> Listing:
        """Adopt `nodes` as the listing now (one built without I/O)."""
        self._listing = self._adopt(nodes, ctx)
        self._predecessor = None
        return self._listing


Loader = Callable[["ListedDirectory"], Awaitable[Sequence[Node]]]


class ListedDirectory(Directory):
    """A directory listed by `loader` on first use and kept for the listing TTL (or until
    SIGHUP).

    Once the TTL is up, the listing in hand is still served while a new one is asked for
    behind it: a walk of 100,000 items outlives any TTL, and must not stop while 100 pages
    come again. After SIGHUP (the user asked for what is there now) readers wait for the
    new listing. A failed refresh keeps serving the last good listing (a service outage must
    not empty a directory the user could already see); a failed first listing raises to the
    reader.
    """

    __slots__ = ("_ctx", "_fresh_until", "_generation", "_loader")

    def __init__(
        self,
        name: str,
        ctx: TreeContext,
        *,
        loader: Loader,
        xattrs: Mapping[str, str] = NO_XATTRS,
    ) -> None:
        super().__init__(name, xattrs=xattrs)
        self._listing = None  # listed on first use
        self._ctx = ctx
        self._loader = loader
        self._fresh_until = 0.0
        self._generation = ctx.generation

    def fresh(self) -> Listing | None:
        if self._generation != self._ctx.generation or time.monotonic() >= self._fresh_until:
            return None
        return self._listing

    async def children(self) -> Listing:
        while (listing := self.fresh()) is None:
            loading = self._ctx.loading.get(self)
            stale = self._listing if self._generation == self._ctx.generation else None
            if loading is None:  # the first listing, or one after SIGHUP, or the TTL is up
                self._ctx.loading[self] = trio.Event()
                if stale is None:
                    return await self._load()
                trio.lowlevel.spawn_system_task(self._load)  # behind the stale one
            if stale is not None:
                return stale
            await loading.wait()
            if self._listing is not None:
                return self._listing
        return listing

    async def _load(self) -> Listing:
        """Adopt the loader's listing; raises only with no listing to fall back on (so never
        as a refresh behind readers, a task of its own). The caller set `ctx.loading`."""
        done = self._ctx.loading[self]
        generation = self._ctx.generation
        try:
            listing = self._adopt(list(await self._loader(self)), self._ctx)
        except Exception:
            if self._listing is None:
                raise
            log.warning("refreshing %s failed; serving the last listing", self.path, exc_info=True)
            listing = self._listing
        finally:
            del self._ctx.loading[self]
            done.set()
        self._listing = listing
        self._predecessor = None
        self._generation = generation
        self._fresh_until = time.monotonic() + self._ctx.listing_ttl
        return listing


def _undated(nodes: Iterable[Node]) -> Iterable[Node]:
    """Nodes without a time, in static directories too (built before their paths exist)."""
    for node in nodes:
        if node.mtime is None:
            yield node
        if type(node) is Directory and node._listing is not None:
            yield from _undated(node._listing.nodes)


def _clean(name: str) -> str:
    name = name.replace("/", "_").replace("\0", "")
    return "_" + name[1:] if name.startswith(".") else name


def safe_name(name: str, fallback: str) -> str:
    """A service's display name made safe as one path component (product.md's rules)."""
    for candidate in (_clean(name), _clean(fallback)):
        if candidate and len(candidate.encode("utf-8", "surrogateescape")) <= NAME_MAX:
            return candidate
    return "_"


def unique_names(entries: list[tuple[str, str]]) -> list[str]:
    """Names for (safe name, id) pairs: every member of a clash becomes `<name> (<id>)`,
    until nothing clashes (a renamed entry can meet a name taken already: `a (x)`)."""
    names = [name for name, _ in entries]
    for _ in range(len(names) + 1):
        counts: dict[str, int] = {}
        for name in names:
            counts[name] = counts.get(name, 0) + 1
        if all(count == 1 for count in counts.values()):
            break
        names = [
            name if counts[name] == 1 else safe_name(f"{name} ({_clean(ident)})", ident)
            for name, (_, ident) in zip(names, entries, strict=True)
        ]
    return names


def is_normal_relative_path(path: str) -> bool:
    """True when `path` is already normal: relative, no `.`/`..`/empty component, no NUL."""
    if not path or "\0" in path or path.startswith("/"):
        return False
    return all(
        part not in ("", ".", "..") and len(part.encode("utf-8", "surrogateescape")) <= NAME_MAX
        for part in path.split("/")
    )


def split_relative_path(path: str) -> tuple[str, ...] | None:
    """The parts of `path` if it is normal, else None: sources split a socket's path once
    and give every item the same strings, not one copy of `images`, `ct`... per item."""
    return tuple(path.split("/")) if is_normal_relative_path(path) else None


class PlacedDirectory(Directory):
    """A directory of a relative path in a base directory (an item's `files/`)."""

    __slots__ = ("_base",)

    def __init__(self, name: str, base: Directory, children: list[Node]) -> None:
        super().__init__(name, children=children, mtime=base.mtime)
        self._base = base

    def xattrs(self) -> Mapping[str, str]:
        parts: list[str] = []
        node: Node = self
        while node is not self._base and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return {**self._base.xattrs(), "relative-path": "/".join(reversed(parts))}


class _Slot:
    """A directory being assembled; `claimed` when a value owns it (an image socket)."""

    __slots__ = ("claimed", "entries")

    def __init__(self) -> None:
        self.entries: dict[str, _Slot | Node] = {}
        self.claimed = False


Make = Callable[[str], Node]
Parts = str | Sequence[str] | None  # a relative path, or its parts as `split_relative_path` made


class PathBuilder:
    """Places values at relative paths under one directory; the first claim of a path wins.

    A path not in normal form, or colliding with an earlier value (the same path, or a file
    where a directory is needed), is logged (naming `what`) and left out; the rest shows.
    """

    def __init__(self, base: Directory) -> None:
        self._base = base
        self._root = _Slot()

    def add_file(self, relative_path: Parts, make: Make, what: object) -> bool:
        """Put the node made by `make(name)` at `relative_path`."""
        parts = self._parts(relative_path, what)
        if not parts:
            return False
        slot = self._descend(parts[:-1], what, parts)
        if slot is None:
            return False
        return self._place(slot, parts, make, what)

    def add_files_in(
        self, relative_dir: Parts, files: list[tuple[str, Make]], what: object
    ) -> bool:
        """Claim directory `relative_dir` ("" = the base itself) and put `files` in it."""
        if relative_dir == "" or relative_dir == ():
            slot: _Slot | None = self._root
            parts: Sequence[str] = ()
        else:
            parts = self._parts(relative_dir, what) or ()
            if not parts:
                return False
            slot = self._descend(parts, what, parts)
            if slot is not None and slot.claimed:
                self._skip(what, f"{'/'.join(parts)!r} is already taken")
                return False
        if slot is None:
            return False
        clash = [name for name, _ in files if name in slot.entries]
        if clash:
            self._skip(what, f"{clash!r} already exist")
            return False
        if parts:
            slot.claimed = True
        for name, make in files:
            self._place(slot, (*parts, name), make, what)
        return True

    def nodes(self) -> list[Node]:
        return self._build(self._root)

    def _parts(self, relative_path: Parts, what: object) -> Sequence[str] | None:
        parts = (
            split_relative_path(relative_path) if isinstance(relative_path, str) else relative_path
        )
        if not parts:
            self._skip(what, f"unsafe path {relative_path!r}")
        return parts

    def _skip(self, what: object, why: str) -> None:
        log.warning("%s: skipping %s: %s", self._base.path, what, why)

    def _descend(self, dirs: Sequence[str], what: object, path: Sequence[str]) -> _Slot | None:
        slot = self._root
        for part in dirs:
            nxt = slot.entries.get(part)
            if nxt is None:
                nxt = slot.entries[part] = _Slot()
            if not isinstance(nxt, _Slot):
                self._skip(what, f"{'/'.join(path)!r} needs a directory where a file is")
                return None
            slot = nxt
        return slot

    def _place(self, slot: _Slot, parts: Sequence[str], make: Make, what: object) -> bool:
        name = parts[-1]
        if name in slot.entries:
            self._skip(what, f"{'/'.join(parts)!r} is already taken")
            return False
        slot.entries[name] = make(name)
        return True

    def _build(self, slot: _Slot) -> list[Node]:
        out: list[Node] = []
        for name, entry in slot.entries.items():
            if isinstance(entry, _Slot):
                out.append(PlacedDirectory(name, self._base, self._build(entry)))
            else:
                if entry.mtime is None:
                    entry.mtime = self._base.mtime
                out.append(entry)
        return out
