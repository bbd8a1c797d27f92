"""Mountinfo, parsed in one place: paths come back exactly as they were mounted."""

from __future__ import annotations

import os
from pathlib import Path

from fsmount.mountinfo import read_mounts, unescape


def test_escaped_paths_come_back_exactly() -> None:
    assert unescape(rb"/mnt/a\040b\011c\012d") == "/mnt/a b\tc\nd"
    # A backslash is escaped too, so what follows it is never read as another escape.
    assert unescape(rb"/mnt/x\134040") == "/mnt/x\\040"
    assert unescape("/mnt/caf\u00e9".encode()) == "/mnt/caf\u00e9"
    assert unescape(b"/mnt/\xff") == os.fsdecode(b"/mnt/\xff")


def test_entries_give_device_options_and_superblock_options(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_bytes(
        b"22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
        b"90 22 0:50 / /mnt/my\\040lab ro,nosuid shared:1 master:2 - fuse.fsmount fsmount"
        b" ro,user_id=0,group_id=0,allow_other\n"
        b"garbage\n"
    )
    proc, lab = read_mounts(str(info))
    assert (proc.mount_point, proc.fstype, proc.device) == ("/proc", "proc", "0:21")
    assert (lab.mount_point, lab.fstype, lab.device) == ("/mnt/my lab", "fuse.fsmount", "0:50")
    assert lab.options == ("ro", "nosuid")
    assert lab.super_option("user_id") == "0" and lab.super_option("allow_other") == ""
    assert lab.super_option("default_permissions") is None
