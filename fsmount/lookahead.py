"""Stat-ahead: when a program asks for sizes one file after another, probe the next ones.

`ls -l`, `du`, `rsync` and `cp -r` stat the files of a tree one at a time, in the order the
directories list them. Each unknown size costs a round trip to storage, so done one after the
other they take the sum of all round trips. Once two stats of unknown sizes follow each other
closely, the files that come next in that walk (depth first, in listing order, below the two
files' closest common directory) are probed ahead of the program, a bounded window at a time:
it then finds most sizes already known.

What is never done: a probe before a program asked about a second file (a single `stat` or
`open` costs that file's probe only); a probe of a blob whose probe costs the service work
(`RemoteBlob.costly_probe`: a Scenario conversion); a listing request (the walk ahead only
enters directories listed already or listable without I/O); a walk ahead from the mount root
or a service's root.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator

from fsmount.blob import BlobStat, RemoteBlob
from fsmount.content import Content
from fsmount.tree import Directory, File, Node

WINDOW = 128  # probes started ahead of a program and not asked for yet, per walk
FOLLOWS = 2.0  # seconds within which a second stat counts as following the first
WALKS = 8  # walks followed at once (a `du` and an `ls -lR` side by side)
_MIN_DEPTH = 2  # a walk ahead stays inside one archive, collection or listing


class _Walk:
    """Files after a starting point in one subtree, and the probes started ahead in it."""

    __slots__ = ("ahead", "files")

    def __init__(self, top: Directory, start: File) -> None:
        self.files = _files_after(top, start)
        self.ahead: set[str] = set()  # blob keys probed ahead, not asked for yet


class StatAhead:
    """Exact sizes for the FUSE layer, probed ahead of programs that walk."""

    def __init__(self, content: Content, *, window: int = WINDOW, follows: float = FOLLOWS):
        self._content = content
        self._window = window
        self._follows = follows
        self._walks: deque[_Walk] = deque(maxlen=WALKS)
        self._last: tuple[File, float] | None = None

    async def stat(self, node: File) -> BlobStat:
        """The exact size and time of `node`, probed now if unknown."""
        blob = node.blob
        if isinstance(blob, RemoteBlob) and self._content.recalled(blob) is None:
            self._asked(node, blob)
        return await self._content.stat(blob)

    def _asked(self, node: File, blob: RemoteBlob) -> None:
        """A program wants an unknown size: follow the walk it is part of, or start one."""
        now = time.monotonic()
        for walk in self._walks:
            if blob.key in walk.ahead:
                walk.ahead.discard(blob.key)
                self._top_up(walk)
                self._last = (node, now)
                return
        last, self._last = self._last, (node, now)
        if last is None or last[0] is node or now - last[1] > self._follows:
            return
        top = _common_directory(last[0], node)
        if top is None or _depth(top) < _MIN_DEPTH:
            return
        walk = _Walk(top, node)
        self._walks.append(walk)
        self._top_up(walk)

    def _top_up(self, walk: _Walk) -> None:
        batch: list[RemoteBlob] = []
        for file in walk.files:
            blob = file.blob
            if isinstance(blob, RemoteBlob) and not blob.costly_probe:
                batch.append(blob)
            if len(walk.ahead) + len(batch) >= self._window:
                break
        self._content.recall_many(batch)  # one query for sizes kept by an earlier mount
        for blob in batch:
            if self._content.known(blob) is None:
                walk.ahead.add(blob.key)
                self._content.guess(blob)


def _ancestors(node: Node) -> list[Directory]:
    chain: list[Directory] = []
    parent = node.parent
    while parent is not None:
        chain.append(parent)
        parent = parent.parent
    return chain


def _depth(directory: Directory) -> int:
    return len(_ancestors(directory))


def _common_directory(a: Node, b: Node) -> Directory | None:
    """The deepest directory holding both nodes."""
    mine = {id(d) for d in _ancestors(a)}
    for directory in _ancestors(b):
        if id(directory) in mine:
            return directory
    return None


def _files_after(top: Directory, start: Node) -> Iterator[File]:
    """The files below `top` that a depth-first walk in listing order meets after `start`."""
    node = start
    while node is not top and node.parent is not None:
        parent = node.parent
        listing = parent.cached()
        if listing is None:
            return
        at = listing.position(node)
        if at < 0:  # a refreshed listing no longer holds it: nothing to follow
            return
        for sibling in listing.nodes[at + 1 :]:
            yield from _files_below(sibling)
        node = parent


def _files_below(node: Node) -> Iterator[File]:
    if isinstance(node, File):
        yield node
    elif isinstance(node, Directory):
        listing = node.without_io()
        if listing is not None:
            for child in listing.nodes:
                yield from _files_below(child)
