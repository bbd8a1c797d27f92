"""`fsmount demo`: the fake services, mounted, with a short tour (fsmount/demo/tour.py).

The fakes need packages a production install leaves out (the `demo` extra); without them this
says in one line what to install, rather than a traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from fsmount.errors import StartupError

INSTALL_HINT = "pip install 'fsmount[demo]' (in a checkout: make demo)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?", default="demo-mnt")


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    try:
        from fsmount.demo.tour import run_demo
    except ModuleNotFoundError as exc:
        if (exc.name or "fsmount").partition(".")[0] == "fsmount":
            raise  # a bug, not a missing package
        raise StartupError(
            f"the demo needs the fake services' packages ({exc.name} is missing): {INSTALL_HINT}"
        ) from None
    return run_demo(Path(args.mountpoint))
