"""The kernel's table of mounts, `/proc/self/mountinfo`, read in one place.

Its fields are separated by spaces, so the kernel writes a space, tab, newline or backslash in
a path as a three-digit octal escape (`\\040` for a space): a mount point with a space in its
name is only found once they are undone. Paths are bytes to the kernel; one that is not UTF-8
comes back with surrogate escapes, as `os.fsdecode` gives it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = "/proc/self/mountinfo"
FSTYPE = "fuse.fsmount"  # what fsmount mounts are, in the table (subtype=fsmount)
_ESCAPE = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    """One line of mountinfo (proc(5)), with its paths unescaped."""

    device: str  # "major:minor" of the filesystem, as /sys/class/bdi names a FUSE mount's
    mount_point: str
    options: tuple[str, ...]  # of this mount: ro, nosuid, ...
    fstype: str  # "fuse.<subtype>" for FUSE
    super_options: tuple[str, ...]  # of the superblock: user_id=0, allow_other, ...

    def super_option(self, name: str) -> str | None:
        """The value of superblock option `name` ("" for a flag), None when it is not set."""
        for option in self.super_options:
            key, equals, value = option.partition("=")
            if key == name:
                return value if equals else ""
        return None


def unescape(field: bytes) -> str:
    """A path as mountinfo writes it, back to what it is."""
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), field))


def read_mounts(path: str = MOUNTINFO) -> list[MountEntry]:
    """Every mount in the table at `path`, in its order (a later mount hides an earlier one at
    the same mount point). Lines that do not parse are skipped."""
    with open(path, "rb") as info:
        lines = info.read().splitlines()
    entries = []
    for line in lines:
        fields = line.split(b" ")
        # id, parent, major:minor, root, mount point, options, optional fields..., "-",
        # fstype, source, superblock options
        try:
            dash = fields.index(b"-", 6)
        except ValueError:
            continue
        if len(fields) < dash + 4:
            continue
        entries.append(
            MountEntry(
                device=fields[2].decode("ascii", "replace"),
                mount_point=unescape(fields[4]),
                options=tuple(os.fsdecode(fields[5]).split(",")),
                fstype=unescape(fields[dash + 1]),
                super_options=tuple(unescape(fields[dash + 3]).split(",")),
            )
        )
    return entries


def running_mounts(owner: int | None = None, mountinfo: str = MOUNTINFO) -> list[Path]:
    """Mount points of fsmount mounts, optionally only `owner`'s."""
    return [
        Path(entry.mount_point)
        for entry in read_mounts(mountinfo)
        if entry.fstype == FSTYPE and (owner is None or entry.super_option("user_id") == str(owner))
    ]


def mount_point(path: Path) -> Path:
    """The mount point `path` is on: its nearest ancestor that is one. Only the path's own
    ancestors are looked at, never other mounts (one of which may hang)."""
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path
