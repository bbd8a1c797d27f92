"""The disk block store: fixed-size, checksummed blocks of immutable remote byte sequences.

The invariants (who may evict what, what a crash leaves behind and why that is safe, what two
processes sharing one directory may rely on) are written down in NOTES.md beside this file; read
it before changing anything here.

The store knows nothing of HTTP, FUSE or the services: a caller names an immutable byte
sequence by a key, gives its size, and hands over a `Fetch` callback that returns any range of
it. Blocks are files named by a hash of the key, so keys may contain any character.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import heapq
import itertools
import logging
import mmap
import os
import re
import secrets
import struct
import time
import zlib
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import trio

from fsmount.errors import FetchError

log = logging.getLogger(__name__)

Sink = Callable[[bytes], Awaitable[None]]
"""Takes the next piece of a range being fetched: consecutive calls, consecutive bytes."""

Fetch = Callable[[int, int, Sink], Awaitable[None]]
"""`(start, end_exclusive, sink)`: hand exactly those bytes of the object to `sink`, in order,
in pieces of any size as they arrive (an HTTP body's chunks), or raise.

Every piece handed over must be right: a failure only means the rest is missing. Pieces let
the store cut a range into blocks with one copy each (joining the range first would cost a
second copy, and an allocation of its size), store each block as soon as it is complete, and
answer a reader that needs only the first bytes of a block as soon as they are in."""

# Downloads a reader leaves running after it got the bytes it asked for (the rest of its block
# is still kept). Bounded, so that fast random readers cannot pile up downloads; beyond it a
# reader waits for its whole block as before.
_BEHIND = 16
# A reader of bytes far into a block gets them first (that part of the block, then the rest)
# when, at the recent download rate, the bytes before them would make it wait longer than this:
# a far store, not a fast one, where the extra request costs more than it saves.
_TAIL_FIRST_WAIT = 0.005  # seconds
_RATE_SAMPLE = 256 << 10  # fetches at least this long measure the download rate
_DRAIN_ON_CLOSE = 5.0  # seconds an unmount waits for them; a stalled server must not hold it

# A block file is a header page followed by the block's bytes. The header names what the block
# is (key digest, index, length), every field of which is checked against what the reader
# expects, so a file in the wrong place is never served; and it carries the CRC-32 of the data
# (zlib's runs at ~2.7 GB/s here, four times blake2b). The header is padded to a whole page so
# that the data is page-aligned in the file and the block can be written with O_DIRECT.
_MAGIC = b"FSMB"
_FORMAT = 2  # 1 had a 44-byte header; it is part of the block names, so old files just age out
_HEADER = struct.Struct("<4sIQQ16sI")  # magic, format, index, length, key digest, data crc
_PAGE = 4096  # O_DIRECT alignment of buffer, offset and length (any logical block size <= 4 KiB)
HEADER_SIZE = _PAGE
"""Bytes each block file holds beyond its data; they count against the budget."""

_TMP = "tmp"  # files being written: "<instance>.<n>", renamed into a shard when complete
_LOCKS = "locks"  # "<instance>.lock", flock-ed by its living process for as long as it runs
_SHARD_NAME = re.compile("[0-9a-f]{2}")  # blocks live in "<shard>/<key digest>-<block index>"
_BLOCK_NAME = re.compile("[0-9a-f]{32}-[0-9]+")

_READAHEAD_CHUNK = 8 << 20  # bytes per readahead request (rounded to whole blocks)
_TOUCH_INTERVAL = 600.0  # seconds between mtime updates of a block file that keeps being read
# A read at most this many of its own lengths past the last one still counts as sequential:
# the kernel's parallel readahead requests of one reader overtake each other by a few.
_OUT_OF_ORDER = 4
_STREAMS = 1024  # readers (or keys read without one) whose sequential-read state is remembered
_EVICTION_BATCH = 64  # files deleted per worker-thread call when trimming to the budget
_IO_THREADS = 4
# A statvfs reading serves this long (seconds), corrected by what this process stored and
# deleted since: a syscall on the event loop per block written was a measurable cost.
_FREE_SPACE_INTERVAL = 0.25


class CacheInUseError(Exception):
    """The cache directory is used by running processes; `pids` names them."""

    def __init__(self, directory: Path, pids: list[int]) -> None:
        super().__init__(f"{directory} is in use by process(es) {', '.join(map(str, pids))}")
        self.pids = pids


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


@dataclass(frozen=True, slots=True)
class CacheUsage:
    """What a cache directory holds on disk, and which processes use it (for `fsmount cache`)."""

    bytes_held: int
    blocks_held: int
    users: list[int]


@dataclass(frozen=True, slots=True)
class _Ref:
    """One block of one object: its file name (relative to the directory) and its byte range."""

    name: str
    digest: bytes
    index: int
    start: int
    end: int


@dataclass(slots=True)
class _Entry:
    """A block file this process accounts for."""

    size: int  # bytes on disk, header included
    used: float  # wall-clock time of its last use (the file's mtime if another process made it)
    synced: float  # the file's mtime as last set or seen, so touches can be rate-limited


@dataclass(eq=False, slots=True)
class _Stream:
    """Sequential-read state of one reader of one key: where its last read ended, how far to
    read ahead, and what of that is scheduled."""

    key: str
    next_offset: int = 0
    window: int = 0  # readahead bytes; 0 until reads continue where the previous one ended
    ahead: int = 0  # first block index not yet scheduled for readahead
    counted: int = 0  # blocks scheduled ahead of the reader, in the store's `_ahead`
    queued: set[int] = field(default_factory=set)  # its chunks waiting in the queue
    dropped: bool = False  # closed, reset or forgotten: nothing more is started for it


@dataclass(frozen=True, slots=True)
class _Chunk:
    """Blocks `[first, stop)` of one object, to be fetched ahead of a sequential reader."""

    stream: _Stream
    digest: bytes
    size: int
    first: int
    stop: int
    fetch: Fetch


class _Flight:
    """One load or download of one block; other readers of the block wait for it.

    While the block is downloaded, `parts` and `received` show the bytes that have arrived,
    so a reader that needs only its start need not wait for the rest.
    """

    __slots__ = (
        "data",
        "done",
        "downloaded",
        "error",
        "offset",
        "parts",
        "progress",
        "received",
        "tail",
        "whole",
    )

    def __init__(self, *, downloaded: bool) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: Exception | None = None
        self.downloaded = downloaded
        self.parts: list[memoryview] = []  # bytes [offset, offset + received) of the block
        self.offset = 0
        self.received = 0
        self.tail: tuple[int, bytes] | None = None  # (offset, bytes to the end), if fetched first
        self.whole: bytes | None = None  # all of the block, once in (before it is stored)
        self.progress = trio.Event()  # set, and replaced, when bytes arrive or the flight ends

    def advance(self, parts: list[memoryview], received: int, offset: int = 0) -> None:
        self.parts, self.received, self.offset = parts, received, offset
        self.progress.set()
        self.progress = trio.Event()

    def arrive(self, block: bytes) -> None:
        """All of the block is in: readers need not wait for it to be stored."""
        self.whole = block
        self.advance([], len(block))

    def finish(self) -> None:
        self.done.set()
        self.progress.set()

    def arrived(self, lo: int, hi: int) -> bytes | memoryview | None:
        """Bytes `[lo, hi)` of the block if they have all arrived, else None."""
        if self.whole is not None:
            return _slice(self.whole, lo, hi)
        if self.tail is not None and lo >= self.tail[0]:
            return _slice(self.tail[1], lo - self.tail[0], hi - self.tail[0])
        if lo < self.offset or self.offset + self.received < hi:
            return None
        out, at = [], self.offset
        for part in self.parts:
            if at >= hi:
                break
            if at + len(part) > lo:
                out.append(part[max(lo - at, 0) : hi - at])
            at += len(part)
        return b"".join(out)

    async def wait(self, lo: int, hi: int) -> bytes | memoryview | None:
        """Bytes `[lo, hi)` of the block as soon as they are in; None if the flight ends
        without the block (see `error`)."""
        while not self.done.is_set():
            early = self.arrived(lo, hi)
            if early is not None:
                return early
            await self.progress.wait()
        return None if self.data is None else _slice(self.data, lo, hi)


class _Cutter:
    """The sink of one fetch: cuts its pieces into the blocks of a run as they arrive, with
    one copy per block (none for a piece that is exactly one), shows each block's progress to
    its flight, and hands each complete block to `complete`.

    The last block is handed over by `finish`, once the fetch has returned exactly the bytes
    asked for: a fetch that turns out short or long stores nothing of its last block.
    """

    def __init__(
        self,
        run: list[_Ref],
        flights: list[_Flight],
        complete: Callable[[int, bytes], Awaitable[None]],
    ) -> None:
        self._lengths = [ref.end - ref.start for ref in run]
        self._flights = flights
        self._complete = complete
        self._index = 0  # the block being filled
        self._parts: list[memoryview] = []
        self._have = 0  # bytes of that block in `_parts`
        self._last: bytes | None = None
        self.received = 0

    async def __call__(self, piece: bytes) -> None:
        self.received += len(piece)
        view, at = memoryview(piece), 0
        while at < len(piece):
            if self._index == len(self._lengths):
                raise FetchError.eio(f"got more than the {sum(self._lengths)} bytes asked for")
            want = self._lengths[self._index]
            flight = self._flights[self._index]
            if not self._have and not at and len(piece) == want:
                block, at = piece, len(piece)
            else:
                take = min(want - self._have, len(piece) - at)
                self._parts.append(view[at : at + take])
                at += take
                self._have += take
                if self._have < want:
                    flight.advance(self._parts, self._have)
                    continue
                block = b"".join(self._parts)
                self._parts, self._have = [], 0
            self._index += 1
            flight.arrive(block)
            if self._index < len(self._lengths):
                await self._complete(self._index - 1, block)
            else:
                self._last = block

    async def finish(self) -> None:
        if self._last is None:
            raise FetchError.eio(f"got {self.received} of {sum(self._lengths)} bytes")
        await self._complete(len(self._lengths) - 1, self._last)


class _Running:
    """How many of some kind of work are running, and a way to wait until none is."""

    __slots__ = ("_none", "count")

    def __init__(self) -> None:
        self.count = 0
        self._none = trio.Event()
        self._none.set()

    def enter(self) -> None:
        self.count += 1
        if self.count == 1:
            self._none = trio.Event()

    def leave(self) -> None:
        self.count -= 1
        if not self.count:
            self._none.set()

    async def wait_none(self) -> None:
        while self.count:  # another may have started between the event and this check
            await self._none.wait()


class _Eviction:
    """Blocks already forgotten by the index whose files a worker thread is deleting."""

    __slots__ = ("done", "names", "paths", "size")

    def __init__(self, names: list[str], paths: list[str], size: int) -> None:
        self.names = names
        self.paths = paths
        self.size = size
        self.done = trio.Event()


class _CorruptBlock(Exception):
    """A block file failed verification; the message says how."""


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
    ) -> None:
        """Open (creating if needed) the cache in `directory` and mark it in use.

        `budget` bounds the bytes of block files (headers included); `min_free` is the free
        space the store always leaves on the filesystem; `readahead` caps the bytes fetched
        ahead of one sequential reader, and all readers together have at most a quarter of the
        budget fetched (or queued) ahead of them, so their read-ahead blocks do not push each
        other out; `max_parallel` bounds concurrent readahead requests; `memory` bounds the
        recently verified blocks kept in memory.
        """
        if budget < 0 or block_size <= 0 or min_free < 0 or readahead < 0 or memory < 0:
            raise ValueError("sizes must not be negative, and block_size must be positive")
        if max_parallel <= 0 or rescan_interval <= 0:
            raise ValueError("max_parallel and rescan_interval must be positive")
        self._dir = Path(directory)
        self._budget = budget
        self._block_size = block_size
        self._min_free = min_free
        self._readahead = min(readahead, budget // 4) // block_size * block_size
        self._ahead_limit = budget // 4 // (block_size + HEADER_SIZE)  # blocks, all readers
        self._chunk_blocks = max(1, _READAHEAD_CHUNK // block_size)
        self._memory_budget = memory
        self._rescan_interval = rescan_interval

        self._index: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._total = 0  # sum of the sizes in _index
        self._reserved = 0  # bytes being written, already counted against budget and disk
        self._pins: Counter[str] = Counter()  # blocks being read from disk: never evicted
        self._doomed: dict[str, _Eviction] = {}  # evicted blocks whose files are being deleted
        self._freeing = 0  # bytes of those files
        self._flights: dict[str, _Flight] = {}
        self._memory: OrderedDict[str, bytes] = OrderedDict()
        self._memory_total = 0
        # per reader (a key read without one counts as its own reader), least recent first
        self._streams: OrderedDict[int | str, _Stream] = OrderedDict()
        self._ahead = 0  # blocks scheduled ahead of their readers: the sum of `counted`
        self._sequential = 0  # streams with a window, among which `_ahead_limit` is shared
        self._io = trio.CapacityLimiter(_IO_THREADS)
        self._direct = True  # O_DIRECT block writes, until the filesystem refuses them
        self._nursery: trio.Nursery | None = None  # the background service's, while it runs
        self._behind = trio.Semaphore(_BEHIND)
        self._rate: float | None = None  # bytes per second of recent fetches (moving average)
        self._background = _Running()  # downloads without a reader waiting for all of them
        self._writes = _Running()  # block files being written by worker threads
        self._scans: list[set[str]] = []  # per running scan: the names forgotten since it began
        self._slots = trio.Semaphore(max_parallel)  # readahead downloads in flight
        # Readahead work, oldest first, by sequence number: bounded, as its chunks are counted
        # in `_ahead`; a reader's chunks leave it when the reader closes. It holds no data.
        self._queue: dict[int, _Chunk] = {}
        self._queue_serial = itertools.count()
        self._queue_ready = trio.Event()
        self._tmp_names = itertools.count()
        self._counters: Counter[str] = Counter()
        self._downloads = 0
        self._index_complete = False
        self._free_read_at = -_FREE_SPACE_INTERVAL  # monotonic time of the last statvfs
        self._free_read = 0  # what it said
        self._free_delta = 0  # bytes this process freed minus bytes it stored since
        self._service_running = False
        self._service_scope: trio.CancelScope | None = None
        self._service_done = trio.Event()
        self._closed = False

        _make_private_dir(self._dir)
        _make_private_dir(self._dir / _TMP)
        _make_private_dir(self._dir / _LOCKS)
        self._instance, self._lock_fd = _take_lock(self._dir / _LOCKS)

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
        if self._closed:
            raise RuntimeError("BlockStore is closed")
        await self._start_service()
        digest = _digest(self._block_size, key)
        last = (end - 1) // self._block_size
        self._plan_readahead(reader, key, digest, size, offset, end, last, fetch)
        # A schedule point even when every block is in memory: it lets the readahead dispatcher
        # claim the blocks just queued, and other readers run.
        await trio.lowlevel.checkpoint()
        parts = []
        for index in range(offset // self._block_size, last + 1):
            ref = self._ref(digest, size, index)
            lo, hi = max(offset, ref.start) - ref.start, min(end, ref.end) - ref.start
            parts.append(await self._get(ref, fetch, lo, hi))
        if len(parts) == 1 and isinstance(parts[0], bytes):
            return parts[0]  # a whole block (the kernel's 1 MiB reads), or early bytes: no copy
        return b"".join(parts)

    async def holds(self, key: str, size: int) -> bool:
        """Whether every block of the object is on disk: then a batch fill has nothing to bring
        (blocks only in memory do not count, they may be gone by the time they are read)."""
        digest = _digest(self._block_size, key)
        present = all(
            self._stored(self._ref(digest, size, index))
            for index in range(-(-size // self._block_size))
        )
        await self._trim()  # the check may have found blocks this process did not count
        return present

    async def put(self, key: str, data: bytes) -> None:
        """Keep `data`, all of the object named by `key`, as reads of it would have: for bytes
        that came another way (a Scenario batch export) and were checked by the caller.

        Blocks on disk or being downloaded stay as they are; the budget, the free-space floor
        and eviction apply as to any download.
        """
        if self._closed:
            raise RuntimeError("BlockStore is closed")
        await self._start_service()
        digest = _digest(self._block_size, key)
        for index in range(-(-len(data) // self._block_size)):
            ref = self._ref(digest, len(data), index)
            if ref.name not in self._flights and not self._stored(ref):
                await self._store(ref, data[ref.start : ref.end])

    def close_reader(self, reader: int) -> None:
        """The reader's file is closed: its readahead not started yet is dropped (a download
        already running finishes, and its blocks are kept)."""
        stream = self._streams.pop(reader, None)
        if stream is not None:
            self._drop(stream)

    async def keep(self, key: str, fetch: Callable[[Sink], Awaitable[None]]) -> int:
        """Fetch a whole object of unknown size and keep its blocks; return its size.

        `fetch` hands all of the object's bytes to the sink, in order. Each full block is
        stored as soon as it is in (a block's name does not depend on the size, only the last
        one's length does), the last one once `fetch` has returned: only then is the size
        known. A fetch that fails leaves the full blocks stored so far; they are right bytes
        of `key`, and are read only by a caller that knows the size, which nothing but a
        complete fetch tells, so a half-fetched object is never served.
        """
        if self._closed:
            raise RuntimeError("BlockStore is closed")
        digest = _digest(self._block_size, key)
        parts: list[memoryview] = []
        have = 0  # bytes of the block being filled
        kept = 0  # bytes of the object in blocks already stored

        async def store(block: bytes) -> None:
            nonlocal kept
            index = kept // self._block_size
            await self._store(self._ref(digest, kept + len(block), index), block)
            kept += len(block)

        async def sink(piece: bytes) -> None:
            nonlocal parts, have
            view, at = memoryview(piece), 0
            while at < len(piece):
                take = min(self._block_size - have, len(piece) - at)
                parts.append(view[at : at + take])
                at += take
                have += take
                if have == self._block_size:
                    block = b"".join(parts)
                    parts, have = [], 0
                    await store(block)

        self._downloads += 1
        try:
            await fetch(sink)
        finally:
            self._downloads -= 1
        if have:
            await store(b"".join(parts))
        self._counters["fetches"] += 1
        self._counters["bytes_fetched"] += kept
        return kept

    def stats(self) -> CacheStats:
        """A snapshot of what this store holds and has done."""
        return CacheStats(
            bytes_held=self._total,
            blocks_held=len(self._index),
            budget=self._budget,
            min_free=self._min_free,
            hits=self._counters["hits"],
            misses=self._counters["misses"],
            bytes_fetched=self._counters["bytes_fetched"],
            fetches=self._counters["fetches"],
            downloads_in_flight=self._downloads,
            evictions=self._counters["evictions"],
            corrupt_blocks=self._counters["corrupt_blocks"],
            disk_reads=self._counters["disk_reads"],
            memory_bytes=self._memory_total,
            index_complete=self._index_complete,
        )

    async def rescan(self) -> None:
        """Re-learn which blocks are on disk, then evict down to the budget.

        Other processes sharing the directory add and evict blocks too; the background task
        calls this every `rescan_interval` seconds so this process's accounting follows them.
        """
        started = time.time()
        forgotten: set[str] = set()  # by this process while the directory is listed
        self._scans.append(forgotten)
        try:
            found = await trio.to_thread.run_sync(_scan_blocks, self._dir, limiter=self._io)
        finally:
            self._scans.remove(forgotten)
        self._merge_scan(found, started, forgotten)
        await self._trim()
        self._index_complete = True

    async def drain(self) -> None:
        """Wait until the downloads running in the background (left behind readers, or read
        ahead) have stored their blocks or failed: after it, every block a reader was given
        bytes of is on disk, unless it could not be stored."""
        await self._background.wait_none()

    async def aclose(self) -> None:
        """Finish the downloads behind readers (what was read stays read; a few seconds at
        most), stop background work and release the directory (the files stay for the next
        run).

        The lock is what tells other processes that this one's temporary files are being
        written, so it goes last: once closed, no write starts (readers still in `read` get
        their bytes, uncached), and the writes already in a worker thread, which cannot be
        cancelled, are waited for, whoever started them.
        """
        if self._closed:
            return
        with trio.move_on_after(_DRAIN_ON_CLOSE):
            await self.drain()
        self._closed = True
        if self._service_scope is not None:
            self._service_scope.cancel()
            await self._service_done.wait()
        await self._writes.wait_none()
        _release_lock(self._dir / _LOCKS, self._instance, self._lock_fd)

    # -- the read path ----------------------------------------------------------------------

    def _ref(self, digest: bytes, size: int, index: int) -> _Ref:
        hexdigest = digest.hex()
        start = index * self._block_size
        return _Ref(
            name=f"{hexdigest[:2]}/{hexdigest}-{index}",
            digest=digest,
            index=index,
            start=start,
            end=min(start + self._block_size, size),
        )

    async def _get(self, ref: _Ref, fetch: Fetch, lo: int, hi: int) -> bytes | memoryview:
        """Bytes `[lo, hi)` of one verified block: from memory, from disk, or downloaded (one
        flight per block).

        A reader that waited for a flight that failed tries once more itself (the failure may
        have been another reader's cancellation or a transient error); a second failure is
        raised, as is the leader's own. A leader that needs only part of a block it downloads
        returns as soon as that part is in, leaving the rest of the download running (up to
        `_BEHIND` of them): a random 4 KiB read then waits for 4 KiB, not for 1 MiB.
        """
        failures_seen = 0
        while True:
            data = self._memory.get(ref.name)
            if data is not None:
                self._memory.move_to_end(ref.name)
                self._counters["hits"] += 1
                self._touch(ref.name)
                return _slice(data, lo, hi)
            flight = self._flights.get(ref.name)
            if flight is None:
                break
            got = await flight.wait(lo, hi)
            if got is not None:
                self._counters["misses" if flight.downloaded else "hits"] += 1
                return got
            if flight.error is not None:
                failures_seen += 1
                if failures_seen > 1:
                    raise flight.error
        flight = self._flights[ref.name] = _Flight(downloaded=False)
        behind = False
        try:
            data = await self._load(ref)
            if data is None:
                flight.downloaded = True
                whole = lo == 0 and hi == ref.end - ref.start
                behind = not whole and self._start_behind(ref, flight, fetch, lo)
                if behind:
                    got = await flight.wait(lo, hi)
                    if got is None:
                        raise flight.error or FetchError.eio("the block cache is closing")
                    self._counters["misses"] += 1
                    return got
                data = await self._download(ref, flight, fetch)
            self._counters["misses" if flight.downloaded else "hits"] += 1
            flight.data = data
            return _slice(data, lo, hi)
        except Exception as exc:
            if not behind:
                flight.error = exc
            raise
        finally:
            if not behind:  # else the download behind ends the flight
                del self._flights[ref.name]
                flight.finish()

    def _start_behind(self, ref: _Ref, flight: _Flight, fetch: Fetch, lo: int) -> bool:
        """Download a block in the background, if a slot is free; the caller waits on its
        flight for the bytes it needs, from `lo` on."""
        if self._nursery is None:
            return False
        try:
            self._behind.acquire_nowait()
        except trio.WouldBlock:
            return False
        self._background.enter()
        self._nursery.start_soon(self._download_behind, ref, flight, fetch, lo)
        return True

    async def _download_behind(self, ref: _Ref, flight: _Flight, fetch: Fetch, lo: int) -> None:
        split = lo - lo % _PAGE
        rate = self._rate
        try:
            if split and rate and split / rate > _TAIL_FIRST_WAIT:
                flight.data = await self._download_tail_first(ref, flight, fetch, split)
            else:
                flight.data = await self._download(ref, flight, fetch)
        except Exception as exc:  # the reader that started it raises it, as do its waiters
            log.debug("download of %s failed: %s", ref.name, exc)
            flight.error = exc
        finally:
            del self._flights[ref.name]
            flight.finish()
            self._behind.release()
            self._background.leave()

    async def _download_tail_first(
        self, ref: _Ref, flight: _Flight, fetch: Fetch, split: int
    ) -> bytes:
        """The block in two requests, its bytes from `split` on first: the reader that wants
        them gets them after one round trip, not after the bytes before them."""
        tail = await self._fetch_part(fetch, ref.start + split, ref.end, flight, split)
        flight.tail = (split, tail)
        head = await self._fetch_part(fetch, ref.start, ref.start + split, flight, 0)
        block = head + tail
        flight.arrive(block)
        await self._store(ref, block)
        return block

    async def _fetch_part(
        self, fetch: Fetch, start: int, end: int, flight: _Flight, offset: int
    ) -> bytes:
        """Bytes `[start, end)` of an object, part of one block from `offset` in it; the
        flight shows them as they arrive."""
        parts: list[memoryview] = []
        have = 0

        async def sink(piece: bytes) -> None:
            nonlocal have
            if have + len(piece) > end - start:
                raise FetchError.eio(f"got more than the {end - start} bytes asked for")
            parts.append(memoryview(piece))
            have += len(piece)
            flight.advance(parts, have, offset)

        await self._counted_fetch(fetch, start, end, sink, lambda: have)
        return b"".join(parts)

    async def _counted_fetch(
        self, fetch: Fetch, start: int, end: int, sink: Sink, received: Callable[[], int]
    ) -> None:
        """One fetch into `sink`: counted while in flight, checked to have delivered exactly
        `[start, end)` (`received` tells what the sink got), and timed: the longer ones teach
        the store the download rate."""
        began = trio.current_time()
        self._downloads += 1
        try:
            await fetch(start, end, sink)
        finally:
            self._downloads -= 1
        length = received()
        if length != end - start:
            raise FetchError.eio(f"asked for {end - start} bytes at {start}, got {length}")
        self._counters["fetches"] += 1
        self._counters["bytes_fetched"] += length
        seconds = trio.current_time() - began
        if length >= _RATE_SAMPLE and seconds > 0:
            sample = length / seconds
            self._rate = sample if self._rate is None else 0.8 * self._rate + 0.2 * sample

    async def _load(self, ref: _Ref) -> bytes | None:
        """Read and verify a block file; None when it is missing or bad (a bad one is deleted)."""
        path = self._path(ref.name)
        self._pins[ref.name] += 1
        try:
            found = await trio.to_thread.run_sync(_read_block_file, path, ref, limiter=self._io)
        except _CorruptBlock as exc:
            log.warning("cache block %s is corrupt (%s): deleting it and fetching again", path, exc)
            self._counters["corrupt_blocks"] += 1
            self._forget(ref.name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return None
        except OSError as exc:  # a failing cache disk must not fail reads the network can serve
            log.warning("could not read cache block %s: %s", path, exc)
            self._forget(ref.name)
            return None
        finally:
            self._pins[ref.name] -= 1
            if not self._pins[ref.name]:
                del self._pins[ref.name]
        if found is None:
            self._forget(ref.name)  # another process evicted it, or it was never there
            return None
        data, file_size, mtime = found
        self._counters["disk_reads"] += 1
        self._remember(ref.name, data)
        if ref.name in self._index:
            self._touch(ref.name)
        elif ref.name not in self._doomed:  # by an earlier run or another process, not scanned
            self._adopt(ref.name, file_size, mtime)
            await self._trim()
        return data

    async def _download(self, ref: _Ref, flight: _Flight, fetch: Fetch) -> bytes:
        blocks: list[bytes] = []

        async def complete(_: int, block: bytes) -> None:
            blocks.append(block)

        await self._fetch(fetch, [ref], [flight], complete)
        await self._store(ref, blocks[0])
        return blocks[0]

    async def _fetch(
        self,
        fetch: Fetch,
        run: list[_Ref],
        flights: list[_Flight],
        complete: Callable[[int, bytes], Awaitable[None]],
    ) -> None:
        """Fetch a run of consecutive blocks in one request, handing each to `complete` (with
        its position in the run) as soon as it is in."""
        cutter = _Cutter(run, flights, complete)
        await self._counted_fetch(fetch, run[0].start, run[-1].end, cutter, lambda: cutter.received)
        await cutter.finish()

    async def _store(self, ref: _Ref, data: bytes) -> None:
        """Keep a downloaded block on disk if the budget and free space allow, and in memory.

        Nothing is written when room cannot be made (every other block is in use, or the block
        alone exceeds the budget): the reader still gets its bytes. The victims' files are
        deleted in the same worker-thread call, before the new file is written, so the
        directory never holds more than this process accounts for. Memory gets the block last.
        Readers waiting on the block's flight got its bytes as soon as they were in (they do
        not wait for the disk); a downloaded block is on disk once its flight has ended, and
        every background one once `drain` returns, unless it could not be stored.
        """
        while (eviction := self._doomed.get(ref.name)) is not None:
            await eviction.done.wait()  # an older copy is being deleted: write after that
        size = HEADER_SIZE + len(data)
        # Checked and counted with no await in between, so aclose either sees this write or
        # this write sees the store closed (and only keeps the block in memory).
        eviction = None if self._closed else self._make_room(size)
        if eviction is not None:
            self._writes.enter()
            self._reserved += size
            tmp = self._dir / _TMP / f"{self._instance}.{next(self._tmp_names)}"
            final = self._path(ref.name)
            try:
                self._direct = await trio.to_thread.run_sync(
                    _write_block_file,
                    tmp,
                    final,
                    ref,
                    data,
                    eviction.paths,
                    self._direct,
                    limiter=self._io,
                )
            except OSError as exc:  # disk full, directory cleared under us...: serve uncached
                log.warning("could not store cache block %s: %s", ref.name, exc)
            else:
                self._forget(ref.name)  # a scan during the write may have counted it already
                now = time.time()
                self._index[ref.name] = _Entry(size, now, now)
                self._total += size
                self._free_delta -= size
            finally:
                self._reserved -= size
                self._finish(eviction)
                self._writes.leave()
        self._remember(ref.name, data)

    # -- accounting and eviction ------------------------------------------------------------

    def _path(self, name: str) -> str:
        return os.path.join(self._dir, name)

    def _touch(self, name: str) -> None:
        """Mark a block used: last in LRU order, and its file's mtime now (at most every 10 min,
        so the order survives a remount and other processes see the use)."""
        entry = self._index.get(name)
        if entry is None:
            return
        now = time.time()
        entry.used = now
        self._index.move_to_end(name)
        if now - entry.synced >= _TOUCH_INTERVAL:
            entry.synced = now
            try:
                os.utime(self._path(name))
            except FileNotFoundError:
                self._forget(name)  # another process evicted it
            except OSError as exc:  # e.g. a read-only cache directory: reads must still work
                log.debug("could not touch cache block %s: %s", name, exc)

    def _adopt(self, name: str, size: int, mtime: float) -> None:
        """Account for a block file found on disk (the caller trims to the budget after)."""
        self._index[name] = _Entry(size, time.time(), mtime)
        self._total += size

    def _forget(self, name: str) -> None:
        """Stop accounting for a block (evicted, missing or bad); a scan running now may have
        listed its file before it went, and must not count it again."""
        entry = self._index.pop(name, None)
        if entry is not None:
            self._total -= entry.size
        for forgotten in self._scans:
            forgotten.add(name)

    def _make_room(self, size: int) -> _Eviction | None:
        """Evict least recently used blocks so that `size` more bytes stay within the budget and
        above the free-space floor; None, evicting nothing, if that is impossible."""
        if size > self._budget:
            return None
        over_budget = self._total + self._reserved + size - self._budget
        available = self._free_space() + self._freeing
        short_of_space = self._min_free + self._reserved + size - available
        needed = max(over_budget, short_of_space)
        victims = self._victims(needed)
        if sum(self._index[name].size for name in victims) < needed:
            return None
        return self._evict(victims)

    def _free_space(self) -> int:
        """Free bytes on the cache's filesystem: a recent statvfs, corrected by our own writes
        and deletions since (another process's are seen at the next reading)."""
        now = time.monotonic()
        if now - self._free_read_at >= _FREE_SPACE_INTERVAL:
            self._free_read = _available(self._dir)
            self._free_read_at = now
            self._free_delta = 0
        return self._free_read + self._free_delta

    def _victims(self, needed: int, limit: int | None = None) -> list[str]:
        """Least recently used blocks not in use, adding up to at least `needed` bytes if they
        can (at most `limit` of them)."""
        victims: list[str] = []
        freed = 0
        for name, entry in self._index.items():
            if freed >= needed or len(victims) == limit:
                break
            if name not in self._pins:
                victims.append(name)
                freed += entry.size
        return victims

    def _evict(self, names: list[str]) -> _Eviction:
        """Forget blocks now; the caller deletes their files in a worker thread, because an
        unlink of a 1 MiB file takes ~350 µs here (ext4 mounted with `discard`)."""
        size = sum(self._index[name].size for name in names)
        eviction = _Eviction(names, [self._path(name) for name in names], size)
        for name in names:
            self._forget(name)
            self._doomed[name] = eviction
        self._freeing += size
        self._counters["evictions"] += len(names)
        return eviction

    def _finish(self, eviction: _Eviction) -> None:
        """The files of an eviction are deleted (or failed to be): the names may be reused."""
        for name in eviction.names:
            if self._doomed.get(name) is eviction:
                del self._doomed[name]
        self._freeing -= eviction.size
        self._free_delta += eviction.size
        eviction.done.set()

    async def _trim(self) -> None:
        """Evict down to the budget in batches, letting readers run in between."""
        while self._total > self._budget:
            victims = self._victims(self._total - self._budget, _EVICTION_BATCH)
            if not victims:
                return
            eviction = self._evict(victims)
            try:
                await trio.to_thread.run_sync(_unlink_all, eviction.paths, limiter=self._io)
            finally:
                self._finish(eviction)

    def _merge_scan(
        self, found: list[tuple[float, str, int]], started: float, forgotten: set[str]
    ) -> None:
        """Fold a directory scan (sorted by mtime) into the LRU index.

        Blocks this process knows keep their place; blocks it did not know are placed by their
        mtime (the last use any process recorded), unless this process `forgot` them while
        the scan ran (their files were listed, then deleted); known blocks missing from the
        scan and unused since it started were evicted by someone else and are forgotten.
        """
        on_disk = {name for _, name, _ in found}
        gone = [
            name
            for name, entry in self._index.items()
            if name not in on_disk and entry.used < started and name not in self._pins
        ]
        for name in gone:
            self._forget(name)
        unknown = [
            (mtime, name, _Entry(size, mtime, mtime))
            for mtime, name, size in found
            if name not in self._index and name not in self._doomed and name not in forgotten
        ]
        if not unknown:  # the usual case with one process: the order stands as it is
            return
        known = [(entry.used, name, entry) for name, entry in self._index.items()]
        merged = heapq.merge(unknown, known, key=lambda item: item[0])
        self._index = OrderedDict((name, entry) for _, name, entry in merged)
        self._total += sum(entry.size for _, _, entry in unknown)

    def _remember(self, name: str, data: bytes) -> None:
        """Keep verified bytes in memory, so a sequential reader's eight 128 KiB reads of one
        block read and check its file once."""
        if len(data) > self._memory_budget:
            return
        old = self._memory.pop(name, None)
        if old is not None:
            self._memory_total -= len(old)
        self._memory[name] = data
        self._memory_total += len(data)
        while self._memory_total > self._memory_budget:
            _, dropped = self._memory.popitem(last=False)
            self._memory_total -= len(dropped)

    # -- readahead --------------------------------------------------------------------------

    def _plan_readahead(
        self,
        reader: int | None,
        key: str,
        digest: bytes,
        size: int,
        offset: int,
        end: int,
        last: int,
        fetch: Fetch,
    ) -> None:
        """Detect a sequential reader and schedule the blocks ahead of it.

        A read starting where the previous one ended, or a few of its lengths past it (the
        kernel sends its own readahead requests in parallel, so they arrive out of order; a
        random reader almost never lands that close), doubles the window
        (up to the readahead cap); a read slightly behind it keeps the state; any other read
        starts afresh with no readahead. The window is further cut to what the other readers
        leave of the store's limit on blocks ahead (`_ahead_limit`).
        """
        if not self._readahead or not self._service_running:
            return
        ident = key if reader is None else reader
        stream = self._streams.get(ident)
        near = (
            stream is not None
            and stream.key == key
            and stream.next_offset - self._block_size
            <= offset
            <= stream.next_offset + _OUT_OF_ORDER * (end - offset)
        )
        if stream is not None and near and offset >= stream.next_offset:
            first_window = min(self._readahead, self._chunk_blocks * self._block_size)
            self._set_window(stream, min(self._readahead, max(2 * stream.window, first_window)))
        elif stream is None or not near:
            if stream is not None:
                self._drop(stream)
            stream = self._streams[ident] = _Stream(key)
            if len(self._streams) > _STREAMS:
                self._drop(self._streams.popitem(last=False)[1])
        self._streams.move_to_end(ident)
        stream.next_offset = max(stream.next_offset, end)
        if stream.next_offset >= size:  # read to the end: nothing left to read ahead
            self._set_window(stream, 0)
        self._count_ahead(stream)
        if not stream.window:
            return
        blocks = -(-size // self._block_size)
        stop = min(-(-(end + stream.window) // self._block_size), blocks)
        start = max(stream.ahead, last + 1)
        # An equal share of the limit: a reader far ahead of the others would see its blocks
        # grow old in the LRU, while theirs are read, before it reaches them.
        share = self._ahead_limit // self._sequential
        room = min(share, self._ahead_limit - (self._ahead - stream.counted))
        stop = min(stop, -(-stream.next_offset // self._block_size) + room)
        if stop < blocks:  # whole chunks only: a reader creeping forward must not cost
            stop = start + (stop - start) // self._chunk_blocks * self._chunk_blocks  # 1-block GETs
        if stop <= start:
            return
        stream.ahead = max(stream.ahead, stop)
        self._count_ahead(stream)
        for first in range(start, stop, self._chunk_blocks):
            serial = next(self._queue_serial)
            last_block = min(first + self._chunk_blocks, stop)
            self._queue[serial] = _Chunk(stream, digest, size, first, last_block, fetch)
            stream.queued.add(serial)
        self._queue_ready.set()

    def _set_window(self, stream: _Stream, window: int) -> None:
        if bool(window) != bool(stream.window):
            self._sequential += 1 if window else -1
        stream.window = window

    def _count_ahead(self, stream: _Stream) -> None:
        """Recount the blocks scheduled ahead of a stream's reader (it moved, or more were)."""
        counted = max(0, stream.ahead - -(-stream.next_offset // self._block_size))
        self._ahead += counted - stream.counted
        stream.counted = counted

    def _drop(self, stream: _Stream) -> None:
        """Forget a stream's readahead: its queued chunks go, its blocks ahead stop counting."""
        stream.dropped = True
        self._set_window(stream, 0)
        for serial in stream.queued:
            del self._queue[serial]
        stream.queued.clear()
        self._ahead -= stream.counted
        stream.counted = 0

    async def _dispatch_readahead(self, nursery: trio.Nursery) -> None:
        """Start queued readahead downloads in order, at most `max_parallel` at a time.

        Only the blocks still missing are fetched, one request per run of them. Their flights
        are registered here, in queue order, as soon as a slot frees up, so a reader reaching
        one of them waits for it instead of fetching it a second time.
        """
        while True:
            if not self._queue:
                self._queue_ready = trio.Event()
                await self._queue_ready.wait()
                continue
            serial = next(iter(self._queue))
            chunk = self._queue.pop(serial)
            chunk.stream.queued.discard(serial)
            index = chunk.first
            while index < chunk.stop:
                await self._slots.acquire()
                if chunk.stream.dropped:  # its reader went while a slot was awaited
                    self._slots.release()
                    break
                run = list(self._missing_run(chunk.digest, chunk.size, index, chunk.stop))
                if run:
                    flights = [_Flight(downloaded=True) for _ in run]
                    self._flights.update(zip((ref.name for ref in run), flights, strict=True))
                    self._background.enter()
                    nursery.start_soon(self._download_run, run, flights, chunk.fetch)
                else:
                    self._slots.release()
                index += max(len(run), 1)
                await self._trim()  # the check may have found blocks this process did not count

    def _missing_run(self, digest: bytes, size: int, index: int, stop: int) -> Iterator[_Ref]:
        for i in range(index, stop):
            ref = self._ref(digest, size, i)
            if self._present(ref):
                return
            yield ref

    def _present(self, ref: _Ref) -> bool:
        """Whether a block is in memory, being fetched, or on disk (a stat: ~2 µs)."""
        return ref.name in self._flights or ref.name in self._memory or self._stored(ref)

    def _stored(self, ref: _Ref) -> bool:
        """Whether a block is on disk, as far as this process knows (a stat until the first
        scan is done; a file found is adopted)."""
        if ref.name in self._index:
            return True
        if ref.name in self._doomed or self._index_complete:
            return False  # a complete index knows this process's blocks (others': next scan)
        try:
            st = os.stat(self._path(ref.name))
        except FileNotFoundError:
            return False
        self._adopt(ref.name, st.st_size, st.st_mtime)
        return True

    async def _download_run(self, run: list[_Ref], flights: list[_Flight], fetch: Fetch) -> None:
        """Fetch consecutive blocks in one request and store them, finishing each block's
        flight as soon as it is stored. A failure is left for the readers, whose own requests
        report it."""
        pending = dict(zip((ref.name for ref in run), flights, strict=True))

        async def complete(position: int, block: bytes) -> None:
            ref, flight = run[position], flights[position]
            await self._store(ref, block)
            flight.data = block
            del self._flights[ref.name]
            del pending[ref.name]
            flight.finish()

        try:
            await self._fetch(fetch, run, flights, complete)
        except Exception as exc:
            log.debug("readahead of %s failed: %s", run[0].name, exc)
            for flight in pending.values():
                flight.error = exc
        finally:
            for name, flight in pending.items():
                del self._flights[name]
                flight.finish()
            self._slots.release()
            self._background.leave()

    # -- background service -----------------------------------------------------------------

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
                        self._nursery = nursery
                        nursery.start_soon(self._maintain)
                        nursery.start_soon(self._dispatch_readahead, nursery)
                        self._service_running = True
                        started.set()
            except Exception:
                log.exception("block cache background task failed")
            finally:
                self._nursery = None
                self._service_running = False
                started.set()
                self._service_done.set()

        trio.lowlevel.spawn_system_task(service, name=f"BlockStore({self._dir})")
        await started.wait()

    async def _maintain(self) -> None:
        """Clean up after dead processes, learn what is on disk, and keep re-learning it.

        A huge cache is scanned less often than `rescan_interval`, so that scanning never
        takes more than about 5% of the time.
        """
        await trio.to_thread.run_sync(_remove_dead_leftovers, self._dir, limiter=self._io)
        while True:
            started = trio.current_time()
            try:
                await self.rescan()
            except OSError as exc:
                log.warning("could not scan the block cache %s: %s", self._dir, exc)
            elapsed = trio.current_time() - started
            await trio.sleep(max(self._rescan_interval, 20 * elapsed))


# -- what `fsmount cache` needs, without a running store ------------------------------------


def cache_usage(directory: Path) -> CacheUsage:
    """What `directory` holds and which running processes use it. Walks the whole cache."""
    found = _scan_blocks(directory) if directory.is_dir() else []
    return CacheUsage(
        bytes_held=sum(size for _, _, size in found),
        blocks_held=len(found),
        users=sorted({_pid(i) for i in _live_instances(directory / _LOCKS)}),
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
        _remove_dead_leftovers(directory)
    return usage


# -- file-level helpers (run in worker threads unless said otherwise) -------------------------


def _digest(block_size: int, key: str) -> bytes:
    """Name blocks by key and block size, so stores with another block size never mix."""
    material = f"{_FORMAT}\n{block_size}\n{key}".encode("utf-8", "surrogatepass")
    return hashlib.blake2b(material, digest_size=16).digest()


def _slice(data: bytes, lo: int, hi: int) -> bytes | memoryview:
    """`data[lo:hi]`, without a copy: the caller joins the parts of a read once."""
    return data if lo == 0 and hi == len(data) else memoryview(data)[lo:hi]


def _header(ref: _Ref, data: bytes) -> bytes:
    return _HEADER.pack(_MAGIC, _FORMAT, ref.index, len(data), ref.digest, zlib.crc32(data))


def _read_block_file(path: str, ref: _Ref) -> tuple[bytes, int, float] | None:
    """The verified data of a block file with its size and mtime; None if it does not exist.

    Raises _CorruptBlock when the file is not exactly the complete block it should be.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:  # an open file stays readable even if another process evicts it now
        st = os.fstat(fd)
        length = ref.end - ref.start
        if st.st_size != HEADER_SIZE + length:
            raise _CorruptBlock(f"{st.st_size} bytes, expected {HEADER_SIZE + length}")
        header = os.pread(fd, _HEADER.size, 0)
        data = os.pread(fd, length, HEADER_SIZE)
    finally:
        os.close(fd)
    magic, fmt, index, stored_length, digest, crc = _HEADER.unpack(header)
    if (magic, fmt, index, stored_length, digest) != (
        _MAGIC,
        _FORMAT,
        ref.index,
        length,
        ref.digest,
    ):
        raise _CorruptBlock("header names another block")
    if len(data) != length or zlib.crc32(data) != crc:
        raise _CorruptBlock("data checksum mismatch")
    return data, st.st_size, st.st_mtime


def _write_block_file(
    tmp: Path, final: str, ref: _Ref, data: bytes, victims: list[str], direct: bool
) -> bool:
    """Delete the victims' files, then write a complete block under this process's own
    temporary name and rename it to its final name; return whether O_DIRECT could be used.

    Only complete files ever carry a block's name; on failure the temporary file goes. There is
    no fsync: a block damaged by a power cut fails its size, header or CRC check on read and is
    fetched again. O_DIRECT (from a reused buffer) skips the page cache: allocating fresh
    page-cache pages was the largest CPU cost of a cold read here (~2.5 s per GiB written,
    against ~0.7 s direct), and the reader already has the bytes. Filesystems that refuse
    O_DIRECT (EINVAL) get a buffered write, and the caller stops asking.
    The checksum is computed here too: zlib releases the GIL, the event loop's thread is busy.
    """
    _unlink_all(victims)
    header = _header(ref, data)
    try:
        if direct:
            try:
                _write_direct(tmp, header, data)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                direct = False
        if not direct:
            _write_buffered(tmp, header, data)
        try:
            os.rename(tmp, final)
        except FileNotFoundError:  # the shard's first block
            with contextlib.suppress(FileExistsError):
                os.mkdir(os.path.dirname(final), 0o700)
            os.rename(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return direct


# Page-aligned write buffers, reused so that their pages are faulted in once per process, not
# once per block (a fresh mapping per block cost as much as the page cache it avoids). At most
# one per concurrent writer; list.pop/append are atomic under the GIL.
_direct_buffers: list[mmap.mmap] = []


def _write_direct(tmp: Path, header: bytes, data: bytes) -> None:
    size = HEADER_SIZE + len(data)
    padded = -(-size // _PAGE) * _PAGE
    buffer = _direct_buffers.pop() if _direct_buffers else mmap.mmap(-1, padded)
    if len(buffer) < padded:
        buffer.close()
        buffer = mmap.mmap(-1, padded)
    try:
        buffer[: len(header)] = header  # the rest of the header page is never written: zeros
        buffer[HEADER_SIZE:size] = data
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_DIRECT
        fd = os.open(tmp, flags, 0o600)
        try:
            with memoryview(buffer) as view:
                written = os.write(fd, view[:padded])
            if written != padded:  # direct writes are not resumed mid-page
                raise OSError(errno.ENOSPC, f"short write: {written} of {padded} bytes")
            if padded != size:  # the last block of an object: drop the padding
                os.ftruncate(fd, size)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # an EINVAL fallback writes the same name again
        raise
    finally:
        _direct_buffers.append(buffer)


def _write_buffered(tmp: Path, header: bytes, data: bytes) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        page = header.ljust(HEADER_SIZE, b"\0")
        written = os.writev(fd, [page, data])
        if written < len(page) + len(data):  # a short write (rare): the rest
            _write_all(fd, (page + data)[written:])
    finally:
        os.close(fd)


def _unlink_all(paths: list[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass  # another process evicted it first
        except OSError as exc:
            log.warning("could not evict cache block %s: %s", path, exc)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _available(directory: Path) -> int:
    """Free bytes for an unprivileged user. Inline on the event loop: statvfs takes ~2 µs."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _shards(directory: Path) -> Iterator[str]:
    for entry in os.scandir(directory):
        if _SHARD_NAME.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
            yield entry.path


def _block_files(directory: Path) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """(name, entry) of every block file. Only names this module writes match, so pointing
    `fsmount cache clear` at the wrong directory cannot delete anything else."""
    for shard in _shards(directory):
        prefix = os.path.basename(shard)
        for entry in os.scandir(shard):
            if _BLOCK_NAME.fullmatch(entry.name) and entry.name.startswith(prefix):
                yield f"{prefix}/{entry.name}", entry


def _scan_blocks(directory: Path) -> list[tuple[float, str, int]]:
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


def _make_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)  # an existing directory may have been created wider


def _take_lock(locks: Path) -> tuple[str, int]:
    """Create and flock this process's lock file; return its instance name and descriptor.

    A cleaner may flock a lock file in the instant between its creation and our flock, think
    its owner dead and delete it; so we check that the name still leads to our file, and retry.
    """
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


def _release_lock(locks: Path, instance: str, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(locks / f"{instance}.lock")
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


def _remove_dead_leftovers(directory: Path) -> None:
    """Delete the temporary files and lock files of processes that are no longer running.

    Temporary files are listed before their owners are checked: a process takes its lock
    before it writes any temporary file, so a file seen here whose owner holds no lock is
    debris, never a write in progress.
    """
    tmp_dir = directory / _TMP
    alive: dict[str, bool] = {}
    for name in os.listdir(tmp_dir) if tmp_dir.is_dir() else []:
        instance = name.partition(".")[0]
        if instance not in alive:
            alive[instance] = _is_alive(directory / _LOCKS, instance)
        if not alive[instance]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_dir / name)
    _live_instances(directory / _LOCKS)  # deletes the lock files of dead processes
