"""`fsmount status`: what running mounts are doing, asked over their status sockets."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from fsmount.mountinfo import MOUNTINFO, running_mounts
from fsmount.status.client import StatusError, query
from fsmount.status.render import render


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mountpoints", metavar="MOUNTPOINT", nargs="*")
    parser.add_argument("--json", action="store_true", help="one JSON document per line")


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    return show(args.mountpoints, as_json=args.json)


def show(
    mountpoints: Sequence[str],
    *,
    as_json: bool = False,
    out: TextIO | None = None,
    mountinfo: str = MOUNTINFO,
) -> int:
    """Every named mount, or all of this user's (found in the table at `mountinfo`); the
    exit code.

    One error line per mount that does not answer, so it doubles as a health check: 0 only
    when every mount answered.
    """
    out = out or sys.stdout
    targets = [Path(m) for m in mountpoints] or running_mounts(os.geteuid(), mountinfo)
    if not targets:
        raise StatusError("no fsmount mount of this user is running")
    code = 0
    for mountpoint in targets:
        try:
            document = query(mountpoint)
        except StatusError as exc:
            print(f"fsmount: {exc}", file=sys.stderr)
            code = 1
            continue
        out.write(json.dumps(document) + "\n" if as_json else render(document))
    return code
