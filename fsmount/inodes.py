"""The inode table: which tree node each inode number the kernel holds stands for.

The kernel keeps a reference (a lookup count) to every entry it was shown, and after a walk of
a 100,000-item archive that is close to a million entries it has no reason to drop: nothing
is short of memory but this process. So the table keeps a budget. Directories are kept in the
order they were last used (a use counts for every directory above too, so an archive is never
older than the items being walked in it); when the table holds more nodes than the budget,
the oldest directories are named for invalidation: the kernel then drops them and what lies
below them (unless a process is using it) and sends the forgets that free the nodes here. A
later use of those paths is answered by a new lookup, from listings still in memory.

Inode numbers come from a counter and are never reused (the kernel may still hold a number
after it forgot it).
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict

from fsmount.tree import Directory, Node

ROOT = 1
BUDGET = 100_000  # nodes: about 20 MB of node, listing and table, whatever the archive size
_VICTIMS = 512  # directories named at once when over budget
_FREES = 4  # nodes a named directory is expected to free (itself and what is below)
_PENDING = 2.0  # seconds a named directory counts as on its way out


class InodeTable:
    def __init__(self, root: Directory, *, budget: int = BUDGET) -> None:
        root.ino = ROOT
        root.lookups = 1  # the kernel never forgets the root
        self.root = root
        self.budget = budget
        self._nodes: dict[int, Node] = {ROOT: root}
        self._next = itertools.count(ROOT + 1)
        self._used: OrderedDict[int, None] = OrderedDict()  # directories, oldest first
        self._pending: dict[int, float] = {}  # directories named for dropping: when

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, inode: int) -> Node | None:
        return self._nodes.get(inode)

    def number(self, node: Node) -> int:
        """The inode number of `node`, given now if it has none (no reference counted)."""
        if not node.ino:
            node.ino = next(self._next)
        return node.ino

    def remember(self, node: Node, count: int = 1) -> int:
        """The kernel took `count` references to `node`: it is known by its number now."""
        inode = self.number(node)
        self._nodes[inode] = node  # a refreshed listing's node stands for the old one
        node.lookups += count
        return inode

    def replaced(self, old: Node, new: Node) -> None:
        """A refreshed listing brought `new` where `old` was: it takes over the inode, so the
        kernel's references stay valid and the old node (and what hangs below it) can go."""
        if old.ino and self._nodes.get(old.ino) is old:
            new.ino, new.lookups = old.ino, old.lookups
            self._nodes[new.ino] = new

    def forget(self, inode: int, count: int) -> Node | None:
        """The kernel dropped `count` references; returns the node if it is gone now."""
        node = self._nodes.get(inode)
        if node is None or inode == ROOT:
            return None
        node.lookups -= count
        if node.lookups > 0:
            return None
        del self._nodes[inode]
        self._used.pop(inode, None)
        node.ino = node.lookups = 0
        if isinstance(node, Directory):
            node.forgotten()
        return node

    def used(self, directory: Directory) -> None:
        """`directory` was opened or looked into: it and every directory above are recent."""
        node: Node | None = directory
        while node is not None and node.ino:
            self._used[node.ino] = None
            self._used.move_to_end(node.ino)
            node = node.parent

    def over_budget(self) -> list[tuple[int, str]]:
        """(parent inode, name) of the oldest directories to drop, if over the budget.

        A directory named here counts as `_FREES` nodes on their way out until its forget
        arrives (or `_PENDING` seconds pass: the kernel keeps what a process still uses), so
        a walk that outruns the kernel's forgets does not empty the whole table.
        """
        now = time.monotonic()
        for inode, when in list(self._pending.items()):
            if when < now - _PENDING or inode not in self._nodes:
                del self._pending[inode]
        excess = len(self._nodes) - self.budget - _FREES * len(self._pending)
        oldest: list[Node] = []
        while self._used and excess > _FREES * len(oldest) and len(oldest) < _VICTIMS:
            node = self._nodes.get(self._used.popitem(last=False)[0])
            if node is not None and node.parent is not None and node.parent.ino:
                oldest.append(node)
        chosen = {node.ino for node in oldest}
        victims = []
        for node in oldest:  # a directory goes with its parent: only the topmost is named
            if node.parent is not None and not _below(node, chosen):
                self._pending[node.ino] = now
                victims.append((node.parent.ino, node.name))
        return victims


def _below(node: Node, inodes: set[int]) -> bool:
    parent = node.parent
    while parent is not None:
        if parent.ino in inodes:
            return True
        parent = parent.parent
    return False
