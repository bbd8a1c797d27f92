"""`fsmount cache prefetch`: read files through a running mount, so its cache holds them.

It reads through the mount rather than downloading by itself: only a mount knows how a path
maps to a remote object, its version and its size, so reading every byte through it fills the
cache with exactly the blocks a later reader will look for, under that mount's budget and
single-flight rules. `--batch` asks the mount to bring Scenario native files through export
jobs first (commands/batch.py), then reads the files the export could not bring as here.
"""

from __future__ import annotations

import argparse
import errno
import mmap
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from fsmount import config
from fsmount.cache.blocks import cache_usage
from fsmount.cache.layout import CacheLayout
from fsmount.commands.batch import batch_prefetch
from fsmount.commands.output import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, error, warn
from fsmount.commands.progress import progress_bar
from fsmount.mountinfo import mount_point, running_mounts
from fsmount.status.client import StatusError, query
from fsmount.status.render import format_size

_READ_SIZE = 1 << 20  # bytes per read(2): one cache block, so each read is one block lookup
_STATUS_TIMEOUT = 2.0  # seconds a mount may take to answer a status query


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="file or directory to fetch")
    parser.add_argument(
        "--batch",
        action="store_true",
        help="scenario/ paths only: bring their native files through Scenario batch export"
        " jobs (one zip per job) after showing what the jobs cost; converted formats are"
        " left to the per-file path",
    )
    parser.add_argument(
        "--yes",
        action="store_true",
        help="with --batch: accept the jobs' cost in creative units (without it, a cost above"
        " zero stops the command before any job starts)",
    )
    parser.add_argument(
        "--batch-size",
        type=_batch_size,
        metavar="N",
        help="with --batch: assets per export job (default and most: 1000)",
    )
    parser.add_argument(
        "-j",
        "--jobs",
        type=_positive_int,
        default=4,
        metavar="N",
        help="files read at the same time (default: 4)",
    )


def run(args: argparse.Namespace) -> int:
    """Check every PATH, then read all the files below them through their mounts."""
    roots = _check_roots(args.paths)
    if roots is None:
        return EXIT_USAGE
    if args.cache_dir is not None:
        _check_cache_dir(CacheLayout(config.load(args).cache_path), roots)
    if args.batch:
        return batch_prefetch(roots, args, Prefetcher(args.jobs).run)
    if args.yes or args.batch_size is not None:
        error("--yes and --batch-size only go with --batch")
        return EXIT_USAGE
    return Prefetcher(args.jobs).run(roots)


@dataclass(frozen=True, slots=True)
class _File:
    path: Path
    size: int


class _SizeChanged(Exception):
    """A file ended before or after its st_size: it changed on the service while being read."""

    def __init__(self, read: int, size: int) -> None:
        super().__init__(f"read {read:,} of {size:,} bytes: it changed on the service")
        self.read = read


def _check_roots(paths: Sequence[str]) -> list[Path] | None:
    """Each PATH, resolved; None (after one error line per bad PATH) unless all are on a mount.

    All are checked before anything is read, so a typo costs nothing. A path is on an fsmount
    mount when the mount point above it is of type `fuse.fsmount`; only the path's own
    ancestors are looked at, never other mounts (one of which may hang).
    """
    mounts = set(running_mounts())
    roots: list[Path] = []
    for text in paths:
        try:
            path = Path(os.path.realpath(text, strict=True))
        except OSError as exc:
            error(f"{text}: {exc.strerror}")
            continue
        if mount_point(path) not in mounts:
            error(f"{text} is not on an fsmount mount")
            continue
        roots.append(path)
    return roots if len(roots) == len(paths) else None


def _check_cache_dir(layout: CacheLayout, roots: list[Path]) -> None:
    """Warn when --cache-dir names a cache that the mount being read does not use.

    Which process serves a mount is known only from its status; without an answer, say nothing.
    """
    users = set(cache_usage(layout.blocks).users)
    for mountpoint in {mount_point(root) for root in roots}:
        try:
            pid = query(mountpoint, timeout=_STATUS_TIMEOUT).get("pid")
        except StatusError:
            continue
        if pid not in users:
            warn(f"the mount at {mountpoint} does not use {layout.directory}; its own cache fills")


class Prefetcher:
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
        progress = progress_bar()
        try:
            with progress:
                task = progress.add_task("listing", total=None)
                for root in roots:
                    self._list(root, lambda: progress.update(task, description=self._listed()))
                expected = sum(file.size for file in self._files)
                progress.update(task, total=expected, description=self._counted())

                def finished(file: _File, read: int, failure: str | None) -> None:
                    nonlocal expected
                    self._done += 1
                    if failure is not None:
                        self._failures.append((file.path, failure))
                        expected -= file.size - read  # the bar ends full even so
                    progress.update(task, total=expected, description=self._counted())

                self._read_all(lambda n: progress.advance(task, n), finished)
        except KeyboardInterrupt:
            self._stop.set()
            error("interrupted")
            return EXIT_INTERRUPTED
        elapsed = max(time.monotonic() - started, 1e-6)
        for path, reason in self._failures:
            error(f"cannot prefetch {path}: {reason}")
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
