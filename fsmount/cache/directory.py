"""The cache directory shared by processes: its layout, instance locks, scans, the clean-up after
dead processes, and what `fsmount cache` needs without a running store (NOTES.md §1, §5, §6).

Everything here runs in worker threads, or in a command with no event loop, except what is
quick: `available`, and taking and releasing the lock as a store opens and closes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TMP = "tmp"  # files being written: "<instance>.<n>", renamed into a shard when complete
LOCKS = "locks"  # "<instance>.lock", flock-ed by its living process for as long as it runs
_SHARD_NAME = re.compile("[0-9a-f]{2}")  # blocks live in "<shard>/<key digest>-<block index>"
_BLOCK_NAME = re.compile("[0-9a-f]{32}-[0-9]+")


class CacheInUseError(Exception):
    """The cache directory is used by running processes; `pids` names them."""

    def __init__(self, directory: Path, pids: list[int]) -> None:
        super().__init__(f"{directory} is in use by process(es) {', '.join(map(str, pids))}")
        self.pids = pids


@dataclass(frozen=True, slots=True)
class CacheUsage:
    """What a cache directory holds on disk, and which processes use it (for `fsmount cache`)."""

    bytes_held: int
    blocks_held: int
    users: list[int]


def cache_usage(directory: Path) -> CacheUsage:
    """What `directory` holds and which running processes use it. Walks the whole cache."""
    found = scan_blocks(directory) if directory.is_dir() else []
    return CacheUsage(
        bytes_held=sum(size for _, _, size in found),
        blocks_held=len(found),
        users=sorted({_pid(i) for i in _live_instances(directory / LOCKS)}),
    )


def clear_cache(directory: Path, *, force: bool = False) -> CacheUsage:
    """Delete every block in `directory` and what dead processes left; return what went.

    Refuses (CacheInUseError) while a process uses the directory, unless `force`: a running
    store then re-fetches what it misses and corrects its accounting at its next scan.
    """
    usage = cache_usage(directory)
    if usage.users and not force:
        raise CacheInUseError(directory, usage.users)
    if directory.is_dir():
        for _, entry in _block_files(directory):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
        for shard in _shards(directory):
            with contextlib.suppress(OSError):  # not empty: a running store just wrote into it
                os.rmdir(shard)
        remove_dead_leftovers(directory)
    return usage


def available(directory: Path) -> int:
    """Free bytes for an unprivileged user. Inline on the event loop: statvfs takes ~2 µs."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _shards(directory: Path) -> Iterator[str]:
    for entry in os.scandir(directory):
        if _SHARD_NAME.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
            yield entry.path


def _block_files(directory: Path) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """(name, entry) of every block file. Only names blockfile.py gives match, so pointing
    `fsmount cache clear` at the wrong directory cannot delete anything else."""
    for shard in _shards(directory):
        prefix = os.path.basename(shard)
        for entry in os.scandir(shard):
            if _BLOCK_NAME.fullmatch(entry.name) and entry.name.startswith(prefix):
                yield f"{prefix}/{entry.name}", entry


def scan_blocks(directory: Path) -> list[tuple[float, str, int]]:
    """Every block file as (mtime, name, size), oldest first. Files vanishing mid-scan (evicted
    by another process) are skipped."""
    found = []
    for name, entry in _block_files(directory):
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        found.append((st.st_mtime, name, st.st_size))
    found.sort()
    return found


def make_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)  # an existing directory may have been created wider


def take_lock(directory: Path) -> tuple[str, int]:
    """Create and flock this process's lock file; return its instance name and descriptor.

    A cleaner may flock a lock file in the instant between its creation and our flock, think
    its owner dead and delete it; so we check that the name still leads to our file, and retry.
    """
    locks = directory / LOCKS
    while True:
        instance = f"{os.getpid()}-{secrets.token_hex(4)}"
        path = locks / f"{instance}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return instance, fd
        except FileNotFoundError:
            pass
        os.close(fd)


def release_lock(directory: Path, instance: str, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(directory / LOCKS / f"{instance}.lock")
    os.close(fd)


def _is_alive(locks: Path, instance: str) -> bool:
    """Whether the process that wrote `instance`'s files still runs: its lock file is held.

    A lock file whose holder died is deleted here (the kernel dropped the dead process's flock).
    """
    path = locks / f"{instance}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return False
    finally:
        os.close(fd)


def _live_instances(locks: Path) -> list[str]:
    if not locks.is_dir():
        return []
    names = [name.removesuffix(".lock") for name in os.listdir(locks) if name.endswith(".lock")]
    return [instance for instance in names if _is_alive(locks, instance)]


def _pid(instance: str) -> int:
    return int(instance.partition("-")[0])


def remove_dead_leftovers(directory: Path) -> None:
    """Delete the temporary files and lock files of processes that are no longer running.

    Temporary files are listed before their owners are checked: a process takes its lock
    before it writes any temporary file, so a file seen here whose owner holds no lock is
    debris, never a write in progress.
    """
    tmp_dir = directory / TMP
    alive: dict[str, bool] = {}
    for name in os.listdir(tmp_dir) if tmp_dir.is_dir() else []:
        instance = name.partition(".")[0]
        if instance not in alive:
            alive[instance] = _is_alive(directory / LOCKS, instance)
        if not alive[instance]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_dir / name)
    _live_instances(directory / LOCKS)  # deletes the lock files of dead processes
