"""`fsmount cache stats | clear | prefetch`: look at the disk cache, empty it, fill it ahead of use.

`stats` and `clear` work on the directory itself, with or without a mount: the block store
keeps no index on disk, so what the cache holds is what a walk of the directory finds, and
which processes use it is which lock files are held (see NOTES.md). Hit rates exist only
inside a mount process; they are read from a running mount's status socket when it answers.

`prefetch` reads through a running mount rather than downloading by itself: only a mount
knows how a path maps to a remote object, its version and its size, so reading every byte
through it fills the cache with exactly the blocks a later reader will look for, under that
mount's budget and single-flight rules. `prefetch --batch` asks the mount itself, over its
control socket, to bring Scenario native files through batch export jobs (fsmount/export.py);
the mount answers with events this side shows on the same progress bar, then the files it
could not bring are read through the mount as above.

Exit codes: 0 done; 1 the command failed (cache in use, unreadable directory, a file that
could not be prefetched); 2 bad arguments (also argparse's own code).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import mmap
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fsmount import config, status
from fsmount.cache.blocks import CacheInUseError, cache_usage, clear_cache
from fsmount.errors import StartupError
from fsmount.status import format_size

if TYPE_CHECKING:
    from rich.progress import Progress

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

BLOCKS = "blocks"  # where the mount keeps its BlockStore, below the cache directory
METADATA = "metadata.sqlite"  # the mount's MetadataStore (SQLite adds -wal and -shm beside it)
_READ_SIZE = 1 << 20  # bytes per read(2): one cache block, so each read is one block lookup
_STATUS_TIMEOUT = 2.0  # seconds a mount may take to answer a status query
_CONTROL_IDLE = 300.0  # seconds a mount may go silent during a batch prefetch


@dataclass(frozen=True, slots=True)
class CacheLocation:
    """The cache directory and budget a `fsmount mount` started now, here, would use."""

    directory: Path
    budget: int

    @property
    def blocks(self) -> Path:
        return self.directory / BLOCKS

    @property
    def metadata(self) -> Path:
        return self.directory / METADATA


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

    stats = commands.add_parser(
        "stats",
        parents=[shared],
        help="what the cache holds, its budget, and the mounts using it",
        description="Show what the disk cache holds, the budget a mount started now would get,"
        " and the running mounts using it (with their hit rates, when they report them).",
    )
    cache_size = _option("cache-size")
    stats.add_argument(
        "--cache-size",
        metavar="SIZE",
        help=f"the budget to show [env {cache_size.env}; default {cache_size.default}]",
    )
    stats.add_argument("--json", action="store_true", help="one JSON document, for scripts")

    clear = commands.add_parser(
        "clear",
        parents=[shared],
        help="delete every cached block",
        description="Delete every cached block. Sizes and first-seen times (metadata.sqlite)"
        " are kept, so file times stay stable. Refused while a mount uses the cache.",
    )
    clear.add_argument(
        "--force",
        action="store_true",
        help="clear even while mounts use the cache (they fetch again what they read next)",
    )

    prefetch = commands.add_parser(
        "prefetch",
        parents=[shared],
        help="read files or whole directories through a running mount into its cache",
        description="Read every byte of the files below each PATH through the running fsmount"
        " mount that PATH is on, so that later reads are served from the cache.",
        epilog="exit status: 0 every file was read; 1 some failed (each is named), or an"
        " export failed or was not accepted; 2 a PATH does not exist or is not on an fsmount"
        " mount (or, with --batch, not under scenario/)",
    )
    prefetch.add_argument("paths", nargs="+", metavar="PATH", help="file or directory to fetch")
    prefetch.add_argument(
        "--batch",
        action="store_true",
        help="scenario/ paths only: bring their native files through Scenario batch export"
        " jobs (one zip per job) after showing what the jobs cost; converted formats are"
        " left to the per-file path",
    )
    prefetch.add_argument(
        "--yes",
        action="store_true",
        help="with --batch: accept the jobs' cost in creative units (without it, a cost above"
        " zero stops the command before any job starts)",
    )
    prefetch.add_argument(
        "--batch-size",
        type=_batch_size,
        metavar="N",
        help="with --batch: assets per export job (default and most: 1000)",
    )
    prefetch.add_argument(
        "-j",
        "--jobs",
        type=_positive_int,
        default=4,
        metavar="N",
        help="files read at the same time (default: 4)",
    )


def run(args: argparse.Namespace) -> int:
    """Run one `cache` subcommand; failures are one line on stderr and a non-zero exit code."""
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "stats": stats,
        "clear": clear,
        "prefetch": prefetch,
    }
    try:
        return handlers[args.cache_command](args)
    except StartupError as exc:  # a bad --cache-size, config file or environment value
        _error(str(exc))
        return EXIT_FAILED
    except OSError as exc:  # e.g. a cache directory that cannot be read or changed
        _error(f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc))
        return EXIT_FAILED


def locate(args: argparse.Namespace) -> CacheLocation:
    """Flag, then environment, then config file, then default: `config.load`, as the mount."""
    cfg = config.load(args)
    return CacheLocation(cfg.cache_path, cfg.cache_size)


# -- stats ------------------------------------------------------------------------------------


def stats(args: argparse.Namespace) -> int:
    """Print what the directory holds (a walk: exact, whoever wrote it) and who uses it."""
    where = locate(args)
    usage = cache_usage(where.blocks)
    reports = _mount_reports(usage.users)
    users = [{"pid": pid, **reports.get(pid, {})} for pid in usage.users]
    if args.json:
        document = {
            "cache_dir": str(where.directory),
            "blocks_dir": str(where.blocks),
            "bytes": usage.bytes_held,
            "blocks": usage.blocks_held,
            "budget": where.budget,
            "metadata_bytes": _metadata_bytes(where.metadata),
            "users": users,
        }
        print(json.dumps(document, indent=2))
        return 0
    rows = [
        ("cache directory", str(where.directory)),
        ("blocks", f"{usage.blocks_held:,} ({format_size(usage.bytes_held)}) in {where.blocks}"),
        (
            "budget",
            f"{format_size(where.budget)} (what a mount started now gets; see --cache-size)",
        ),
        (
            "metadata",
            f"{format_size(_metadata_bytes(where.metadata))}"
            " (sizes and first-seen times; kept by clear)",
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
    for mountpoint in status.running_mounts(owner=os.geteuid()):
        try:
            document = status.query(mountpoint, timeout=_STATUS_TIMEOUT)
        except status.StatusError:
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


def _metadata_bytes(path: Path) -> int:
    total = 0
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            total += os.stat(f"{path}{suffix}").st_size
    return total


# -- clear ------------------------------------------------------------------------------------


def clear(args: argparse.Namespace) -> int:
    """Delete the blocks, not the metadata: sizes and first-seen times are what keep `ls -l`
    free of requests and file times stable across remounts, and they take little space."""
    where = locate(args)
    try:
        gone = clear_cache(where.blocks, force=args.force)
    except CacheInUseError as exc:
        _error(
            f"the cache {where.directory} is in use by {_processes(exc.pids)}:"
            " unmount first, or use --force"
        )
        return EXIT_FAILED
    if gone.users:
        _warn(f"{_processes(gone.users)} still use the cache: they fetch again what they miss")
    print(
        f"removed {gone.blocks_held:,} blocks ({format_size(gone.bytes_held)}) from {where.blocks}"
    )
    return 0


def _processes(pids: Iterable[int]) -> str:
    pids = list(pids)
    return f"process{'es' if len(pids) > 1 else ''} {', '.join(map(str, pids))}"


# -- prefetch ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _File:
    path: Path
    size: int


class _SizeChanged(Exception):
    """A file ended before or after its st_size: it changed on the service while being read."""

    def __init__(self, read: int, size: int) -> None:
        super().__init__(f"read {read:,} of {size:,} bytes: it changed on the service")
        self.read = read


def prefetch(args: argparse.Namespace) -> int:
    """Check every PATH, then read all the files below them through their mounts."""
    roots = _check_roots(args.paths)
    if roots is None:
        return EXIT_USAGE
    if args.cache_dir is not None:
        _check_cache_dir(locate(args), roots)
    if args.batch:
        return _batch_prefetch(roots, args)
    if args.yes or args.batch_size is not None:
        _error("--yes and --batch-size only go with --batch")
        return EXIT_USAGE
    return _Prefetcher(args.jobs).run(roots)


def _check_roots(paths: Sequence[str]) -> list[Path] | None:
    """Each PATH, resolved; None (after one error line per bad PATH) unless all are on a mount.

    All are checked before anything is read, so a typo costs nothing. A path is on an fsmount
    mount when the mount point above it is of type `fuse.fsmount`; only the path's own
    ancestors are looked at, never other mounts (one of which may hang).
    """
    mounts = set(status.running_mounts())
    roots: list[Path] = []
    for text in paths:
        try:
            path = Path(os.path.realpath(text, strict=True))
        except OSError as exc:
            _error(f"{text}: {exc.strerror}")
            continue
        if _mount_point(path) not in mounts:
            _error(f"{text} is not on an fsmount mount")
            continue
        roots.append(path)
    return roots if len(roots) == len(paths) else None


def _check_cache_dir(where: CacheLocation, roots: list[Path]) -> None:
    """Warn when --cache-dir names a cache that the mount being read does not use.

    Which process serves a mount is known only from its status; without an answer, say nothing.
    """
    users = set(cache_usage(where.blocks).users)
    for mountpoint in {_mount_point(root) for root in roots}:
        try:
            pid = status.query(mountpoint, timeout=_STATUS_TIMEOUT).get("pid")
        except status.StatusError:
            continue
        if pid not in users:
            _warn(f"the mount at {mountpoint} does not use {where.directory}; its own cache fills")


def _mount_point(path: Path) -> Path:
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


class _Prefetcher:
    """Lists the files below the roots, then reads them `jobs` at a time under a progress bar.

    Files are read with O_DIRECT: the mount keeps the kernel's page cache across opens, so a
    buffered read of a file whose pages are still in memory would never reach the mount, and
    blocks since evicted or cleared would not be fetched again. Each file is read sequentially
    by one thread, which the mount detects and reads ahead of in parallel; reading one file
    from several threads would look random to it and defeat that.
    """

    def __init__(self, jobs: int) -> None:
        self._jobs = jobs
        self._stop = threading.Event()  # set on Ctrl-C: readers stop after their current read
        self._lock = threading.Lock()
        self._files: list[_File] = []
        self._failures: list[tuple[Path, str]] = []
        self._done = 0
        self._bytes_read = 0

    def run(self, roots: list[Path]) -> int:
        """List, read, report; the exit code."""
        started = time.monotonic()
        progress = _progress_bar()
        try:
            with progress:
                task = progress.add_task("listing", total=None)
                for root in roots:
                    self._list(root, lambda: progress.update(task, description=self._listed()))
                expected = sum(file.size for file in self._files)
                progress.update(task, total=expected, description=self._counted())

                def finished(file: _File, read: int, error: str | None) -> None:
                    nonlocal expected
                    self._done += 1
                    if error is not None:
                        self._failures.append((file.path, error))
                        expected -= file.size - read  # the bar ends full even so
                    progress.update(task, total=expected, description=self._counted())

                self._read_all(lambda n: progress.advance(task, n), finished)
        except KeyboardInterrupt:
            self._stop.set()
            _error("interrupted")
            return EXIT_INTERRUPTED
        elapsed = max(time.monotonic() - started, 1e-6)
        for path, reason in self._failures:
            _error(f"cannot prefetch {path}: {reason}")
        failed_files = len({path for path, _ in self._failures} & {f.path for f in self._files})
        print(
            f"prefetched {len(self._files) - failed_files:,} of {len(self._files):,} files:"
            f" {format_size(self._bytes_read)} in {elapsed:.1f} s"
            f" ({format_size(self._bytes_read / elapsed)}/s)"
        )
        return EXIT_FAILED if self._failures else 0

    def _listed(self) -> str:
        return f"listing: {len(self._files):,} files"

    def _counted(self) -> str:
        return f"{self._done:,}/{len(self._files):,} files"

    def _list(self, root: Path, found: Callable[[], None]) -> None:
        """Add the regular files below `root` (or `root` itself) once each, with their sizes.

        A directory that cannot be listed is a failure; everything else is still read.
        """
        known = {file.path for file in self._files}
        stack = [root]
        while stack and not self._stop.is_set():
            path = stack.pop()
            try:
                st = os.stat(path, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    with os.scandir(path) as entries:
                        stack.extend(sorted((Path(e.path) for e in entries), reverse=True))
                    continue
            except OSError as exc:
                self._failures.append((path, exc.strerror or str(exc)))
                continue
            if stat.S_ISREG(st.st_mode) and path not in known:
                known.add(path)
                self._files.append(_File(path, st.st_size))
                found()

    def _read_all(
        self,
        advance: Callable[[int], None],
        finished: Callable[[_File, int, str | None], None],
    ) -> None:
        """Read every file, `jobs` at a time, largest first (so that a big file does not start
        last and leave one reader working alone at the end); `finished` runs in this thread."""
        files = sorted(self._files, key=lambda file: -file.size)
        with ThreadPoolExecutor(self._jobs, thread_name_prefix="prefetch") as pool:
            futures = {pool.submit(self._read_one, file, advance): file for file in files}
            try:
                for future in as_completed(futures):
                    file = futures[future]
                    try:
                        finished(file, future.result(), None)
                    except _SizeChanged as exc:
                        finished(file, exc.read, str(exc))
                    except OSError as exc:
                        finished(file, 0, exc.strerror or str(exc))
            except BaseException:
                self._stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise

    def _read_one(self, file: _File, advance: Callable[[int], None]) -> int:
        """Read every byte of `file` through the mount; return how many were read."""
        try:
            fd = os.open(file.path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # No O_DIRECT on this filesystem: drop the file's cached pages, then read buffered.
            fd = os.open(file.path, os.O_RDONLY | os.O_CLOEXEC)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        offset = 0
        try:
            with mmap.mmap(-1, _READ_SIZE) as buffer:  # page-aligned, as O_DIRECT requires
                while not self._stop.is_set():
                    n = os.preadv(fd, [buffer], offset)
                    if n == 0:
                        break
                    offset += n
                    with self._lock:
                        self._bytes_read += n
                    advance(n)
        finally:
            os.close(fd)
        if offset != file.size and not self._stop.is_set():
            raise _SizeChanged(offset, file.size)
        return offset


# -- prefetch --batch ---------------------------------------------------------------------------


def _batch_prefetch(roots: list[Path], args: argparse.Namespace) -> int:
    """Ask each mount the roots are on to export their Scenario native files (all roots are
    checked first, as for a plain prefetch)."""
    from fsmount.sources.scenario import ROOT

    by_mount: dict[Path, list[str]] = {}
    for root in roots:
        mountpoint = _mount_point(root)
        relative = root.relative_to(mountpoint).as_posix()
        if relative.split("/")[0] != ROOT:
            _error(f"{root} is not under {mountpoint / ROOT}: --batch exports Scenario files only")
            return EXIT_USAGE
        by_mount.setdefault(mountpoint, []).append(relative)
    return max(_BatchClient(mountpoint, args).run(paths) for mountpoint, paths in by_mount.items())


class _BatchClient:
    """One `batch-prefetch` request to one mount: shows its events, then reads through the
    mount the native files the export could not bring."""

    def __init__(self, mountpoint: Path, args: argparse.Namespace) -> None:
        self._mountpoint = mountpoint
        self._args = args
        self._plan: dict[str, Any] = {}
        self._warnings: list[str] = []

    def run(self, paths: list[str]) -> int:
        started = time.monotonic()
        request: dict[str, Any] = {"command": "batch-prefetch", "paths": paths}
        request["yes"] = self._args.yes
        if self._args.batch_size is not None:
            request["batch_size"] = self._args.batch_size
        try:
            outcome = self._follow(request)
        except status.StatusError as exc:
            _error(str(exc))
            return EXIT_FAILED
        except KeyboardInterrupt:  # hanging up cancels the export in the mount
            _error("interrupted")
            return EXIT_INTERRUPTED
        for warning in self._warnings:
            _warn(warning)
        if outcome.get("event") == "refused":
            _error(
                f"exporting {self._plan.get('export', 0):,} files costs"
                f" {outcome.get('cost', 0):g} creative units: run again with --yes to accept"
            )
            return EXIT_FAILED
        if outcome.get("event") != "done":
            _error(str(outcome.get("message") or f"the mount at {self._mountpoint} gave up"))
            return EXIT_FAILED
        return self._report(outcome, time.monotonic() - started)

    def _follow(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send the request and show its events; the last one (`done`, `refused`, `error`)."""
        progress = _progress_bar()
        with progress:
            task = progress.add_task("export: listing", total=None)
            job = ""
            for event in status.control(self._mountpoint, request, idle=_CONTROL_IDLE):
                kind = event.get("event")
                if kind == "plan":
                    self._plan = event
                    self._announce(event)
                elif kind == "cost":
                    jobs = self._plan.get("jobs", 0)
                    print(
                        f"export cost: {event.get('cost', 0):g} creative units for"
                        f" {self._plan.get('export', 0):,} files in {jobs:,} job{_s(jobs)}",
                        flush=True,
                    )
                elif kind == "job":
                    where = f"export {event.get('job')}/{event.get('jobs')}"
                    if where != job:  # a new job: a bar of its own (rich cannot unset a total)
                        job = where
                        progress.remove_task(task)
                        task = progress.add_task(where, total=None)
                    progress.update(task, description=f"{where}: {event.get('status')}")
                elif kind == "download":
                    where = f"export {event.get('job')}/{event.get('jobs')}"
                    progress.reset(task, description=f"{where}: zip", total=event.get("total"))
                elif kind == "bytes":
                    progress.advance(task, event.get("count", 0))
                elif kind == "warning":
                    self._warnings.append(str(event.get("message")))
                elif kind in ("done", "refused", "error"):
                    return event
        raise status.StatusError(f"the mount at {self._mountpoint} stopped answering")

    def _announce(self, plan: dict[str, Any]) -> None:
        if plan.get("bytes", 0) > plan.get("budget", float("inf")):
            self._warnings.append(
                f"the files take {format_size(plan['bytes'])}, more than the cache's budget"
                f" of {format_size(plan['budget'])}: the last ones evict the first"
            )

    def _report(self, done: dict[str, Any], elapsed: float) -> int:
        plan = self._plan
        jobs = plan.get("jobs", 0)
        stored = done.get("bytes", 0)
        print(
            f"exported {done.get('stored', 0):,} of {plan.get('export', 0):,} native files"
            f" in {jobs:,} job{_s(jobs)}: {format_size(stored)} in {elapsed:.1f} s"
            + (f"; {plan['cached']:,} were cached already" if plan.get("cached") else "")
        )
        if plan.get("converted"):
            print(
                f"left {plan['converted']:,} converted files to the per-file path"
                " (fsmount cache prefetch without --batch reads them)"
            )
        per_file = [self._mountpoint / path for path in done.get("per_file", [])]
        if not per_file:
            return 0
        print(f"reading {len(per_file):,} native file{_s(len(per_file))} one by one", flush=True)
        return _Prefetcher(self._args.jobs).run(per_file)


def _s(count: int) -> str:
    return "" if count == 1 else "s"


def _progress_bar() -> Progress:
    """Bytes, rate and time left on stderr; nothing when stderr is not a terminal (the
    summary line says what was done). Imported here: rich takes a while to load."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        ProgressColumn,
        Task,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        """Binary units, like the sizes beside it (rich's own rate column is decimal)."""

        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(
                "?" if speed is None else f"{format_size(speed)}/s", style="progress.data.speed"
            )

    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        Rate(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )


# -- helpers ----------------------------------------------------------------------------------


def _option(key: str) -> config.Option:
    return next(opt for opt in config.OPTIONS if opt.key == key)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _batch_size(text: str) -> int:
    from fsmount.sources.scenario import EXPORT_LIMIT

    value = _positive_int(text)
    if value > EXPORT_LIMIT:
        raise argparse.ArgumentTypeError(f"at most {EXPORT_LIMIT}: {text!r}")
    return value


def _error(message: str) -> None:
    print(f"fsmount: {message}", file=sys.stderr)


def _warn(message: str) -> None:
    print(f"fsmount: warning: {message}", file=sys.stderr)
