"""`fsmount mount`: check the mount point, then serve in this process or a detached child."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from fsmount import config
from fsmount.errors import StartupError
from fsmount.logs import setup_logging

READY_FD_ENV = "FSMOUNT_READY_FD"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mountpoint", metavar="MOUNTPOINT")
    parser.add_argument(
        "-f", "--foreground", action="store_true", help="stay in the foreground until unmounted"
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less logging")
    parser.add_argument(
        "--log-file", metavar="PATH", help="where a daemonised mount logs (default: nowhere)"
    )
    config.add_arguments(parser)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    cfg = config.load(args)
    mountpoint = Path(args.mountpoint).absolute()
    _check_mountpoint(mountpoint)
    if not args.foreground:
        return _daemonize(argv)
    setup_logging(cfg.log_level, args.verbose - args.quiet)
    ready_fd = os.environ.pop(READY_FD_ENV, None)

    def ready() -> None:
        if ready_fd is None:
            return
        os.write(int(ready_fd), b"ok\n")
        os.close(int(ready_fd))
        _detach_stdio(args.log_file)

    from fsmount.mount import serve

    trio.run(serve, cfg, mountpoint, ready)
    return 0


def _check_mountpoint(mountpoint: Path) -> None:
    if not mountpoint.is_dir():
        raise StartupError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise StartupError(f"{mountpoint} is already a mount point (fsmount unmount it first)")


def _daemonize(argv: Sequence[str]) -> int:
    """Run the mount in a detached child; return 0 once it is mounted, or its failure.

    The child writes "ok" to a pipe when the mount is up; until then its stderr is ours, so a
    start-up error reaches the user as the child's one line.
    """
    read_end, write_end = os.pipe()
    env = {**os.environ, READY_FD_ENV: str(write_end)}
    child = subprocess.Popen(
        [sys.executable, "-m", "fsmount", *argv, "--foreground"],
        pass_fds=(write_end,),
        env=env,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read(3)
    if answer == b"ok\n":
        return 0
    return child.wait() or 1


def _detach_stdio(log_file: str | None) -> None:
    """After daemonising: stdout/stderr to the log file (or nowhere), never the old terminal."""
    target = os.open(log_file or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(target, 1)
    os.dup2(target, 2)
    os.close(target)
