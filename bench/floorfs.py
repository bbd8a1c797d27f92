"""The floor of a walk through pyfuse3: a filesystem that answers every request from memory.

    python bench/floorfs.py MOUNTPOINT ITEMS

It shows ITEMS directories shaped like the scale benchmark's items (two files, `files/` with
one file, `images/ct/` with one file) and does nothing else: no listing, no record, no size,
no inode budget. A `find` of it costs what pyfuse3, trio and the kernel cost per request on
this machine, which no filesystem built on them can go below. Runs in the foreground until
unmounted.
"""

from __future__ import annotations

import errno
import stat
import sys

import pyfuse3
import trio

# One item: (name, parent index in this table or -1 for the item itself, is a directory).
SHAPE = (
    ("results.json", -1, False),
    ("predictions.csv", -1, False),
    ("files", -1, True),
    ("report.pdf", 2, False),
    ("images", -1, True),
    ("ct", 4, True),
    ("scan.mha", 5, False),
)
PER_ITEM = len(SHAPE) + 1  # inodes: the item directory, then its entries in SHAPE's order


class Floor(pyfuse3.Operations):
    """Inode 1 is the archive; item i is inode 2 + i * PER_ITEM, its entries follow it."""

    def __init__(self, items: int) -> None:
        super().__init__()
        self.items = items
        # The archive's entries, built once: rebuilt per request, they made each readdir and
        # lookup of the archive cost 100,000 steps, and the floor itself quadratic.
        self._archive = [(f"item-{n:06d}", 2 + n * PER_ITEM, True) for n in range(items)]
        self._archive_index = {name.encode(): (inode, d) for name, inode, d in self._archive}

    def _attributes(self, inode: int, directory: bool) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        attrs.st_mode = (stat.S_IFDIR | 0o555) if directory else (stat.S_IFREG | 0o444)
        attrs.st_nlink = 2 if directory else 1
        attrs.st_size = 0 if directory else 100
        attrs.entry_timeout = attrs.attr_timeout = 60.0
        return attrs

    def _children(self, inode: int) -> list[tuple[str, int, bool]]:
        if inode == pyfuse3.ROOT_INODE:
            return self._archive
        item, offset = divmod(inode - 2, PER_ITEM)
        parent = offset - 1  # -1: the item directory itself
        base = 2 + item * PER_ITEM
        return [
            (name, base + 1 + index, directory)
            for index, (name, within, directory) in enumerate(SHAPE)
            if within == parent
        ]

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        offset = (inode - 2) % PER_ITEM  # 0: an item directory, else its entry SHAPE[offset-1]
        directory = inode == pyfuse3.ROOT_INODE or offset == 0 or SHAPE[offset - 1][2]
        return self._attributes(inode, directory)

    async def lookup(
        self, parent: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent == pyfuse3.ROOT_INODE:
            if name not in self._archive_index:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attributes(*self._archive_index[name])
        for child, inode, directory in self._children(parent):
            if child.encode() == name:
                return self._attributes(inode, directory)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start: int, token: pyfuse3.ReaddirToken) -> None:
        children = self._children(fh)
        for index in range(start, len(children)):
            name, inode, directory = children[index]
            attrs = self._attributes(inode, directory)
            if not pyfuse3.readdir_reply(token, name.encode(), attrs, index + 1):
                return

    async def releasedir(self, fh: int) -> None:
        pass


def main() -> None:
    mountpoint, items = sys.argv[1], int(sys.argv[2])
    pyfuse3.init(Floor(items), mountpoint, {"fsname=floorfs", "ro", "default_permissions"})
    try:
        trio.run(pyfuse3.main, 4, 64)  # fsmount's min_tasks and max_tasks
    finally:
        pyfuse3.close()


if __name__ == "__main__":
    main()
