"""Verified blocks, kept: the recent ones in memory, all of them in files on disk within the budget
(NOTES.md §2-§7).

The keeper carries out the index's decisions with file work in worker threads, and holds the
instance lock for as long as one of its writes can run.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path

import trio

from fsmount.cache.blockfile import (
    HEADER_SIZE,
    CorruptBlock,
    Ref,
    read_block_file,
    unlink_all,
    write_block_file,
)
from fsmount.cache.directory import (
    LOCKS,
    TMP,
    make_private_dir,
    release_lock,
    remove_dead_leftovers,
    scan_blocks,
    take_lock,
)
from fsmount.cache.index import Index
from fsmount.cache.running import Running

log = logging.getLogger(__name__)


class BlockFiles:
    """The file work the keeper hands to worker threads. A store is given another one (a
    subclass) where a test needs a read, a write or a scan to pause, fail or die."""

    def read(self, path: str, ref: Ref) -> tuple[bytes, int, float] | None:
        return read_block_file(path, ref)

    def write(
        self, tmp: Path, final: str, ref: Ref, data: bytes, victims: list[str], direct: bool
    ) -> bool:
        return write_block_file(tmp, final, ref, data, victims, direct)

    def scan(self, directory: Path) -> list[tuple[float, str, int]]:
        return scan_blocks(directory)


class Keeper:
    """Blocks known to be right: read and verified from their files, or downloaded and written
    within the budget and the free-space floor; the recent ones also in memory.

    Creating it creates the directory and takes this process's lock in it; `release` gives the
    lock back once no write can run any more.
    """

    def __init__(
        self,
        directory: Path,
        index: Index,
        *,
        memory: int,
        files: BlockFiles,
        io: trio.CapacityLimiter,
    ) -> None:
        self.index = index
        self._dir = directory
        self._files = files
        self._io = io  # the worker threads all file work of the store runs in
        self._memory: OrderedDict[str, bytes] = OrderedDict()  # least recently used first
        self.memory_total = 0
        self._memory_budget = memory
        self._direct = True  # O_DIRECT block writes, until the filesystem refuses them
        self._tmp_names = itertools.count()
        self._writes = Running()  # block files being written by worker threads
        self.closed = False  # no write starts any more
        self.hits = 0  # block lookups answered from memory
        self.disk_reads = 0  # block files read and verified
        self.corrupt_blocks = 0  # block files that failed verification and were fetched again
        make_private_dir(directory)
        make_private_dir(directory / TMP)
        make_private_dir(directory / LOCKS)
        self.instance, self._lock_fd = take_lock(directory)

    def path(self, name: str) -> str:
        return os.path.join(self._dir, name)

    def cached(self, name: str) -> bytes | None:
        """A block's verified bytes if they are in memory (a hit: the block is used)."""
        data = self._memory.get(name)
        if data is not None:
            self._memory.move_to_end(name)
            self.hits += 1
            if self.index.touch(name):
                self._set_mtime(name)
        return data

    def has(self, ref: Ref) -> bool:
        """Whether a block is in memory or on disk (a stat until the first scan is done)."""
        return ref.name in self._memory or self.stored(ref)

    def stored(self, ref: Ref) -> bool:
        """Whether a block is on disk, as far as this process knows (a stat until the first
        scan is done; a file found is adopted)."""
        if ref.name in self.index:
            return True
        if self.index.doomed(ref.name) is not None or self.index.complete:
            return False  # a complete index knows this process's blocks (others': next scan)
        try:
            st = os.stat(self.path(ref.name))
        except FileNotFoundError:
            return False
        self.index.adopt(ref.name, st.st_size, st.st_mtime)
        return True

    async def load(self, ref: Ref) -> bytes | None:
        """Read and verify a block file; None when it is missing or bad (a bad one is deleted)."""
        path = self.path(ref.name)
        self.index.pin(ref.name)
        try:
            found = await trio.to_thread.run_sync(self._files.read, path, ref, limiter=self._io)
        except CorruptBlock as exc:
            log.warning("cache block %s is corrupt (%s): deleting it and fetching again", path, exc)
            self.corrupt_blocks += 1
            self.index.forget(ref.name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return None
        except OSError as exc:  # a failing cache disk must not fail reads the network can serve
            log.warning("could not read cache block %s: %s", path, exc)
            self.index.forget(ref.name)
            return None
        finally:
            self.index.unpin(ref.name)
        if found is None:
            self.index.forget(ref.name)  # another process evicted it, or it was never there
            return None
        data, file_size, mtime = found
        self.disk_reads += 1
        self._remember(ref.name, data)
        if ref.name in self.index:
            if self.index.touch(ref.name):
                self._set_mtime(ref.name)
        elif self.index.doomed(ref.name) is None:  # by an earlier run or another process
            self.index.adopt(ref.name, file_size, mtime)
            await self.trim()
        return data

    async def store(self, ref: Ref, data: bytes) -> None:
        """Keep a downloaded block on disk if the budget and free space allow, and in memory.

        Nothing is written when room cannot be made (every other block is in use, or the block
        alone exceeds the budget): the reader still gets its bytes. The victims' files are
        deleted in the same worker-thread call, before the new file is written, so the
        directory never holds more than this process accounts for. Memory gets the block last.
        """
        while (eviction := self.index.doomed(ref.name)) is not None:
            await eviction.done.wait()  # an older copy is being deleted: write after that
        size = HEADER_SIZE + len(data)
        # Checked and counted with no await in between, so `release` either sees this write or
        # this write sees the keeper closed (and only keeps the block in memory).
        eviction = None if self.closed else self.index.make_room(size)
        if eviction is not None:
            self._writes.enter()
            tmp = self._dir / TMP / f"{self.instance}.{next(self._tmp_names)}"
            try:
                self._direct = await trio.to_thread.run_sync(
                    self._files.write,
                    tmp,
                    self.path(ref.name),
                    ref,
                    data,
                    [self.path(name) for name in eviction.names],
                    self._direct,
                    limiter=self._io,
                )
            except OSError as exc:  # disk full, directory cleared under us...: serve uncached
                log.warning("could not store cache block %s: %s", ref.name, exc)
            else:
                self.index.record(ref.name, size)
            finally:
                self.index.release(size, eviction)
                self._writes.leave()
        self._remember(ref.name, data)

    async def trim(self) -> None:
        """Evict down to the budget in batches, letting readers run in between."""
        while (eviction := self.index.trim()) is not None:
            paths = [self.path(name) for name in eviction.names]
            try:
                await trio.to_thread.run_sync(unlink_all, paths, limiter=self._io)
            finally:
                self.index.finish(eviction)

    async def rescan(self) -> None:
        """Re-learn which blocks are on disk, then evict down to the budget."""
        started = time.time()
        forgotten = self.index.begin_scan()  # by this process while the directory is listed
        try:
            found = await trio.to_thread.run_sync(self._files.scan, self._dir, limiter=self._io)
        finally:
            self.index.end_scan(forgotten)
        self.index.merge_scan(found, started, forgotten)
        await self.trim()
        self.index.complete = True

    async def remove_dead_leftovers(self) -> None:
        """Delete what processes that no longer run left in the directory."""
        await trio.to_thread.run_sync(remove_dead_leftovers, self._dir, limiter=self._io)

    def close(self) -> None:
        """No write starts from now on; blocks are still kept in memory."""
        self.closed = True

    async def release(self) -> None:
        """Give the directory back once the writes already in worker threads (which cannot be
        cancelled) are over: the lock tells other processes our temporary files are live."""
        await self._writes.wait_none()
        release_lock(self._dir, self.instance, self._lock_fd)

    def _set_mtime(self, name: str) -> None:
        """Record a use in the file (see `Index.touch`), for the order after a remount."""
        try:
            os.utime(self.path(name))
        except FileNotFoundError:
            self.index.forget(name)  # another process evicted it
        except OSError as exc:  # e.g. a read-only cache directory: reads must still work
            log.debug("could not touch cache block %s: %s", name, exc)

    def _remember(self, name: str, data: bytes) -> None:
        """Keep verified bytes in memory, so a sequential reader's eight 128 KiB reads of one
        block read and check its file once."""
        if len(data) > self._memory_budget:
            return
        old = self._memory.pop(name, None)
        if old is not None:
            self.memory_total -= len(old)
        self._memory[name] = data
        self.memory_total += len(data)
        while self.memory_total > self._memory_budget:
            _, dropped = self._memory.popitem(last=False)
            self.memory_total -= len(dropped)
