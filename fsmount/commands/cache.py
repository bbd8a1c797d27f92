"""`fsmount cache stats | clear | prefetch`: look at the disk cache, empty it, fill it ahead of use.

`stats` and `clear` work on the directory itself, with or without a mount: the block store
keeps no index on disk, so what the cache holds is what a walk of the directory finds, and
which processes use it is which lock files are held (see cache/NOTES.md). Hit rates exist only
inside a mount process; they are read from a running mount's status socket when it answers.
`prefetch` reads through a running mount (commands/prefetch.py).

Exit codes: 0 done; 1 the command failed (cache in use, unreadable directory, a file that
could not be prefetched); 2 bad arguments (also argparse's own code).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from fsmount import config
from fsmount.cache.blocks import CacheInUseError, cache_usage, clear_cache
from fsmount.cache.layout import CacheLayout
from fsmount.commands import prefetch
from fsmount.commands.output import EXIT_FAILED, error, warn
from fsmount.errors import StartupError
from fsmount.mountinfo import running_mounts
from fsmount.status.client import StatusError, query
from fsmount.status.render import format_size

_STATUS_TIMEOUT = 2.0  # seconds a mount may take to answer a status query


@dataclass(frozen=True, slots=True)
class CacheLocation:
    """The cache directory and budget a `fsmount mount` started now, here, would use."""

    layout: CacheLayout
    budget: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `cache` command's subcommands; each resolves the cache directory as the mount does."""
    cache_dir = _option("cache-dir")
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument(
        "--cache-dir",
        metavar="DIR",
        help=f"{cache_dir.help} [env {cache_dir.env}]",
    )
    shared.add_argument(
        "--config",
        metavar="PATH",
        help="TOML configuration file whose cache-dir and cache-size apply, as for fsmount mount",
    )
    commands = parser.add_subparsers(dest="cache_command", required=True, metavar="COMMAND")

    stats_parser = commands.add_parser(
        "stats",
        parents=[shared],
        help="what the cache holds, its budget, and the mounts using it",
        description="Show what the disk cache holds, the budget a mount started now would get,"
        " and the running mounts using it (with their hit rates, when they report them).",
    )
    cache_size = _option("cache-size")
    stats_parser.add_argument(
        "--cache-size",
        metavar="SIZE",
        help=f"the budget to show [env {cache_size.env}; default {cache_size.default}]",
    )
    stats_parser.add_argument("--json", action="store_true", help="one JSON document, for scripts")

    clear_parser = commands.add_parser(
        "clear",
        parents=[shared],
        help="delete every cached block",
        description="Delete every cached block. Sizes and first-seen times (metadata.sqlite)"
        " are kept, so file times stay stable. Refused while a mount uses the cache.",
    )
    clear_parser.add_argument(
        "--force",
        action="store_true",
        help="clear even while mounts use the cache (they fetch again what they read next)",
    )

    prefetch_parser = commands.add_parser(
        "prefetch",
        parents=[shared],
        help="read files or whole directories through a running mount into its cache",
        description="Read every byte of the files below each PATH through the running fsmount"
        " mount that PATH is on, so that later reads are served from the cache.",
        epilog="exit status: 0 every file was read; 1 some failed (each is named), or an"
        " export failed or was not accepted; 2 a PATH does not exist or is not on an fsmount"
        " mount (or, with --batch, not under scenario/)",
    )
    prefetch.add_arguments(prefetch_parser)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run one `cache` subcommand; failures are one line on stderr and a non-zero exit code."""
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "stats": stats,
        "clear": clear,
        "prefetch": prefetch.run,
    }
    try:
        return handlers[args.cache_command](args)
    except StartupError as exc:  # a bad --cache-size, config file or environment value
        error(str(exc))
        return EXIT_FAILED
    except OSError as exc:  # e.g. a cache directory that cannot be read or changed
        error(f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc))
        return EXIT_FAILED


def locate(args: argparse.Namespace) -> CacheLocation:
    """Flag, then environment, then config file, then default: `config.load`, as the mount."""
    cfg = config.load(args)
    return CacheLocation(CacheLayout(cfg.cache_path), cfg.cache_size)


# -- stats ------------------------------------------------------------------------------------


def stats(args: argparse.Namespace) -> int:
    """Print what the directory holds (a walk: exact, whoever wrote it) and who uses it."""
    where = locate(args)
    layout = where.layout
    usage = cache_usage(layout.blocks)
    reports = _mount_reports(usage.users)
    users = [{"pid": pid, **reports.get(pid, {})} for pid in usage.users]
    if args.json:
        document = {
            "cache_dir": str(layout.directory),
            "blocks_dir": str(layout.blocks),
            "bytes": usage.bytes_held,
            "blocks": usage.blocks_held,
            "budget": where.budget,
            "metadata_bytes": _metadata_bytes(layout),
            "users": users,
        }
        print(json.dumps(document, indent=2))
        return 0
    rows = [
        ("cache directory", str(layout.directory)),
        ("blocks", f"{usage.blocks_held:,} ({format_size(usage.bytes_held)}) in {layout.blocks}"),
        (
            "budget",
            f"{format_size(where.budget)} (what a mount started now gets; see --cache-size)",
        ),
        (
            "metadata",
            f"{format_size(_metadata_bytes(layout))} (sizes and first-seen times; kept by clear)",
        ),
    ]
    rows += [("used by" if i == 0 else "", _describe_user(u)) for i, u in enumerate(users)]
    if not users:
        rows.append(("used by", "no running mount"))
    rows.append(("hit rate", _hit_rate_note(users)))
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    return 0


def _mount_reports(pids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """What the running mounts among `pids` report through their status sockets, by pid.

    Best effort: a mount that does not answer (or an fsmount without status support) is
    simply absent, and the caller says that its hit rate is unknown.
    """
    reports: dict[int, dict[str, Any]] = {}
    if not pids:
        return reports
    for mountpoint in running_mounts(owner=os.geteuid()):
        try:
            document = query(mountpoint, timeout=_STATUS_TIMEOUT)
        except StatusError:
            continue
        pid = document.get("pid")
        if pid not in pids:
            continue
        cache = document.get("cache")
        cache = cache if isinstance(cache, dict) else {}
        report: dict[str, Any] = {"mountpoint": str(mountpoint)}
        for key in ("budget", "hits", "misses", "bytes_fetched"):
            if isinstance(cache.get(key), int):
                report[key] = cache[key]
        reports[pid] = report
    return reports


def _describe_user(user: dict[str, Any]) -> str:
    text = f"pid {user['pid']}"
    if "mountpoint" in user:
        text += f" at {user['mountpoint']}"
    if "budget" in user:
        text += f", budget {format_size(user['budget'])}"
    if "hits" in user and "misses" in user:
        lookups = user["hits"] + user["misses"]
        rate = f" ({100 * user['hits'] / lookups:.1f}%)" if lookups else ""
        text += f": {user['hits']:,} hits, {user['misses']:,} misses{rate}"
    return text


def _hit_rate_note(users: list[dict[str, Any]]) -> str:
    if not users:
        return "counted by each mount since it started; none is running"
    if all("hits" in user for user in users):
        return "counted by each mount since it started (above)"
    return "counted by each mount since it started; unknown where not shown (no status answer)"


def _metadata_bytes(layout: CacheLayout) -> int:
    total = 0
    for path in layout.metadata_files():
        with contextlib.suppress(FileNotFoundError):
            total += os.stat(path).st_size
    return total


# -- clear ------------------------------------------------------------------------------------


def clear(args: argparse.Namespace) -> int:
    """Delete the blocks, not the metadata (cache/layout.py says why)."""
    where = locate(args)
    layout = where.layout
    try:
        gone = clear_cache(layout.blocks, force=args.force)
    except CacheInUseError as exc:
        error(
            f"the cache {layout.directory} is in use by {_processes(exc.pids)}:"
            " unmount first, or use --force"
        )
        return EXIT_FAILED
    if gone.users:
        warn(f"{_processes(gone.users)} still use the cache: they fetch again what they miss")
    print(
        f"removed {gone.blocks_held:,} blocks ({format_size(gone.bytes_held)}) from {layout.blocks}"
    )
    return 0


def _processes(pids: Iterable[int]) -> str:
    pids = list(pids)
    return f"process{'es' if len(pids) > 1 else ''} {', '.join(map(str, pids))}"


def _option(key: str) -> config.Option:
    return next(opt for opt in config.OPTIONS if opt.key == key)
