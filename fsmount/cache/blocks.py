"""The disk block store: fixed-size, checksummed blocks of immutable remote byte sequences.

The invariants (who may evict what, what a crash leaves behind and why that is safe, what two
processes sharing one directory may rely on) are written down in NOTES.md beside this file,
with the module that owns each; read it before changing anything here.

The store knows nothing of HTTP, FUSE or the services: a caller names an immutable byte
sequence by a key, gives its size, and hands over a `Fetch` callback that returns any range of
it. Blocks are files named by a hash of the key, so keys may contain any character. This
module is the store's face; the work is done by `keeper` (blocks in memory and on disk, through
the `index`), `flight` (single flight and fetching) and `readahead`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Self

import trio

from fsmount.cache.blockfile import HEADER_SIZE, block_ref, digest
from fsmount.cache.directory import CacheInUseError, CacheUsage, available, cache_usage, clear_cache
from fsmount.cache.flight import Fetch, Flights, Sink, slice_of
from fsmount.cache.index import FreeSpace, Index
from fsmount.cache.keeper import BlockFiles, Keeper
from fsmount.cache.readahead import READAHEAD_CHUNK, Limits, Readahead

__all__ = [
    "HEADER_SIZE",
    "BlockFiles",
    "BlockStore",
    "CacheInUseError",
    "CacheStats",
    "CacheUsage",
    "Fetch",
    "FreeSpace",
    "Sink",
    "cache_usage",
    "clear_cache",
]

log = logging.getLogger(__name__)

_DRAIN_ON_CLOSE = 5.0  # seconds an unmount waits for downloads; a stalled server must not hold it
_IO_THREADS = 4


@dataclass(frozen=True, slots=True)
class CacheStats:
    """What one BlockStore holds and has done; counters are since it was created."""

    bytes_held: int  # block files this process accounts for (headers included)
    blocks_held: int
    budget: int
    min_free: int
    hits: int  # block lookups answered from memory or disk
    misses: int  # block lookups that waited for a download
    bytes_fetched: int
    fetches: int
    downloads_in_flight: int
    evictions: int
    corrupt_blocks: int  # block files that failed verification and were fetched again
    disk_reads: int  # block files read and verified
    memory_bytes: int  # recently verified blocks kept in memory
    index_complete: bool  # the first scan of the directory has finished


class BlockStore:
    """A disk cache of fixed-size blocks of immutable objects, with readahead and a hard budget.

    Create it inside a trio run; background work (the first scan of the directory, clean-up
    after dead processes, readahead) starts with the first read and stops at `aclose`.
    """

    def __init__(
        self,
        directory: Path,
        *,
        budget: int,
        block_size: int = 1 << 20,
        min_free: int = 1 << 30,
        readahead: int = 64 << 20,
        max_parallel: int = 8,
        memory: int = 32 << 20,
        rescan_interval: float = 60.0,
        readahead_chunk: int = READAHEAD_CHUNK,
        free_space: FreeSpace | None = None,
        files: BlockFiles | None = None,
        io: trio.CapacityLimiter | None = None,
    ) -> None:
        """Open (creating if needed) the cache in `directory` and mark it in use.

        `budget` bounds the bytes of block files (headers included); `min_free` is the free
        space the store always leaves on the filesystem; `readahead` caps the bytes fetched
        ahead of one sequential reader, and all readers together have at most a quarter of the
        budget fetched (or queued) ahead of them, so their read-ahead blocks do not push each
        other out; `max_parallel` bounds concurrent readahead requests of `readahead_chunk`
        bytes at most; `memory` bounds the recently verified blocks kept in memory.

        `free_space` (statvfs by default), `files` (the file work) and `io` (the worker threads
        it runs in, four by default) are where a test puts its hand on the disk.
        """
        if budget < 0 or block_size <= 0 or min_free < 0 or readahead < 0 or memory < 0:
            raise ValueError("sizes must not be negative, and block_size must be positive")
        if max_parallel <= 0 or rescan_interval <= 0:
            raise ValueError("max_parallel and rescan_interval must be positive")
        directory = Path(directory)
        self._dir = directory
        self._block_size = block_size
        self._rescan_interval = rescan_interval
        free_space = free_space or FreeSpace(partial(available, directory))
        self._keeper = Keeper(
            directory,
            Index(budget, min_free, free_space),
            memory=memory,
            files=files or BlockFiles(),
            io=io or trio.CapacityLimiter(_IO_THREADS),
        )
        self.instance = self._keeper.instance
        """This store's name in the directory: its lock file and temporary files carry it."""
        self._flights = Flights(self._keeper, block_size)
        limits = Limits(
            block_size=block_size,
            readahead=min(readahead, budget // 4) // block_size * block_size,
            chunk_blocks=max(1, readahead_chunk // block_size),
            ahead_limit=budget // 4 // (block_size + HEADER_SIZE),
        )
        self._readahead = Readahead(limits, self._flights, self._keeper, max_parallel)
        self._service_scope: trio.CancelScope | None = None
        self._service_done = trio.Event()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def read(
        self,
        key: str,
        size: int,
        offset: int,
        length: int,
        fetch: Fetch,
        *,
        reader: int | None = None,
    ) -> bytes:
        """Return bytes `[offset, min(offset + length, size))` of the object named by `key`.

        `key` names one immutable byte sequence of `size` bytes (the caller puts its version in
        it). Cached blocks are served; missing ones are fetched with `fetch` and kept, and a
        sequential reader gets the blocks after it fetched ahead in parallel. `reader` names
        an open file (its readahead is its own, and goes when `close_reader` is called);
        without one, reads of a key share their sequential-read state.
        """
        if size < 0 or offset < 0 or length < 0:
            raise ValueError("size, offset and length must not be negative")
        end = min(offset + length, size)
        if offset >= end:
            return b""
        if self._keeper.closed:
            raise RuntimeError("BlockStore is closed")
        await self._start_service()
        block_size = self._block_size
        key_digest = digest(block_size, key)
        self._readahead.follow(reader, key, key_digest, size, offset, end, fetch)
        # A schedule point even when every block is in memory: it lets the readahead dispatcher
        # claim the blocks just queued, and other readers run.
        await trio.lowlevel.checkpoint()
        parts = []
        for index in range(offset // block_size, (end - 1) // block_size + 1):
            ref = block_ref(block_size, key_digest, size, index)
            lo, hi = max(offset, ref.start) - ref.start, min(end, ref.end) - ref.start
            data = self._keeper.cached(ref.name)  # the usual case: no flight needed
            if data is not None:
                parts.append(slice_of(data, lo, hi))
            else:
                parts.append(await self._flights.get(ref, fetch, lo, hi))
        if len(parts) == 1 and isinstance(parts[0], bytes):
            return parts[0]  # a whole block (the kernel's 1 MiB reads), or early bytes: no copy
        return b"".join(parts)

    async def holds(self, key: str, size: int) -> bool:
        """Whether every block of the object is on disk: then a batch fill has nothing to bring
        (blocks only in memory do not count, they may be gone by the time they are read)."""
        key_digest = digest(self._block_size, key)
        present = all(
            self._keeper.stored(block_ref(self._block_size, key_digest, size, index))
            for index in range(-(-size // self._block_size))
        )
        await self._keeper.trim()  # the check may have found blocks this process did not count
        return present

    async def put(self, key: str, data: bytes) -> None:
        """Keep `data`, all of the object named by `key`, as reads of it would have: for bytes
        that came another way (a Scenario batch export) and were checked by the caller.

        Blocks on disk or being downloaded stay as they are; the budget, the free-space floor
        and eviction apply as to any download.
        """
        if self._keeper.closed:
            raise RuntimeError("BlockStore is closed")
        await self._start_service()
        key_digest = digest(self._block_size, key)
        for index in range(-(-len(data) // self._block_size)):
            ref = block_ref(self._block_size, key_digest, len(data), index)
            if ref.name not in self._flights and not self._keeper.stored(ref):
                await self._keeper.store(ref, data[ref.start : ref.end])

    def close_reader(self, reader: int) -> None:
        """The reader's file is closed: its readahead not started yet is dropped (a download
        already running finishes, and its blocks are kept)."""
        self._readahead.close_reader(reader)

    async def keep(self, key: str, fetch: Callable[[Sink], Awaitable[None]]) -> int:
        """Fetch a whole object of unknown size and keep its blocks; return its size.

        `fetch` hands all of the object's bytes to the sink, in order. Each full block is
        stored as soon as it is in (a block's name does not depend on the size, only the last
        one's length does), the last one once `fetch` has returned: only then is the size
        known. A fetch that fails leaves the full blocks stored so far; they are right bytes
        of `key`, and are read only by a caller that knows the size, which nothing but a
        complete fetch tells, so a half-fetched object is never served.
        """
        if self._keeper.closed:
            raise RuntimeError("BlockStore is closed")
        return await self._flights.keep(digest(self._block_size, key), fetch)

    def stats(self) -> CacheStats:
        """A snapshot of what this store holds and has done."""
        index, flights = self._keeper.index, self._flights
        return CacheStats(
            bytes_held=index.total,
            blocks_held=len(index),
            budget=index.budget,
            min_free=index.min_free,
            hits=self._keeper.hits + flights.hits,
            misses=flights.misses,
            bytes_fetched=flights.bytes_fetched,
            fetches=flights.fetches,
            downloads_in_flight=flights.downloads,
            evictions=index.evictions,
            corrupt_blocks=self._keeper.corrupt_blocks,
            disk_reads=self._keeper.disk_reads,
            memory_bytes=self._keeper.memory_total,
            index_complete=index.complete,
        )

    async def rescan(self) -> None:
        """Re-learn which blocks are on disk, then evict down to the budget.

        Other processes sharing the directory add and evict blocks too; the background task
        calls this every `rescan_interval` seconds so this process's accounting follows them.
        """
        await self._keeper.rescan()

    async def drain(self) -> None:
        """Wait until the downloads running in the background (left behind readers, or read
        ahead) have stored their blocks or failed: after it, every block a reader was given
        bytes of is on disk, unless it could not be stored."""
        await self._flights.background.wait_none()

    async def aclose(self) -> None:
        """Finish the downloads behind readers (what was read stays read; a few seconds at
        most), stop background work and release the directory (the files stay for the next
        run).

        The lock is what tells other processes that this one's temporary files are being
        written, so it goes last: once closed, no write starts (readers still in `read` get
        their bytes, uncached), and the writes already in a worker thread, which cannot be
        cancelled, are waited for, whoever started them.
        """
        if self._keeper.closed:
            return
        with trio.move_on_after(_DRAIN_ON_CLOSE):
            await self.drain()
        self._keeper.close()
        if self._service_scope is not None:
            self._service_scope.cancel()
            await self._service_done.wait()
        await self._keeper.release()

    async def _start_service(self) -> None:
        """Start the background task (scan, clean-up, readahead) on first use.

        It is a trio system task so that callers need not lend a nursery; it catches what its
        children raise, so a bug there is logged rather than crashing the whole run.
        """
        if self._service_scope is not None:
            return
        self._service_scope = trio.CancelScope()
        started = trio.Event()

        async def service() -> None:
            try:
                with self._service_scope:
                    async with trio.open_nursery() as nursery:
                        self._flights.nursery = nursery
                        nursery.start_soon(self._maintain)
                        nursery.start_soon(self._readahead.dispatch)
                        self._readahead.active = True
                        started.set()
            except Exception:
                log.exception("block cache background task failed")
            finally:
                self._flights.nursery = None
                self._readahead.active = False
                started.set()
                self._service_done.set()

        trio.lowlevel.spawn_system_task(service, name=f"BlockStore({self._dir})")
        await started.wait()

    async def _maintain(self) -> None:
        """Clean up after dead processes, learn what is on disk, and keep re-learning it.

        A huge cache is scanned less often than `rescan_interval`, so that scanning never
        takes more than about 5% of the time.
        """
        await self._keeper.remove_dead_leftovers()
        while True:
            started = trio.current_time()
            try:
                await self.rescan()
            except OSError as exc:
                log.warning("could not scan the block cache %s: %s", self._dir, exc)
            elapsed = trio.current_time() - started
            await trio.sleep(max(self._rescan_interval, 20 * elapsed))
