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
        """Drop every cached listing (SIGHUP): the next look at a directory asks the service.

        A counter, not a list of directories: nothing here keeps a directory alive.
        """
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


Loader = Callable[["Directory"], Awaitable[Sequence[Node]]]


class Directory(Node):
    """A directory whose children are given, or listed by `loader` on first use and kept for
    the listing TTL (or until SIGHUP).

    A failed refresh keeps serving the last good listing (a service outage must not empty a
    directory the user could already see); a failed first listing raises to the reader.
    """

    __slots__ = ("_ctx", "_fresh_until", "_generation", "_listing", "_loader", "_xattrs")

    def __init__(
        self,
        name: str,
        ctx: TreeContext,
        *,
        loader: Loader | None = None,
        children: Iterable[Node] = (),
        xattrs: Mapping[str, str] = NO_XATTRS,
        mtime: float | None = None,
    ) -> None:
        super().__init__(name, mtime)
        self._ctx = ctx
        self._loader = loader
        self._xattrs = xattrs
        self._listing: Listing | None = None
        self._fresh_until = 0.0
        self._generation = ctx.generation
        if loader is None:
            self._listing = self._adopt(list(children))

    def xattrs(self) -> Mapping[str, str]:
        return self._xattrs

    def invalidate(self) -> None:
        self._fresh_until = 0.0

    def cached(self) -> Listing | None:
        """The listing if it is in memory (fresh or not): what can be had without I/O."""
        return self._listing

    def without_io(self) -> Listing | None:
        """The listing if it can be had without asking a service (a walk ahead uses this)."""
        return self._listing

    def fresh(self) -> Listing | None:
        """The listing if it can be used as it is, without waiting for anything."""
        return self._listing if self._fresh() else None

    def _fresh(self) -> bool:
        if self._listing is None:
            return False
        if self._loader is None:
            return True
        return self._generation == self._ctx.generation and time.monotonic() < self._fresh_until

    async def child(self, name: str) -> Node | None:
        """The entry called `name`, listing the directory if needed."""
        return (await self.children()).get(name)

    async def children(self) -> Listing:
        while not self._fresh():
            loading = self._ctx.loading.get(self)
            if loading is None:
                return await self._load()
            await loading.wait()
            if self._listing is not None:
                return self._listing
        assert self._listing is not None
        return self._listing

    async def _load(self) -> Listing:
        assert self._loader is not None
        self._ctx.loading[self] = done = trio.Event()
        generation = self._ctx.generation
        try:
            listing = self._adopt(list(await self._loader(self)))
        except Exception:
            if self._listing is None:
                raise
            log.warning("refreshing %s failed; serving the last listing", self.path, exc_info=True)
            listing = self._listing
        finally:
            del self._ctx.loading[self]
            done.set()
        self._listing = listing
        self._generation = generation
        self._fresh_until = time.monotonic() + self._ctx.listing_ttl
        return listing

    def _adopt(self, nodes: list[Node]) -> Listing:
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
        undated = list(_undated(kept)) if self.parent is not None or not self.name else []
        if undated:
            times = self._ctx.first_seen_many([n.path for n in undated])
            for node in undated:
                node.mtime = times[node.path]
        for node in kept:
            previous = self._previous(node.name)
            same_kind = isinstance(previous, Directory) == isinstance(node, Directory)
            if previous is not None and previous is not node and same_kind:
                self._ctx.replaced(previous, node)
        return Listing(kept)

    def _previous(self, name: str) -> Node | None:
        """The node a new listing's entry `name` replaces, if any."""
        return self._listing.get(name) if self._listing is not None else None

    def _install(self, nodes: list[Node]) -> Listing:
        """Adopt `nodes` as the listing now (a listing built without I/O)."""
        self._listing = self._adopt(nodes)
        return self._listing


def _undated(nodes: Iterable[Node]) -> Iterable[Node]:
    """Nodes without a time, looking into given (static) directories too: those are built
    before they are attached, when their paths are not known yet."""
    for node in nodes:
        if node.mtime is None:
            yield node
        if isinstance(node, Directory) and node._loader is None and node._listing is not None:
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
    """Names for (safe name, id) pairs: every member of a clash becomes `<name> (<id>)`.

    Repeated until nothing clashes, since a renamed entry can meet a name that was already
    taken (an entry literally called `a (x)`); with distinct ids this ends.
    """
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


class PlacedDirectory(Directory):
    """A directory made of a relative path inside a base directory (an item's `files/`):
    it says where it is, as its base does, without a dict of its own."""

    __slots__ = ("_base", "_relative")

    def __init__(self, name: str, base: Directory, relative: str, children: list[Node]) -> None:
        super().__init__(name, base._ctx, children=children, mtime=base.mtime)
        self._base = base
        self._relative = relative

    def xattrs(self) -> Mapping[str, str]:
        return {**self._base.xattrs(), "relative-path": self._relative}


class _Slot:
    """A directory being assembled; `claimed` when a value owns it (an image socket)."""

    __slots__ = ("claimed", "entries")

    def __init__(self) -> None:
        self.entries: dict[str, _Slot | Node] = {}
        self.claimed = False


Make = Callable[[str], Node]


class PathBuilder:
    """Places values at relative paths under one directory; the first claim of a path wins.

    Anything not in normal form, or colliding with an earlier value (the same path, or a file
    where a directory is needed), is logged and left out; the rest still shows.
    """

    def __init__(self, base: Directory) -> None:
        self._base = base
        self._root = _Slot()

    def add_file(self, relative_path: str, make: Make, what: str) -> bool:
        """Put the node made by `make(name)` at `relative_path`."""
        if not is_normal_relative_path(relative_path):
            log.warning("%s: skipping %s: unsafe path %r", self._base.path, what, relative_path)
            return False
        *dirs, name = relative_path.split("/")
        slot = self._descend(dirs, what, relative_path)
        if slot is None:
            return False
        return self._place(slot, "/".join(dirs), name, make, what)

    def add_files_in(self, relative_dir: str, files: list[tuple[str, Make]], what: str) -> bool:
        """Claim directory `relative_dir` ("" = the base itself) and put `files` in it."""
        if relative_dir == "":
            slot: _Slot | None = self._root
        elif not is_normal_relative_path(relative_dir):
            log.warning("%s: skipping %s: unsafe path %r", self._base.path, what, relative_dir)
            return False
        else:
            slot = self._descend(relative_dir.split("/"), what, relative_dir)
            if slot is not None and slot.claimed:
                log.warning(
                    "%s: skipping %s: %r is already taken", self._base.path, what, relative_dir
                )
                return False
        if slot is None:
            return False
        clash = [name for name, _ in files if name in slot.entries]
        if clash:
            log.warning("%s: skipping %s: %r already exist", self._base.path, what, clash)
            return False
        if relative_dir:
            slot.claimed = True
        for name, make in files:
            self._place(slot, relative_dir, name, make, what)
        return True

    def nodes(self) -> list[Node]:
        return self._build(self._root, "")

    def _descend(self, dirs: list[str], what: str, relative_path: str) -> _Slot | None:
        slot = self._root
        for part in dirs:
            nxt = slot.entries.get(part)
            if nxt is None:
                nxt = slot.entries[part] = _Slot()
            if not isinstance(nxt, _Slot):
                log.warning(
                    "%s: skipping %s: %r needs a directory where a file is",
                    self._base.path,
                    what,
                    relative_path,
                )
                return None
            slot = nxt
        return slot

    def _place(self, slot: _Slot, relative_dir: str, name: str, make: Make, what: str) -> bool:
        if name in slot.entries:
            log.warning(
                "%s: skipping %s: %r is already taken",
                self._base.path,
                what,
                f"{relative_dir}/{name}".lstrip("/"),
            )
            return False
        slot.entries[name] = make(name)
        return True

    def _build(self, slot: _Slot, relative: str) -> list[Node]:
        out: list[Node] = []
        for name, entry in slot.entries.items():
            if isinstance(entry, _Slot):
                inner = f"{relative}/{name}" if relative else name
                children = self._build(entry, inner)
                out.append(PlacedDirectory(name, self._base, inner, children))
            else:
                if entry.mtime is None:
                    entry.mtime = self._base.mtime
                out.append(entry)
        return out
