"""The tree the user sees: directories with lazily listed children, files backed by Blobs.

This module decides names: what is safe as a path component, which of two colliding entries
wins, and how a service's relative paths become nested directories. Sources build nodes with
these rules; the FUSE layer only walks the result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

import trio

from fsmount.blob import Blob

log = logging.getLogger(__name__)

NAME_MAX = 255  # bytes, as the kernel counts them


@dataclass
class TreeContext:
    """What every directory shares: the listing TTL and the first-seen clock (kept on disk)."""

    first_seen_many: Callable[[Iterable[str]], Mapping[str, float]]
    listing_ttl: float = 300.0
    directories: list[Directory] = field(default_factory=list)  # for invalidate_all

    def invalidate_all(self) -> None:
        """Drop every cached listing (SIGHUP): the next look at a directory asks the service."""
        for directory in self.directories:
            directory.invalidate()


@dataclass(eq=False)
class Node:
    """Something with a name at a stable `path` (the identity the FUSE layer keys inodes by)."""

    name: str
    path: str
    mtime: float | None = None
    xattrs: dict[str, str] = field(default_factory=dict)


@dataclass(eq=False)
class File(Node):
    blob: Blob | None = None


Loader = Callable[["Directory"], Awaitable[list[Node]]]


class Directory(Node):
    """A directory whose children are listed on first use and kept for the listing TTL.

    A failed refresh keeps serving the last good listing (a service outage must not empty a
    directory the user could already see); a failed first listing raises to the reader.
    """

    def __init__(
        self,
        name: str,
        path: str,
        ctx: TreeContext,
        *,
        loader: Loader | None = None,
        children: Iterable[Node] = (),
        xattrs: dict[str, str] | None = None,
    ) -> None:
        super().__init__(name=name, path=path, xattrs=xattrs or {})
        self._ctx = ctx
        self._loader = loader
        self._listing: dict[str, Node] | None = None
        self._loaded_at = 0.0
        self._loading: trio.Event | None = None
        if loader is None:
            self._listing = self._index(list(children))
        else:
            ctx.directories.append(self)

    def child_path(self, name: str) -> str:
        return f"{self.path}/{name}" if self.path else name

    def invalidate(self) -> None:
        self._loaded_at = 0.0

    def cached_children(self) -> Mapping[str, Node] | None:
        return self._listing

    async def children(self) -> Mapping[str, Node]:
        while True:
            fresh = time.monotonic() - self._loaded_at < self._ctx.listing_ttl
            if self._listing is not None and (self._loader is None or fresh):
                return self._listing
            if self._loading is None:
                break
            await self._loading.wait()
            if self._listing is not None:
                return self._listing
        assert self._loader is not None
        self._loading = done = trio.Event()
        try:
            nodes = await self._loader(self)
        except Exception:
            if self._listing is None:
                raise
            log.warning("refreshing %s failed; serving the last listing", self.path, exc_info=True)
            self._loaded_at = time.monotonic()
            return self._listing
        finally:
            self._loading = None
            done.set()
        self._listing = self._index(nodes)
        self._loaded_at = time.monotonic()
        return self._listing

    def _index(self, nodes: list[Node]) -> dict[str, Node]:
        """Name -> node; first wins on a clash; undated nodes get their first-seen time."""
        listing: dict[str, Node] = {}
        for node in nodes:
            if node.name in listing:
                log.warning("%s: two entries named %r; keeping the first", self.path, node.name)
                continue
            listing[node.name] = node
        undated = [n.path for n in listing.values() if n.mtime is None]
        if undated:
            seen = self._ctx.first_seen_many(undated)
            for node in listing.values():
                if node.mtime is None:
                    node.mtime = seen[node.path]
        return listing


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


class _Slot:
    """A directory being assembled; `claimed` when a value owns it (an image socket)."""

    def __init__(self) -> None:
        self.entries: dict[str, _Slot | Node] = {}
        self.claimed = False


class PathBuilder:
    """Places values at relative paths under one directory; the first claim of a path wins.

    Anything not in normal form, or colliding with an earlier value (the same path, or a file
    where a directory is needed), is logged and left out; the rest still shows.
    """

    def __init__(self, base: Directory, ctx: TreeContext) -> None:
        self._base = base
        self._ctx = ctx
        self._root = _Slot()

    def add_file(self, relative_path: str, make: Callable[[str, str], Node], what: str) -> bool:
        """Put the node made by `make(name, path)` at `relative_path`."""
        if not is_normal_relative_path(relative_path):
            log.warning("%s: skipping %s: unsafe path %r", self._base.path, what, relative_path)
            return False
        *dirs, name = relative_path.split("/")
        slot = self._descend(dirs, what, relative_path)
        if slot is None:
            return False
        return self._place(slot, "/".join(dirs), name, make, what)

    def add_files_in(
        self, relative_dir: str, files: list[tuple[str, Callable[[str, str], Node]]], what: str
    ) -> bool:
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
        return self._build(self._root, self._base.path)

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

    def _place(
        self,
        slot: _Slot,
        relative_dir: str,
        name: str,
        make: Callable[[str, str], Node],
        what: str,
    ) -> bool:
        if name in slot.entries:
            log.warning(
                "%s: skipping %s: %r is already taken",
                self._base.path,
                what,
                f"{relative_dir}/{name}".lstrip("/"),
            )
            return False
        prefix = self._base.child_path(relative_dir) if relative_dir else self._base.path
        slot.entries[name] = make(name, f"{prefix}/{name}")
        return True

    def _build(self, slot: _Slot, path: str) -> list[Node]:
        out: list[Node] = []
        for name, entry in slot.entries.items():
            if isinstance(entry, _Slot):
                child_path = f"{path}/{name}"
                children = self._build(entry, child_path)
                # A directory made of a relative path says where it is, as its item does.
                relative = child_path.removeprefix(self._base.path).lstrip("/")
                xattrs = {**self._base.xattrs, "relative-path": relative}
                out.append(Directory(name, child_path, self._ctx, children=children, xattrs=xattrs))
            else:
                out.append(entry)
        return out
