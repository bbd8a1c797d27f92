"""`fsmount unmount`: fusermount3 -u, and lazily when the mount is busy."""

from __future__ import annotations

import argparse
import subprocess
from collections.abc import Sequence
from pathlib import Path

from fsmount.commands.output import EXIT_FAILED, error, warn


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mountpoint", metavar="MOUNTPOINT")


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    mountpoint = str(Path(args.mountpoint).absolute())
    result = subprocess.run(
        ["fusermount3", "-u", mountpoint], capture_output=True, text=True, check=False
    )
    if result.returncode == 0:
        return 0
    if "busy" in result.stderr.lower():
        warn(f"{mountpoint} is busy; unmounting lazily")
        lazy = subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False)
        return lazy.returncode
    error(f"cannot unmount {mountpoint}: {result.stderr.strip()}")
    return EXIT_FAILED
