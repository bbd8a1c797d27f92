"""Single flight: one load or download per block, whoever asks for it, and the cutting of fetched
bodies into blocks as their pieces arrive (NOTES.md §8).

A block missing from memory gets a flight; its first reader (the leader) loads the block's file
or downloads it, and later readers wait on the flight for the bytes they need, which it shows as
they arrive. Downloaded blocks go to the keeper as soon as each is complete.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from fsmount.cache.blockfile import PAGE, Ref, block_ref
from fsmount.cache.running import Running
from fsmount.errors import FetchError

if TYPE_CHECKING:
    from fsmount.cache.keeper import Keeper

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


def slice_of(data: bytes, lo: int, hi: int) -> bytes | memoryview:
    """`data[lo:hi]`, without a copy: the caller joins the parts of a read once."""
    return data if lo == 0 and hi == len(data) else memoryview(data)[lo:hi]


class Flight:
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
            return slice_of(self.whole, lo, hi)
        if self.tail is not None and lo >= self.tail[0]:
            return slice_of(self.tail[1], lo - self.tail[0], hi - self.tail[0])
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
        return None if self.data is None else slice_of(self.data, lo, hi)


class Cutter:
    """The sink of one fetch: cuts its pieces into the blocks of a run as they arrive, with
    one copy per block (none for a piece that is exactly one), shows each block's progress to
    its flight, and hands each complete block to `complete`.

    The last block is handed over by `finish`, once the fetch has returned exactly the bytes
    asked for: a fetch that turns out short or long stores nothing of its last block.
    """

    def __init__(
        self,
        run: list[Ref],
        flights: list[Flight],
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


class Flights:
    """The blocks being loaded or downloaded, and everything this store fetches: the counters
    and the download rate, the downloads left behind readers, whole objects of unknown size."""

    def __init__(self, keeper: Keeper, block_size: int) -> None:
        self._keeper = keeper
        self._block_size = block_size
        self._flights: dict[str, Flight] = {}
        self._behind = trio.Semaphore(_BEHIND)
        self._rate: float | None = None  # bytes per second of recent fetches (moving average)
        self.background = Running()  # downloads without a reader waiting for all of them
        self.nursery: trio.Nursery | None = None  # the store's background service's, if running
        self.downloads = 0  # fetches in flight
        self.hits = 0  # block lookups answered from disk (a load, or a wait on one)
        self.misses = 0  # block lookups that waited for a download
        self.fetches = 0
        self.bytes_fetched = 0

    def __contains__(self, name: str) -> bool:
        return name in self._flights

    async def get(self, ref: Ref, fetch: Fetch, lo: int, hi: int) -> bytes | memoryview:
        """Bytes `[lo, hi)` of one verified block: from memory, from disk, or downloaded (one
        flight per block). The caller has looked in memory just before (the usual case), with
        no checkpoint since.

        A reader that waited for a flight that failed tries once more itself (the failure may
        have been another reader's cancellation or a transient error); a second failure is
        raised, as is the leader's own. A leader that needs only part of a block it downloads
        returns as soon as that part is in, leaving the rest of the download running (up to
        `_BEHIND` of them): a random 4 KiB read then waits for 4 KiB, not for 1 MiB.
        """
        failures_seen = 0
        while (flight := self._flights.get(ref.name)) is not None:
            got = await flight.wait(lo, hi)
            if got is not None:
                if flight.downloaded:
                    self.misses += 1
                else:
                    self.hits += 1
                return got
            if flight.error is not None:
                failures_seen += 1
                if failures_seen > 1:
                    raise flight.error
            data = self._keeper.cached(ref.name)  # kept by the flight that ended, maybe
            if data is not None:
                return slice_of(data, lo, hi)
        flight = self._flights[ref.name] = Flight(downloaded=False)
        behind = False
        try:
            data = await self._keeper.load(ref)
            if data is None:
                flight.downloaded = True
                whole = lo == 0 and hi == ref.end - ref.start
                behind = not whole and self._start_behind(ref, flight, fetch, lo)
                if behind:
                    got = await flight.wait(lo, hi)
                    if got is None:
                        raise flight.error or FetchError.eio("the block cache is closing")
                    self.misses += 1
                    return got
                data = await self._download(ref, flight, fetch)
            if flight.downloaded:
                self.misses += 1
            else:
                self.hits += 1
            flight.data = data
            return slice_of(data, lo, hi)
        except Exception as exc:
            if not behind:
                flight.error = exc
            raise
        finally:
            if not behind:  # else the download behind ends the flight
                del self._flights[ref.name]
                flight.finish()

    def start_run(self, run: list[Ref], fetch: Fetch, done: Callable[[], None]) -> None:
        """Download consecutive missing blocks in the background, in one request: their flights
        are registered now, so a reader reaching one waits for it instead of fetching it again.
        `done` is called when the request is over."""
        assert self.nursery is not None, "readahead runs in the background service"
        flights = [Flight(downloaded=True) for _ in run]
        self._flights.update(zip((ref.name for ref in run), flights, strict=True))
        self.background.enter()
        self.nursery.start_soon(self._download_run, run, flights, fetch, done)

    async def keep(self, digest: bytes, fetch: Callable[[Sink], Awaitable[None]]) -> int:
        """Fetch a whole object of unknown size, keep its blocks as they fill, return its size
        (see `BlockStore.keep`)."""
        parts: list[memoryview] = []
        have = 0  # bytes of the block being filled
        kept = 0  # bytes of the object in blocks already stored

        async def store(block: bytes) -> None:
            nonlocal kept
            index = kept // self._block_size
            ref = block_ref(self._block_size, digest, kept + len(block), index)
            await self._keeper.store(ref, block)
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

        self.downloads += 1
        try:
            await fetch(sink)
        finally:
            self.downloads -= 1
        if have:
            await store(b"".join(parts))
        self.fetches += 1
        self.bytes_fetched += kept
        return kept

    def _start_behind(self, ref: Ref, flight: Flight, fetch: Fetch, lo: int) -> bool:
        """Download a block in the background, if a slot is free; the caller waits on its
        flight for the bytes it needs, from `lo` on."""
        if self.nursery is None:
            return False
        try:
            self._behind.acquire_nowait()
        except trio.WouldBlock:
            return False
        self.background.enter()
        self.nursery.start_soon(self._download_behind, ref, flight, fetch, lo)
        return True

    async def _download_behind(self, ref: Ref, flight: Flight, fetch: Fetch, lo: int) -> None:
        split = lo - lo % PAGE
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
            self.background.leave()

    async def _download_tail_first(
        self, ref: Ref, flight: Flight, fetch: Fetch, split: int
    ) -> bytes:
        """The block in two requests, its bytes from `split` on first: the reader that wants
        them gets them after one round trip, not after the bytes before them."""
        tail = await self._fetch_part(fetch, ref.start + split, ref.end, flight, split)
        flight.tail = (split, tail)
        head = await self._fetch_part(fetch, ref.start, ref.start + split, flight, 0)
        block = head + tail
        flight.arrive(block)
        await self._keeper.store(ref, block)
        return block

    async def _fetch_part(
        self, fetch: Fetch, start: int, end: int, flight: Flight, offset: int
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
        self.downloads += 1
        try:
            await fetch(start, end, sink)
        finally:
            self.downloads -= 1
        length = received()
        if length != end - start:
            raise FetchError.eio(f"asked for {end - start} bytes at {start}, got {length}")
        self.fetches += 1
        self.bytes_fetched += length
        seconds = trio.current_time() - began
        if length >= _RATE_SAMPLE and seconds > 0:
            sample = length / seconds
            self._rate = sample if self._rate is None else 0.8 * self._rate + 0.2 * sample

    async def _download(self, ref: Ref, flight: Flight, fetch: Fetch) -> bytes:
        blocks: list[bytes] = []

        async def complete(_: int, block: bytes) -> None:
            blocks.append(block)

        await self._fetch(fetch, [ref], [flight], complete)
        await self._keeper.store(ref, blocks[0])
        return blocks[0]

    async def _fetch(
        self,
        fetch: Fetch,
        run: list[Ref],
        flights: list[Flight],
        complete: Callable[[int, bytes], Awaitable[None]],
    ) -> None:
        """Fetch a run of consecutive blocks in one request, handing each to `complete` (with
        its position in the run) as soon as it is in."""
        cutter = Cutter(run, flights, complete)
        await self._counted_fetch(fetch, run[0].start, run[-1].end, cutter, lambda: cutter.received)
        await cutter.finish()

    async def _download_run(
        self, run: list[Ref], flights: list[Flight], fetch: Fetch, done: Callable[[], None]
    ) -> None:
        """Fetch consecutive blocks in one request and store them, finishing each block's
        flight as soon as it is stored. A failure is left for the readers, whose own requests
        report it."""
        pending = dict(zip((ref.name for ref in run), flights, strict=True))

        async def complete(position: int, block: bytes) -> None:
            ref, flight = run[position], flights[position]
            await self._keeper.store(ref, block)
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
            done()
            self.background.leave()
