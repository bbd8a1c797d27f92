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
from collections.abc import Iterator, Sequence

from fsmount.blob import BlobStat, RemoteBlob
from fsmount.content import Content
from fsmount.tree import Directory, File, Listing, Node

WINDOW = 128  # probes started ahead of a program and not asked for yet, per walk
FOLLOWS = 2.0  # seconds within which a second stat counts as following the first
WALKS = 8  # walks followed at once (a `du` and an `ls -lR` side by side)
_MIN_DEPTH = 2  # a walk ahead stays inside one archive, collection or listing
_NEAR = 8  # entries a program may skip (all sizes known) between two it asks about


class _Walk:
    """Files after a starting point in one subtree, and the probes started ahead in it."""

    __slots__ = ("ahead", "files")

    def __init__(self, files: Iterator[File]) -> None:
        self.files = files
        self.ahead: set[str] = set()  # blob keys probed ahead, not asked for yet


class StatAhead:
    """Exact sizes for the FUSE layer, probed ahead of programs that walk."""

    def __init__(self, content: Content, *, window: int = WINDOW, follows: float = FOLLOWS):
        self._content = content
        self._window = window
        self._follows = follows
        self._walks: deque[_Walk] = deque(maxlen=WALKS)
        self._last: tuple[File, float] | None = None

    def known(self, node: File) -> BlobStat | None:
        """The size if it can be had without a request (memory, or the metadata store).

        Every stat comes through here, answered or not: it moves a walk on, and an unknown
        size that follows another may start one.
        """
        blob = node.blob
        if not isinstance(blob, RemoteBlob):
            return self._content.known(blob)
        followed = self._followed(node, blob)
        st = self._content.recalled(blob)
        if st is None and not followed:
            self._asked(node, blob)
        return st

    def listed(self, node: File) -> BlobStat | None:
        """The size if known without I/O, for a directory listing, which never waits.

        A file a walk guessed, listed with its size known, is a stat the kernel will answer
        from that listing without asking: the walk moves on here, or its window would drain
        and the program would wait for every size again (`du` of many item folders).
        """
        blob = node.blob
        if isinstance(blob, RemoteBlob):
            self._followed(node, blob)
        return self._content.known(blob)

    def _followed(self, node: File, blob: RemoteBlob) -> bool:
        """True if a walk had guessed this file (probed or not yet): it moves on by one."""
        for walk in self._walks:
            if blob.key in walk.ahead:
                walk.ahead.discard(blob.key)
                self._top_up(walk)
                self._last = (node, time.monotonic())
                return True
        return False

    def _asked(self, node: File, blob: RemoteBlob) -> None:
        """A program wants an unknown size no walk guessed: it may start a walk."""
        now = time.monotonic()
        last, self._last = self._last, (node, now)
        if last is None or last[0] is node or now - last[1] > self._follows:
            return
        top = _common_directory(last[0], node)
        if top is None or _depth(top) < _MIN_DEPTH:
            return
        files = _walk_from(top, last[0], node)
        if files is None:
            return
        walk = _Walk(files)
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


def _branch(top: Directory, node: Node) -> Node:
    """The entry of `top` on the way down to `node`."""
    while node.parent is not top and node.parent is not None:
        node = node.parent
    return node


def _walk_from(top: Directory, before: Node, now: Node) -> Iterator[File] | None:
    """What a program that asked about `before`, then `now`, will ask about next.

    Below `top`, programs take entries in listing order (`du DIR`, `ls -l`, `rsync`,
    `cp -r`), or, at the top, by name (`du DIR/*`, whose names the shell sorted, `ls -lR`,
    which sorts before it recurses). The two stats tell which: `now` comes a few entries
    after `before` in one of those orders. If in neither, nothing is guessed.
    """
    listing = top.cached()
    if listing is None:
        return None
    first, second = _branch(top, before), _branch(top, now)
    for ordered in _orders(listing):
        at_first, at_second = _index(ordered, first), _index(ordered, second)
        if at_first >= 0 and 0 < at_second - at_first <= _NEAR:
            return _files_after(top, ordered, now)
    return None


def _orders(listing: Listing) -> Iterator[Sequence[Node]]:
    """The listing's order, then (only if asked for) the names' order."""
    yield listing.nodes
    yield sorted(listing.nodes, key=lambda n: n.name)


def _files_after(top: Directory, ordered: Sequence[Node], start: Node) -> Iterator[File]:
    """The files below `top` that a depth-first walk meets after `start`, taking `top`'s
    entries in `ordered` order and every deeper directory's in listing order."""
    node = start
    while node.parent is not None:
        parent = node.parent
        siblings = ordered if parent is top else _nodes(parent.cached())
        at = _index(siblings, node)
        if at < 0:  # a refreshed listing no longer holds it: nothing to follow
            return
        for sibling in siblings[at + 1 :]:
            yield from _files_below(sibling)
        if parent is top:
            return
        node = parent


def _nodes(listing: Listing | None) -> Sequence[Node]:
    return () if listing is None else listing.nodes


def _index(nodes: Sequence[Node], node: Node) -> int:
    for at, candidate in enumerate(nodes):
        if candidate is node:
            return at
    return -1


def _files_below(node: Node) -> Iterator[File]:
    if isinstance(node, File):
        yield node
    elif isinstance(node, Directory):
        listing = node.without_io()
        if listing is not None:
            for child in listing.nodes:
                yield from _files_below(child)
