"""Command line: parse arguments, one function per command, one clear line per failure."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from fsmount import config
from fsmount.cache import commands as cache_commands
from fsmount.errors import StartupError

log = logging.getLogger("fsmount")

READY_FD_ENV = "FSMOUNT_READY_FD"


def setup_logging(level: str, verbosity: int = 0) -> None:
    """Log to stderr; journald adds its own timestamps, so none under systemd."""
    levels = config.LOG_LEVELS
    index = min(max(levels.index(level) - verbosity, 0), len(levels) - 1)
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=levels[index].upper(), format=fmt, stream=sys.stderr, force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def _check_mountpoint(mountpoint: Path) -> None:
    if not mountpoint.is_dir():
        raise StartupError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise StartupError(f"{mountpoint} is already a mount point (fsmount unmount it first)")


def cmd_mount(args: argparse.Namespace, argv: Sequence[str]) -> int:
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


def cmd_unmount(args: argparse.Namespace, argv: Sequence[str]) -> int:
    mountpoint = str(Path(args.mountpoint).absolute())
    result = subprocess.run(
        ["fusermount3", "-u", mountpoint], capture_output=True, text=True, check=False
    )
    if result.returncode == 0:
        return 0
    if "busy" in result.stderr.lower():
        print(f"fsmount: warning: {mountpoint} is busy; unmounting lazily", file=sys.stderr)
        lazy = subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False)
        return lazy.returncode
    print(f"fsmount: cannot unmount {mountpoint}: {result.stderr.strip()}", file=sys.stderr)
    return 1


def cmd_status(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from fsmount import status

    return status.command(args.mountpoints, as_json=args.json)


def cmd_demo(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from fsmount.demo.tour import run_demo

    return run_demo(Path(args.mountpoint))


def cmd_cache(args: argparse.Namespace, argv: Sequence[str]) -> int:
    return cache_commands.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsmount",
        description="Mount Grand Challenge archives and Scenario asset libraries, read-only.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mount = commands.add_parser("mount", help="mount the configured services")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT")
    mount.add_argument(
        "-f", "--foreground", action="store_true", help="stay in the foreground until unmounted"
    )
    mount.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    mount.add_argument("-q", "--quiet", action="count", default=0, help="less logging")
    mount.add_argument(
        "--log-file", metavar="PATH", help="where a daemonised mount logs (default: nowhere)"
    )
    config.add_arguments(mount)
    mount.set_defaults(func=cmd_mount)

    unmount = commands.add_parser("unmount", help="unmount (lazily when busy)")
    unmount.add_argument("mountpoint", metavar="MOUNTPOINT")
    unmount.set_defaults(func=cmd_unmount)

    status_cmd = commands.add_parser(
        "status", help="what running mounts are doing (exit 1 if one does not answer)"
    )
    status_cmd.add_argument("mountpoints", metavar="MOUNTPOINT", nargs="*")
    status_cmd.add_argument("--json", action="store_true", help="one JSON document per line")
    status_cmd.set_defaults(func=cmd_status)

    demo = commands.add_parser("demo", help="mount the built-in demo services")
    demo.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?", default="demo-mnt")
    demo.set_defaults(func=cmd_demo)

    cache = commands.add_parser("cache", help="what the disk cache holds; empty it; fill it ahead")
    cache_commands.add_arguments(cache)
    cache.set_defaults(func=cmd_cache)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace, Sequence[str]], int] = args.func
    try:
        return func(args, argv)
    except StartupError as exc:
        print(f"fsmount: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
