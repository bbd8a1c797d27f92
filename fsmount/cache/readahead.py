"""Readahead: which blocks to fetch ahead of each sequential reader (a pure function of where it
read), and the dispatcher that fetches them within the store's limits (NOTES.md §4, §8).

A reader is an open file (a key read without one is its own reader); its state goes when the
file is closed, with its queued chunks.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import trio

from fsmount.cache.blockfile import Ref, block_ref
from fsmount.cache.flight import Fetch, Flights
from fsmount.cache.keeper import Keeper

READAHEAD_CHUNK = 8 << 20
"""Bytes per readahead request by default (rounded to whole blocks): against 4 MiB, a third
fewer CPU-seconds per GiB in the loopback server and ~10% more cold-read speed."""
# A read at most this many of its own lengths past the last one still counts as sequential:
# the kernel's parallel readahead requests of one reader overtake each other by a few.
_OUT_OF_ORDER = 4
_STREAMS = 1024  # readers (or keys read without one) whose sequential-read state is remembered


@dataclass(frozen=True, slots=True)
class Limits:
    """What bounds readahead, fixed for a store."""

    block_size: int
    readahead: int  # bytes ahead of one reader, at most
    chunk_blocks: int  # blocks per request
    ahead_limit: int  # blocks scheduled ahead of all readers together


@dataclass(eq=False, slots=True)
class Stream:
    """Sequential-read state of one reader of one key: where its last read ended, how far to
    read ahead, and what of that is scheduled."""

    key: str
    next_offset: int = 0
    window: int = 0  # readahead bytes; 0 until reads continue where the previous one ended
    ahead: int = 0  # first block index not yet scheduled for readahead
    counted: int = 0  # blocks scheduled ahead of the reader, in `Readahead._ahead`
    queued: set[int] = field(default_factory=set)  # its chunks waiting in the queue
    dropped: bool = False  # closed, reset or forgotten: nothing more is started for it


# A reader's state after a read, and the blocks `[start, stop)` to schedule for it: `fresh`
# when the read does not follow the last one (the reader starts afresh), then `next_offset`,
# `window` and `ahead` as in Stream. A plain tuple: `plan` runs on every read.
Plan = tuple[bool, int, int, int, int, int]


def plan(
    last: Stream | None,
    key: str,
    offset: int,
    end: int,
    size: int,
    others_ahead: int,
    others_sequential: int,
    limits: Limits,
) -> Plan:
    """Detect a sequential reader and choose the blocks ahead of it, reading nothing but its
    arguments: `last` is the reader's state before the read `[offset, end)` of `key` (`size`
    bytes), `others_*` what the other readers hold of the shared limit.

    A read starting where the previous one ended, or a few of its lengths past it (the kernel
    sends its own readahead requests in parallel, so they arrive out of order; a random reader
    almost never lands that close), doubles the window (up to the readahead cap); a read
    slightly behind it keeps the state; any other read starts afresh with no readahead. The
    window is further cut to what the other readers leave of the limit on blocks ahead.
    """
    block = limits.block_size
    near = (
        last is not None
        and last.key == key
        and last.next_offset - block <= offset <= last.next_offset + _OUT_OF_ORDER * (end - offset)
    )
    if last is None or not near:
        fresh, next_offset, window, ahead = True, end, 0, 0
    else:
        fresh, window, ahead = False, last.window, last.ahead
        next_offset = max(last.next_offset, end)
        if offset >= last.next_offset:
            first_window = min(limits.readahead, limits.chunk_blocks * block)
            window = min(limits.readahead, max(2 * window, first_window))
    if next_offset >= size:  # read to the end: nothing left to read ahead
        window = 0
    if not window:
        return fresh, next_offset, 0, ahead, 0, 0
    blocks = -(-size // block)
    stop = min(-(-(end + window) // block), blocks)
    start = max(ahead, (end - 1) // block + 1)
    # An equal share of the limit: a reader far ahead of the others would see its blocks
    # grow old in the LRU, while theirs are read, before it reaches them.
    share = limits.ahead_limit // (others_sequential + 1)
    room = min(share, limits.ahead_limit - others_ahead)
    stop = min(stop, -(-next_offset // block) + room)
    if stop < blocks:  # whole chunks only: a reader creeping forward must not cost 1-block GETs
        stop = start + (stop - start) // limits.chunk_blocks * limits.chunk_blocks
    if stop <= start:
        return fresh, next_offset, window, ahead, 0, 0
    return fresh, next_offset, window, max(ahead, stop), start, stop


@dataclass(frozen=True, slots=True)
class _Chunk:
    """Blocks `[first, stop)` of one object, to be fetched ahead of a sequential reader."""

    stream: Stream
    digest: bytes
    size: int
    first: int
    stop: int
    fetch: Fetch


class Readahead:
    """The readers' states, the queue of chunks to fetch ahead of them, and its dispatcher.

    The queue holds no data, and is bounded: its chunks are counted among the blocks ahead
    (`ahead_limit`), and a reader's chunks leave it when the reader closes.
    """

    def __init__(self, limits: Limits, flights: Flights, keeper: Keeper, max_parallel: int) -> None:
        self._limits = limits
        self._flights = flights
        self._keeper = keeper
        self._streams: OrderedDict[int | str, Stream] = OrderedDict()  # least recent first
        self._ahead = 0  # blocks scheduled ahead of their readers: the sum of `counted`
        self._sequential = 0  # streams with a window, among which `ahead_limit` is shared
        self._slots = trio.Semaphore(max_parallel)  # readahead downloads in flight
        self._queue: dict[int, _Chunk] = {}  # by sequence number, oldest first
        self._queue_serial = itertools.count()
        self._queue_ready = trio.Event()
        self.active = False  # the dispatcher runs: reads are followed

    def follow(
        self,
        reader: int | None,
        key: str,
        digest: bytes,
        size: int,
        offset: int,
        end: int,
        fetch: Fetch,
    ) -> None:
        """Note a read `[offset, end)` and queue the blocks to fetch ahead of its reader."""
        if not self._limits.readahead or not self.active:
            return
        ident = key if reader is None else reader
        stream = self._streams.get(ident)
        if stream is None and len(self._streams) >= _STREAMS:
            self._drop(self._streams.popitem(last=False)[1])
        if stream is None:
            others_ahead, others_sequential = self._ahead, self._sequential
        else:
            others_ahead = self._ahead - stream.counted
            others_sequential = self._sequential - bool(stream.window)
        fresh, next_offset, window, ahead, start, stop = plan(
            stream, key, offset, end, size, others_ahead, others_sequential, self._limits
        )
        if fresh:
            if stream is not None:
                self._drop(stream)
            stream = self._streams[ident] = Stream(key)
        assert stream is not None
        self._streams.move_to_end(ident)
        self._sequential += bool(window) - bool(stream.window)
        stream.next_offset, stream.window, stream.ahead = next_offset, window, ahead
        counted = max(0, ahead - -(-next_offset // self._limits.block_size))
        self._ahead += counted - stream.counted
        stream.counted = counted
        if stop <= start:
            return
        chunk_blocks = self._limits.chunk_blocks
        for first in range(start, stop, chunk_blocks):
            serial = next(self._queue_serial)
            last_block = min(first + chunk_blocks, stop)
            self._queue[serial] = _Chunk(stream, digest, size, first, last_block, fetch)
            stream.queued.add(serial)
        self._queue_ready.set()

    def close_reader(self, reader: int) -> None:
        """The reader's file is closed: its readahead not started yet is dropped (a download
        already running finishes, and its blocks are kept)."""
        stream = self._streams.pop(reader, None)
        if stream is not None:
            self._drop(stream)

    def _drop(self, stream: Stream) -> None:
        """Forget a stream's readahead: its queued chunks go, its blocks ahead stop counting."""
        stream.dropped = True
        self._sequential -= bool(stream.window)
        stream.window = 0
        for serial in stream.queued:
            del self._queue[serial]
        stream.queued.clear()
        self._ahead -= stream.counted
        stream.counted = 0

    async def dispatch(self) -> None:
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
                    self._flights.start_run(run, chunk.fetch, self._slots.release)
                else:
                    self._slots.release()
                index += max(len(run), 1)
                await self._keeper.trim()  # the check may have found blocks not counted yet

    def _missing_run(self, digest: bytes, size: int, index: int, stop: int) -> Iterator[Ref]:
        """The blocks from `index` on that are neither in memory, nor being fetched, nor on
        disk (a stat each, ~2 µs, until the first scan is done), up to the first present."""
        for i in range(index, stop):
            ref = block_ref(self._limits.block_size, digest, size, i)
            if ref.name in self._flights or self._keeper.has(ref):
                return
            yield ref
