"""BlockStore: budget, LRU, single flight, readahead, checksums, crash leftovers, sharing."""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import multiprocessing
import os
import random
import signal
import stat
import tempfile
import threading
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fsmount.cache import blocks
from fsmount.cache.blockfile import Ref, header
from fsmount.cache.blocks import (
    HEADER_SIZE,
    BlockFiles,
    BlockStore,
    CacheInUseError,
    FreeSpace,
    cache_usage,
    clear_cache,
)
from fsmount.cache.flight import Cutter, Flight
from fsmount.cache.readahead import READAHEAD_CHUNK
from fsmount.demo.content import pattern
from fsmount.errors import FetchError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


class Origin:
    """A remote object with deterministic bytes that records every fetch made of it."""

    def __init__(
        self, size: int, *, seed: int = 1, delay: float = 0.0, piece: int = 0, gap: float = 0.0
    ) -> None:
        self.size = size
        self.seed = seed
        self.delay = delay
        self.piece = piece  # > 0: answer in pieces of about this size, as an HTTP body comes
        self.gap = gap  # seconds between two pieces
        self.fail_next = 0  # how many of the next fetches fail
        self.calls: list[tuple[int, int]] = []
        self.active = 0
        self.max_active = 0
        self.active_bytes = 0
        self.max_active_bytes = 0

    async def fetch(self, start: int, end: int, sink: blocks.Sink) -> None:
        self.calls.append((start, end))  # first, so a bad range is seen even where it is caught
        assert 0 <= start < end <= self.size, (start, end, self.size)
        self.active += 1
        self.active_bytes += end - start
        self.max_active = max(self.max_active, self.active)
        self.max_active_bytes = max(self.max_active_bytes, self.active_bytes)
        try:
            await trio.sleep(self.delay)
            if self.fail_next:
                self.fail_next -= 1
                raise FetchError.eio("origin unavailable")
            data = pattern(self.seed, start, end - start)
            cuts = range(self.piece // 3, len(data), self.piece) if self.piece else []
            for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
                if a:
                    await trio.sleep(self.gap)
                await sink(data[a:b])  # pieces never on a block boundary
        finally:
            self.active -= 1
            self.active_bytes -= end - start

    def expect(self, offset: int, length: int) -> bytes:
        return pattern(self.seed, offset, max(0, min(length, self.size - offset)))

    def fetched_bytes(self) -> int:
        return sum(end - start for start, end in self.calls)


def run(fn: Callable[[], Awaitable[None]]) -> None:
    trio.run(fn)


def block_files(directory: Path) -> dict[str, int]:
    """Block files on disk (relative name -> size), as another process would see them."""
    found = {}
    for shard in directory.iterdir():
        if shard.is_dir() and len(shard.name) == 2:
            for path in shard.iterdir():
                with contextlib.suppress(FileNotFoundError):  # evicted while we looked
                    found[f"{shard.name}/{path.name}"] = path.stat().st_size
    return found


def block_indexes(directory: Path) -> set[int]:
    return {int(name.rpartition("-")[2]) for name in block_files(directory)}


def budget_of(blocks_: int, block_size: int) -> int:
    return blocks_ * (block_size + HEADER_SIZE)


async def wait_for_scan(store: BlockStore) -> None:
    with trio.fail_after(10):
        while not store.stats().index_complete:
            await trio.sleep(0.005)


async def read_all(store: BlockStore, key: str, origin: Origin, chunk: int = 128 * KiB) -> None:
    """Read an object front to back in kernel-sized reads, checking every byte."""
    for offset in range(0, origin.size, chunk):
        data = await store.read(key, origin.size, offset, chunk, origin.fetch)
        assert data == origin.expect(offset, chunk), offset


# -- correctness of what is read -------------------------------------------------------------


def test_reads_return_exact_bytes_across_block_boundaries(tmp_path: Path) -> None:
    origin = Origin(10 * 64 * KiB + 1234)

    async def main() -> None:
        async with BlockStore(tmp_path, budget=GiB, block_size=64 * KiB, min_free=0) as store:
            for offset, length in [
                (0, 1),
                (64 * KiB - 1, 2),
                (100, 3 * 64 * KiB),
                (5 * 64 * KiB, 64 * KiB),
                (origin.size - 10, 100),
                (0, origin.size),
            ]:
                data = await store.read("k", origin.size, offset, length, origin.fetch)
                assert data == origin.expect(offset, length), (offset, length)

    run(main)


def test_empty_object_and_reads_at_or_after_the_end_fetch_nothing(tmp_path: Path) -> None:
    origin = Origin(3 * 64 * KiB + 5)

    async def main() -> None:
        async with BlockStore(tmp_path, budget=GiB, block_size=64 * KiB, min_free=0) as store:
            assert await store.read("empty", 0, 0, 4096, origin.fetch) == b""
            assert await store.read("k", origin.size, origin.size, 4096, origin.fetch) == b""
            assert await store.read("k", origin.size, origin.size + 9, 4096, origin.fetch) == b""
            assert await store.read("k", origin.size, 17, 0, origin.fetch) == b""
            assert origin.calls == []
            tail = await store.read("k", origin.size, origin.size - 3, 4096, origin.fetch)
            assert tail == origin.expect(origin.size - 3, 3)
            assert origin.calls == [(3 * 64 * KiB, origin.size)]
            with pytest.raises(ValueError):
                await store.read("k", origin.size, -1, 10, origin.fetch)

    run(main)


def test_keys_with_any_characters_name_distinct_objects(tmp_path: Path) -> None:
    keys = ["a/b", "a\0b", "../../etc/passwd", "naïve", "\udcff lone surrogate", "", "a" * 5000]

    async def main() -> None:
        async with BlockStore(tmp_path, budget=GiB, block_size=4 * KiB, min_free=0) as store:
            origins = {key: Origin(10_000, seed=seed) for seed, key in enumerate(keys)}
            for key, origin in origins.items():
                assert await store.read(key, 10_000, 0, 10_000, origin.fetch) == origin.expect(
                    0, 10_000
                )
        async with BlockStore(tmp_path, budget=GiB, block_size=4 * KiB, min_free=0) as store:
            for key, origin in origins.items():
                assert await store.read(key, 10_000, 0, 10_000, origin.fetch) == origin.expect(
                    0, 10_000
                )
                assert len(origin.calls) == 3  # the first store's three blocks, no more

    run(main)
    assert all(name.isascii() for name in block_files(tmp_path))


# -- what is fetched ---------------------------------------------------------------------------


@given(
    lengths=st.lists(st.integers(1, 300), min_size=1, max_size=8),
    cuts=st.lists(st.integers(1, 2_399), max_size=12),
)
def test_pieces_are_cut_into_blocks_exactly(lengths: list[int], cuts: list[int]) -> None:
    data = os.urandom(sum(lengths))
    points = sorted({c for c in cuts if c < len(data)})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    starts = list(itertools.accumulate([0, *lengths]))
    run_ = [Ref(f"b{i}", b"", i, starts[i], starts[i + 1]) for i in range(len(lengths))]
    flights = [Flight(downloaded=True) for _ in lengths]
    got: dict[int, bytes] = {}

    async def complete(position: int, block: bytes) -> None:
        got[position] = block

    async def main() -> None:
        cutter = Cutter(run_, flights, complete)
        for piece in pieces:
            await cutter(piece)
            done = len(got)  # every block but the last is handed on as soon as it is in
            filled = sum(1 for stop in starts[1:] if stop <= cutter.received)
            assert done == min(filled, len(lengths) - 1)
        await cutter.finish()

    trio.run(main)
    blocks_ = [got[i] for i in range(len(lengths))]
    assert b"".join(blocks_) == data and [len(b) for b in blocks_] == lengths
    assert all(type(b) is bytes for b in blocks_)


def test_origin_answering_in_pieces_gives_the_same_blocks_and_requests(tmp_path: Path) -> None:
    """An HTTP body comes in chunks that do not fall on block boundaries; the bytes, what is
    fetched and what is kept are as with one piece per request."""
    plain, chunked = Origin(37 * MiB + 5), Origin(37 * MiB + 5, piece=200 * KiB)

    async def main() -> None:
        for name, origin in (("plain", plain), ("chunked", chunked)):
            async with BlockStore(tmp_path / name, budget=GiB, min_free=0) as store:
                await read_all(store, "k", origin)  # asserts the bytes
                await read_all(store, "k", origin)

    run(main)
    assert chunked.fetched_bytes() == plain.fetched_bytes() == plain.size  # each byte once
    assert len(chunked.calls) > 3  # readahead runs of several blocks were cut
    assert block_files(tmp_path / "chunked") == block_files(tmp_path / "plain")


def test_a_reader_of_part_of_a_block_gets_it_as_soon_as_it_is_in(tmp_path: Path) -> None:
    """A 4 KiB read at the start of a block returns when its bytes are in, not when the whole
    block is; the rest of the block is still downloaded (once) and stored; a second reader
    of the block's end waits for it; `drain` returns once it is on disk."""
    origin = Origin(4 * MiB, piece=100 * KiB, gap=0.15)  # 11 pieces: the block takes 1.5 s

    async def main() -> None:
        async with BlockStore(tmp_path, budget=GiB, min_free=0, readahead=0) as store:
            started = trio.current_time()
            assert await store.read("k", origin.size, MiB, 4 * KiB, origin.fetch) == (
                origin.expect(MiB, 4 * KiB)
            )
            assert trio.current_time() - started < 0.75  # the first piece, not the whole block
            assert block_files(tmp_path) == {}  # the rest is still coming
            tail = await store.read("k", origin.size, 2 * MiB - 10, 10, origin.fetch)
            assert tail == origin.expect(2 * MiB - 10, 10)
            assert trio.current_time() - started >= 1.4  # it waited for the last piece
            await store.drain()
            assert block_indexes(tmp_path) == {1}
            assert origin.calls == [(MiB, 2 * MiB)]  # one download for both readers

    run(main)


def test_on_a_slow_link_a_reader_far_into_a_block_gets_its_bytes_first(tmp_path: Path) -> None:
    """Once fetches show a slow link, a 4 KiB read near a block's end asks for the bytes from
    its page to the block's end first, then for the rest: it waits for one round trip, not for
    the whole block; the block is still kept whole and right."""
    origin = Origin(4 * MiB, piece=64 * KiB, gap=0.03)  # ~2 MiB/s: a block takes ~0.5 s

    async def main() -> None:
        async with BlockStore(tmp_path, budget=GiB, min_free=0, readahead=0) as store:
            await store.read("k", origin.size, 0, MiB, origin.fetch)  # learns the rate
            offset = 2 * MiB - 4 * KiB
            started = trio.current_time()
            data = await store.read("k", origin.size, offset, 4 * KiB, origin.fetch)
            assert data == origin.expect(offset, 4 * KiB)
            assert trio.current_time() - started < 0.25  # not the ~0.5 s of the whole block
            await store.drain()
            assert origin.calls[1:] == [(offset, 2 * MiB), (MiB, offset)]  # its page first
            whole = await store.read("k", origin.size, MiB, MiB, origin.fetch)
            assert whole == origin.expect(MiB, MiB) and len(origin.calls) == 3  # from the cache

    run(main)
    assert block_indexes(tmp_path) == {0, 1}


def test_on_a_fast_link_a_block_is_fetched_in_one_request(tmp_path: Path) -> None:
    origin = Origin(4 * MiB)

    async def main() -> None:
        async with BlockStore(tmp_path, budget=GiB, min_free=0, readahead=0) as store:
            await store.read("k", origin.size, 0, MiB, origin.fetch)
            # 64 KiB in: at local speed the bytes before it take far less than a round trip
            await store.read("k", origin.size, MiB + 64 * KiB, 4 * KiB, origin.fetch)
            await store.drain()

    run(main)
    assert origin.calls == [(0, MiB), (MiB, 2 * MiB)]


def test_closing_the_store_keeps_the_block_a_reader_got_part_of(tmp_path: Path) -> None:
    origin = Origin(2 * MiB, piece=256 * KiB, gap=0.02)

    async def main() -> None:
        async with BlockStore(tmp_path, budget=GiB, min_free=0, readahead=0) as store:
            await store.read("k", origin.size, 0, 4 * KiB, origin.fetch)
        assert block_indexes(tmp_path) == {0}  # aclose waited for the rest of the block

    run(main)


def test_random_small_reads_fetch_only_the_blocks_containing_them(tmp_path: Path) -> None:
    origin = Origin(GiB)
    rng = random.Random(7)
    reads = [(rng.randrange(origin.size - 4 * KiB), 4 * KiB) for _ in range(150)]
    reads.append((5 * MiB - 2 * KiB, 4 * KiB))  # straddles two blocks

    async def main() -> None:
        async with BlockStore(tmp_path, budget=GiB, min_free=0) as store:
            for offset, length in reads:
                data = await store.read("big", origin.size, offset, length, origin.fetch)
                assert data == origin.expect(offset, length)

    run(main)
    wanted = {
        (index * MiB, (index + 1) * MiB)
        for offset, length in reads
        for index in range(offset // MiB, (offset + length - 1) // MiB + 1)
    }
    assert sorted(origin.calls) == sorted(wanted)  # each block once, and nothing else


def test_sequential_read_fetches_ahead_in_parallel_but_never_past_the_end(tmp_path: Path) -> None:
    origin = Origin(40 * MiB + 12345, delay=0.02)

    async def main() -> None:
        async with BlockStore(
            tmp_path, budget=GiB, min_free=0, readahead=16 * MiB, max_parallel=4
        ) as store:
            await store.read("seq", origin.size, 0, 128 * KiB, origin.fetch)
            await store.read("seq", origin.size, 128 * KiB, 128 * KiB, origin.fetch)
            await trio.sleep(0.1)
            assert max(end for _, end in origin.calls) > MiB  # fetched ahead of the reader
            await read_all(store, "seq", origin)

    run(main)
    assert all(end <= origin.size for _, end in origin.calls)
    covered = sorted(origin.calls)
    assert covered[0][0] == 0 and covered[-1][1] == origin.size
    assert all(a[1] == b[0] for a, b in itertools.pairwise(covered))  # no byte twice
    assert len(origin.calls) < 41  # several blocks per request
    assert 2 <= origin.max_active <= 4 + 1  # parallel, bounded (+1: the reader's own request)
    assert max(end - start for start, end in origin.calls) <= READAHEAD_CHUNK


def test_readahead_stays_bounded_in_a_huge_object(tmp_path: Path) -> None:
    origin = Origin(1 << 40)  # 1 TiB: readahead must neither run to the end nor hold it

    async def main() -> None:
        async with BlockStore(
            tmp_path, budget=GiB, min_free=0, readahead=16 * MiB, max_parallel=4
        ) as store:
            position = 0
            for offset in range(0, 48 * MiB, 128 * KiB):
                await store.read("huge", origin.size, offset, 128 * KiB, origin.fetch)
                position = offset + 128 * KiB
                assert max(end for _, end in origin.calls) <= position + 16 * MiB + 4 * MiB
            await trio.sleep(0.05)
            assert max(end for _, end in origin.calls) <= position + 16 * MiB + 4 * MiB

    run(main)
    # max_parallel requests of at most one readahead chunk, and the reader's own block
    assert origin.max_active_bytes <= 4 * READAHEAD_CHUNK + MiB


def test_closing_a_file_drops_its_queued_readahead(tmp_path: Path) -> None:
    origin = Origin(256 * MiB, delay=0.3)

    async def main() -> None:
        async with BlockStore(
            tmp_path, budget=GiB, min_free=0, readahead=64 * MiB, max_parallel=1
        ) as store:
            # Four sequential reads: one readahead request runs, three more chunks wait.
            for offset in range(0, 512 * KiB, 128 * KiB):
                await store.read("k", origin.size, offset, 128 * KiB, origin.fetch, reader=7)
            await trio.sleep(0.05)
            assert origin.calls == [(0, MiB), (MiB, 9 * MiB)]
            store.close_reader(7)
            await store.drain()
            await trio.sleep(0.5)  # the slot is free again: nothing else may start

    run(main)
    assert origin.calls == [(0, MiB), (MiB, 9 * MiB)]


def test_sequential_readers_together_never_evict_what_they_fetched_ahead(tmp_path: Path) -> None:
    """Eight readers in step, each with a window of a quarter of the budget: together they
    may only hold that quarter ahead, each its share, or their read-ahead blocks push each
    other out before they are read."""
    block = 64 * KiB
    origins = [Origin(48 * block, seed=seed) for seed in range(8)]
    budget = budget_of(64, block)

    async def main() -> None:
        async with BlockStore(
            tmp_path,
            budget=budget,
            block_size=block,
            min_free=0,
            readahead=budget // 4,
            readahead_chunk=2 * block,
            memory=0,
            max_parallel=4,
        ) as store:
            for offset in range(0, 48 * block, 16 * KiB):
                for reader, origin in enumerate(origins):
                    data = await store.read(
                        f"o{reader}", origin.size, offset, 16 * KiB, origin.fetch, reader=reader
                    )
                    assert data == origin.expect(offset, 16 * KiB)
            assert store.stats().evictions > 0  # 24 blocks each: they did not all fit

    run(main)
    for origin in origins:
        assert any(end - start > block for start, end in origin.calls)  # it read ahead
        assert origin.fetched_bytes() == origin.size, sorted(origin.calls)  # each byte once


def test_ten_concurrent_readers_of_one_block_cause_one_fetch(tmp_path: Path) -> None:
    origin = Origin(4 * MiB, delay=0.05)
    results: list[bytes] = []

    async def main() -> None:
        async with BlockStore(tmp_path, budget=GiB, min_free=0) as store:

            async def reader(offset: int) -> None:
                results.append(await store.read("k", origin.size, offset, 4 * KiB, origin.fetch))

            async with trio.open_nursery() as nursery:
                for i in range(10):
                    nursery.start_soon(reader, MiB + i * 8 * KiB)
                await trio.sleep(0.01)
                assert store.stats().downloads_in_flight == 1
            assert store.stats().misses == 10 and store.stats().fetches == 1

    run(main)
    assert origin.calls == [(MiB, 2 * MiB)]
    assert sorted(results) == sorted(origin.expect(MiB + i * 8 * KiB, 4 * KiB) for i in range(10))


def test_failed_fetch_reaches_every_waiter_and_stores_nothing(tmp_path: Path) -> None:
    origin = Origin(4 * MiB, delay=0.02)
    origin.fail_next = 100
    errors: list[BaseException] = []

    async def main() -> None:
        async with BlockStore(tmp_path, budget=GiB, min_free=0) as store:

            async def reader() -> None:
                try:
                    await store.read("k", origin.size, 0, 4 * KiB, origin.fetch)
                except FetchError as exc:
                    errors.append(exc)

            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(reader)
            assert len(errors) == 5
            assert len(origin.calls) == 2  # the leader's, and the waiters' one retry
            assert store.stats().bytes_held == 0
            assert block_files(tmp_path) == {}
            assert os.listdir(tmp_path / "tmp") == []
            origin.fail_next = 0
            assert await store.read("k", origin.size, 0, 10, origin.fetch) == origin.expect(0, 10)

    run(main)


def test_waiters_retry_once_after_a_transient_failure(tmp_path: Path) -> None:
    origin = Origin(MiB, delay=0.02)
    origin.fail_next = 1
    outcomes: list[str] = []

    async def main() -> None:
        async with BlockStore(tmp_path, budget=GiB, min_free=0) as store:

            async def reader() -> None:
                try:
                    data = await store.read("k", origin.size, 0, 100, origin.fetch)
                    outcomes.append("ok" if data == origin.expect(0, 100) else "wrong")
                except FetchError:
                    outcomes.append("error")

            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(reader)

    run(main)
    assert sorted(outcomes) == ["error"] + ["ok"] * 4  # only the failed leader sees its error
    assert len(origin.calls) == 2


def test_fetch_of_the_wrong_length_is_an_error_and_stores_nothing(tmp_path: Path) -> None:
    async def short(start: int, end: int, sink: blocks.Sink) -> None:
        await sink(pattern(1, start, end - start - 1))

    async def main() -> None:
        async with BlockStore(tmp_path, budget=GiB, min_free=0) as store:
            with pytest.raises(FetchError):
                await store.read("k", 10_000, 0, 100, short)

    run(main)
    assert block_files(tmp_path) == {}


# -- budget, LRU and free space -------------------------------------------------------------


def test_budget_is_never_exceeded_while_reading_more_than_it(tmp_path: Path) -> None:
    block = 64 * KiB
    budget = budget_of(6, block)
    origins = {f"obj{i}": Origin(40 * block + 7, seed=i) for i in range(3)}
    worst = 0

    async def main() -> None:
        nonlocal worst
        io = trio.CapacityLimiter(4)
        async with BlockStore(
            tmp_path, budget=budget, block_size=block, min_free=0, readahead=budget, io=io
        ) as store:

            async def watch() -> None:
                """Look at the disk while no worker thread of the store writes or deletes: a
                listing taken meanwhile could see a victim's file and its replacement both."""
                nonlocal worst
                borrowers = [object() for _ in range(int(io.total_tokens))]
                while True:
                    for borrower in borrowers:
                        await io.acquire_on_behalf_of(borrower)
                    worst = max(worst, sum(block_files(tmp_path).values()))
                    for borrower in borrowers:
                        io.release_on_behalf_of(borrower)
                    assert store.stats().bytes_held <= budget
                    await trio.sleep(0)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                for key, origin in origins.items():
                    await read_all(store, key, origin, chunk=16 * KiB)
                rng = random.Random(3)
                for _ in range(200):
                    key = rng.choice(list(origins))
                    offset = rng.randrange(origins[key].size)
                    data = await store.read(
                        key, origins[key].size, offset, 5000, origins[key].fetch
                    )
                    assert data == origins[key].expect(offset, 5000)
                nursery.cancel_scope.cancel()
            assert store.stats().evictions > 0

    run(main)
    assert 0 < worst <= budget


def test_least_recently_used_blocks_are_evicted_first(tmp_path: Path) -> None:
    block = 64 * KiB
    origin = Origin(10 * block)

    async def main() -> None:
        async with BlockStore(
            tmp_path, budget=budget_of(4, block), block_size=block, min_free=0, memory=0
        ) as store:

            async def read(index: int) -> None:  # and let the rest of the block be stored
                await store.read("k", origin.size, index * block, 10, origin.fetch)
                await store.drain()

            for index in (0, 1, 2, 3, 0, 4):  # block 0 used again: block 1 is now the oldest
                await read(index)
            assert block_indexes(tmp_path) == {0, 2, 3, 4}
            await read(2)  # 3 is now the oldest
            await read(5)
            assert block_indexes(tmp_path) == {0, 2, 4, 5}
            assert len(origin.calls) == 6  # blocks 0-5, each once: the rest were disk hits

    run(main)


def test_blocks_being_read_from_disk_are_not_evicted(tmp_path: Path) -> None:
    block = 64 * KiB
    origin = Origin(10 * block)
    release = threading.Event()
    reading = threading.Event()

    class SlowRead(BlockFiles):
        armed = False

        def read(self, path: str, ref: Ref) -> tuple[bytes, int, float] | None:
            if self.armed and ref.index == 0:
                reading.set()
                release.wait(10)
            return super().read(path, ref)

    files = SlowRead()

    async def main() -> None:
        async with BlockStore(
            tmp_path,
            budget=budget_of(2, block),
            block_size=block,
            min_free=0,
            memory=0,
            files=files,
        ) as store:
            await store.read("k", origin.size, 0, 10, origin.fetch)
            await store.read("k", origin.size, block, 10, origin.fetch)
            await store.drain()
            files.armed = True
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.read, "k", origin.size, 0, 10, origin.fetch)
                await trio.to_thread.run_sync(reading.wait)
                # Block 0 is the oldest, but it is being read: block 1 must go instead.
                await store.read("k", origin.size, 2 * block, 10, origin.fetch)
                await store.drain()
                assert block_indexes(tmp_path) == {0, 2}
                release.set()

    run(main)


def test_object_larger_than_the_budget_still_reads(tmp_path: Path) -> None:
    block = 64 * KiB
    origin = Origin(20 * block + 3)

    async def main() -> None:
        async with BlockStore(
            tmp_path, budget=budget_of(3, block), block_size=block, min_free=0
        ) as store:
            await read_all(store, "big", origin, chunk=16 * KiB)
            for offset in random.Random(5).sample(range(origin.size), 30):
                data = await store.read("big", origin.size, offset, 3000, origin.fetch)
                assert data == origin.expect(offset, 3000)
                assert sum(block_files(tmp_path).values()) <= budget_of(3, block)
            await store.drain()
            assert sum(block_files(tmp_path).values()) <= budget_of(3, block)

    run(main)


def test_block_larger_than_the_budget_is_served_without_being_kept(tmp_path: Path) -> None:
    origin = Origin(3 * MiB)

    async def main() -> None:
        async with BlockStore(tmp_path, budget=MiB // 2, min_free=0) as store:
            await read_all(store, "k", origin)
            assert len(origin.calls) == 3  # each block once: later reads served from memory
            assert store.stats().bytes_held == 0

    run(main)
    assert block_files(tmp_path) == {}
    assert os.listdir(tmp_path / "tmp") == []


def test_free_space_floor_limits_what_is_kept(tmp_path: Path) -> None:
    block = 64 * KiB
    origin = Origin(12 * block)
    # A nearly full disk: 5 blocks free before the cache writes, and 2 blocks must stay free.
    free_space = FreeSpace(lambda: budget_of(5, block) - sum(block_files(tmp_path).values()))

    async def main() -> None:
        async with BlockStore(
            tmp_path,
            budget=GiB,
            block_size=block,
            min_free=budget_of(2, block),
            readahead=0,
            free_space=free_space,
        ) as store:
            for index in range(12):
                await store.read("k", origin.size, index * block, 100, origin.fetch)
                await store.drain()
                assert len(block_files(tmp_path)) <= 3
            assert block_indexes(tmp_path) == {9, 10, 11}
            await read_all(store, "k", origin)

    run(main)


# -- persistence, crashes and corruption ----------------------------------------------------


def test_blocks_persist_across_instances_without_fetching(tmp_path: Path) -> None:
    origin = Origin(5 * MiB + 77)

    async def main() -> None:
        async with BlockStore(tmp_path, budget=GiB, min_free=0) as store:
            await read_all(store, "k", origin)
        fetched = len(origin.calls)
        async with BlockStore(tmp_path, budget=GiB, min_free=0) as store:
            await read_all(store, "k", origin)
            assert len(origin.calls) == fetched
            await wait_for_scan(store)
            assert store.stats().blocks_held == 6
            assert store.stats().bytes_held == origin.size + 6 * HEADER_SIZE

    run(main)


@pytest.mark.parametrize("refuse", ["open", "write"])
def test_filesystem_refusing_o_direct_gets_buffered_blocks_of_the_same_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refuse: str
) -> None:
    """Some filesystems (older tmpfs, some network filesystems) answer O_DIRECT with EINVAL,
    at open or at the first write: the block is written buffered instead, byte for byte the
    same file, and the store stops trying O_DIRECT."""
    attempts = []
    real_open, real_write = os.open, os.write
    direct_fds: set[int] = set()

    def open_(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            attempts.append(path)
            if refuse == "open":
                raise OSError(errno.EINVAL, "Invalid argument")
            fd = real_open(path, flags, mode)
            direct_fds.add(fd)
            return fd
        return real_open(path, flags, mode)

    def write(fd: int, data: bytes) -> int:
        if fd in direct_fds:
            direct_fds.discard(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "write", write)
    origin = Origin(3 * MiB + 5)

    async def main() -> None:
        async with BlockStore(tmp_path, budget=GiB, min_free=0, readahead=0) as store:
            await read_all(store, "k", origin, chunk=MiB)  # whole blocks, one after the other
        monkeypatch.undo()
        async with BlockStore(tmp_path, budget=GiB, min_free=0, readahead=0) as store:
            await read_all(store, "k", origin)  # asserts the bytes
            assert store.stats().disk_reads == 4 and store.stats().corrupt_blocks == 0

    run(main)
    assert len(attempts) == 1  # the first block tried O_DIRECT; the other three did not
    assert sorted(block_files(tmp_path).values()) == [5 + HEADER_SIZE] + [MiB + HEADER_SIZE] * 3
    assert os.listdir(tmp_path / "tmp") == []


def test_blocks_are_written_page_aligned_with_a_zero_padded_header_page(tmp_path: Path) -> None:
    """The data starts at HEADER_SIZE (a page) so that O_DIRECT can write the file; the last
    block of an object is padded for that write and then truncated to its exact length."""
    origin = Origin(MiB + 100)

    async def main() -> None:
        async with BlockStore(tmp_path, budget=GiB, min_free=0, readahead=0) as store:
            await read_all(store, "k", origin)

    run(main)
    files = {int(name.rpartition("-")[2]): tmp_path / name for name in block_files(tmp_path)}
    for index, length in ((0, MiB), (1, 100)):
        raw = files[index].read_bytes()
        assert len(raw) == HEADER_SIZE + length
        assert raw[:4] == b"FSMB" and raw[44:HEADER_SIZE] == bytes(HEADER_SIZE - 44)
        assert raw[HEADER_SIZE:] == origin.expect(index * MiB, length)


def test_sequential_reads_of_a_cached_block_verify_it_once(tmp_path: Path) -> None:
    origin = Origin(8 * MiB)

    async def main() -> None:
        async with BlockStore(tmp_path, budget=GiB, min_free=0) as store:
            await read_all(store, "k", origin)
        async with BlockStore(tmp_path, budget=GiB, min_free=0) as store:
            await read_all(store, "k", origin)  # 64 reads of 128 KiB
            assert store.stats().disk_reads == 8
            assert store.stats().hits == 64

    run(main)


def test_flipped_byte_on_disk_is_detected_and_fetched_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    origin = Origin(3 * MiB)

    async def main() -> None:
        async with BlockStore(tmp_path, budget=GiB, min_free=0) as store:
            await read_all(store, "k", origin)
        for name in block_files(tmp_path):
            if name.endswith("-1"):
                _flip(tmp_path / name, HEADER_SIZE + 12345)  # a data byte
            if name.endswith("-2"):
                _flip(tmp_path / name, 9)  # a header byte
        origin.calls.clear()
        with caplog.at_level(logging.WARNING):
            async with BlockStore(tmp_path, budget=GiB, min_free=0) as store:
                await read_all(store, "k", origin)
                assert store.stats().corrupt_blocks == 2
        assert sorted(origin.calls) == [(MiB, 2 * MiB), (2 * MiB, 3 * MiB)]
        assert caplog.text.count("corrupt") == 2
        origin.calls.clear()
        async with BlockStore(tmp_path, budget=GiB, min_free=0) as store:
            await read_all(store, "k", origin)  # repaired on disk: no more fetches
        assert origin.calls == []

    run(main)


def _flip(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def test_damaged_or_misplaced_block_files_are_never_served(tmp_path: Path) -> None:
    block = 64 * KiB
    origin = Origin(4 * block)

    async def main() -> None:
        async with BlockStore(tmp_path, budget=GiB, block_size=block, min_free=0) as store:
            await read_all(store, "k", origin, chunk=block)
        names = {int(name.rpartition("-")[2]): tmp_path / name for name in block_files(tmp_path)}
        names[0].write_bytes(names[0].read_bytes()[: HEADER_SIZE + 1000])  # truncated
        names[1].write_bytes(bytes(HEADER_SIZE + block))  # zeros, as after a power cut
        names[2].write_bytes(names[3].read_bytes()[:-1] + b"\0")  # another block's file
        names[3].write_bytes(names[3].read_bytes() + b"junk")  # trailing garbage
        origin.calls.clear()
        async with BlockStore(tmp_path, budget=GiB, block_size=block, min_free=0) as store:
            await read_all(store, "k", origin, chunk=block)
            assert store.stats().corrupt_blocks == 4
        assert len(origin.calls) == 4

    run(main)


def _die_mid_write(directory: str, size: int, complete: int) -> None:
    """Child of the kill -9 test: store `complete` blocks, then die by SIGKILL half-way
    through writing the next one, as a crash or the OOM killer would."""

    class WriteThenDie(BlockFiles):
        def write(
            self, tmp: Path, final: str, ref: Ref, data: bytes, victims: list[str], direct: bool
        ) -> bool:
            if final.endswith(f"-{complete}"):
                with open(tmp, "wb") as f:
                    f.write(header(ref, data) + data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            return super().write(tmp, final, ref, data, victims, direct)

    origin = Origin(size)

    async def main() -> None:
        store = BlockStore(
            Path(directory), budget=GiB, min_free=0, readahead=0, files=WriteThenDie()
        )
        for index in range(complete + 1):
            await store.read("k", size, index * MiB, 10, origin.fetch)
            await store.drain()  # one block written at a time: the last one is cut

    trio.run(main)


def test_kill_9_mid_write_leaves_nothing_that_is_served(tmp_path: Path) -> None:
    size = 4 * MiB
    child = multiprocessing.get_context("spawn").Process(
        target=_die_mid_write, args=(str(tmp_path), size, 3)
    )
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    leftovers = os.listdir(tmp_path / "tmp")
    assert len(leftovers) == 1 and leftovers[0].startswith(f"{child.pid}-")
    assert len(os.listdir(tmp_path / "locks")) == 1  # the dead process's, no longer locked
    assert block_indexes(tmp_path) == {0, 1, 2}
    origin = Origin(size)

    async def main() -> None:
        async with BlockStore(tmp_path, budget=GiB, min_free=0) as store:
            await read_all(store, "k", origin)
            await wait_for_scan(store)
            assert os.listdir(tmp_path / "tmp") == []
            assert os.listdir(tmp_path / "locks") == [f"{store.instance}.lock"]

    run(main)
    assert origin.calls == [(3 * MiB, 4 * MiB)]


def test_temporary_files_of_living_processes_are_left_alone(tmp_path: Path) -> None:
    async def main() -> None:
        async with BlockStore(tmp_path, budget=GiB, min_free=0) as first:
            in_progress = tmp_path / "tmp" / f"{first.instance}.99"
            in_progress.write_bytes(b"being written")
            dead = tmp_path / "tmp" / "999999999-deadbeef.0"
            dead.write_bytes(b"left by a crash")
            async with BlockStore(tmp_path, budget=GiB, min_free=0) as second:
                await second.read("k", 10, 0, 10, Origin(10).fetch)
                await wait_for_scan(second)
            assert in_progress.exists()
            assert not dead.exists()

    run(main)


def test_block_evicted_behind_the_stores_back_is_fetched_again(tmp_path: Path) -> None:
    origin = Origin(2 * MiB)

    async def main() -> None:
        async with BlockStore(tmp_path, budget=GiB, min_free=0, memory=0, readahead=0) as store:
            await read_all(store, "k", origin)
            await store.drain()
            for name in block_files(tmp_path):
                os.unlink(tmp_path / name)  # another process evicted them
            await store.rescan()
            assert (store.stats().blocks_held, store.stats().bytes_held) == (0, 0)
            await read_all(store, "k", origin)
            await store.drain()
            assert store.stats().blocks_held == 2
            os.unlink(tmp_path / next(iter(block_files(tmp_path))))  # not noticed this time
            await read_all(store, "k", origin)

    run(main)
    assert len(origin.calls) == 5


def test_a_block_evicted_while_a_scan_runs_is_not_counted_again_by_that_scan(
    tmp_path: Path,
) -> None:
    """The scan listed the block before it was evicted and deleted: it must not bring it back
    into the accounting as a phantom (here the eviction keeps free space, not the budget, so
    no trim would correct it)."""
    block = 64 * KiB
    min_free = 4 * MiB
    free = [GiB]
    listed, release = threading.Event(), threading.Event()

    class PausedScan(BlockFiles):
        armed = False

        def scan(self, directory: Path) -> list[tuple[float, str, int]]:
            found = super().scan(directory)
            if self.armed:
                listed.set()
                release.wait(10)
            return found

    files = PausedScan()
    first, second = Origin(4 * block, seed=1), Origin(block, seed=2)

    async def main() -> None:
        async with BlockStore(
            tmp_path,
            budget=GiB,
            block_size=block,
            min_free=min_free,
            readahead=0,
            memory=0,
            free_space=FreeSpace(lambda: free[0], interval=0.0),
            files=files,
        ) as store:
            await read_all(store, "first", first, chunk=block)
            await wait_for_scan(store)
            files.armed = True
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(store.rescan)
                    with trio.fail_after(10):
                        while not listed.is_set():
                            await trio.sleep(0.005)
                    free[0] = min_free  # the next block must evict one to keep the floor
                    await read_all(store, "second", second, chunk=block)
                    assert store.stats().evictions == 1
                    release.set()
            finally:
                release.set()
            on_disk = block_files(tmp_path)
            assert len(on_disk) == 4
            assert store.stats().bytes_held == sum(on_disk.values())

    run(main)


def test_the_store_stays_in_use_until_its_last_write_ends(tmp_path: Path) -> None:
    """The instance lock is what tells other processes that its temporary files are being
    written: it is released only once no write can run, whoever started the write."""
    entered, release = threading.Event(), threading.Event()

    class SlowWrite(BlockFiles):
        def write(
            self, tmp: Path, final: str, ref: Ref, data: bytes, victims: list[str], direct: bool
        ) -> bool:
            entered.set()
            release.wait(10)
            return super().write(tmp, final, ref, data, victims, direct)

    origin = Origin(MiB)

    async def main() -> None:
        store = BlockStore(tmp_path, budget=GiB, min_free=0, readahead=0, files=SlowWrite())
        closed = trio.Event()

        async def close() -> None:
            await store.aclose()
            closed.set()

        try:
            async with trio.open_nursery() as nursery:
                # A whole block read in the foreground: the reader itself writes it.
                nursery.start_soon(store.read, "k", MiB, 0, MiB, origin.fetch)
                with trio.fail_after(10):
                    while not entered.is_set():
                        await trio.sleep(0.005)
                nursery.start_soon(close)
                await trio.sleep(0.3)
                assert not closed.is_set()
                assert cache_usage(tmp_path).users == [os.getpid()]
                release.set()
        finally:
            release.set()
        assert closed.is_set()

    run(main)
    assert cache_usage(tmp_path).users == []
    assert os.listdir(tmp_path / "tmp") == [] and len(block_files(tmp_path)) == 1


def test_the_benchmark_in_the_notes_runs_against_the_store_as_it_is(tmp_path: Path) -> None:
    """NOTES.md §9 gives a benchmark to run again: its code must still fit the store's API."""
    notes = (Path(blocks.__file__).parent / "NOTES.md").read_text()
    section = notes[notes.index("## 9. Measured throughput") :]
    code = section[section.index("```python\n") + 10 :]
    code = code[: code.index("```")]
    assert code.rstrip().endswith("trio.run(main)")
    namespace: dict[str, object] = {}
    exec(compile(code.rstrip().removesuffix("trio.run(main)"), "NOTES.md", "exec"), namespace)
    rate = namespace["rate"]
    assert trio.run(partial(rate, tmp_path, 2 * MiB, readahead=0)) > 0  # type: ignore[operator]
    assert len(block_files(tmp_path)) == 2


# -- start-up, sharing, housekeeping --------------------------------------------------------


def test_first_reads_do_not_wait_for_the_start_up_scan(tmp_path: Path) -> None:
    block = 64 * KiB
    origin = Origin(30 * block)
    release = threading.Event()

    class SlowScan(BlockFiles):
        def scan(self, directory: Path) -> list[tuple[float, str, int]]:
            release.wait(10)
            return super().scan(directory)

    async def main() -> None:
        async with BlockStore(tmp_path, budget=GiB, block_size=block, min_free=0) as store:
            await read_all(store, "k", origin, chunk=block)
        origin.calls.clear()
        # Reopen with a smaller budget: the scan must find the excess and trim it.
        async with BlockStore(
            tmp_path, budget=budget_of(10, block), block_size=block, min_free=0, files=SlowScan()
        ) as store:
            await store.read("k", origin.size, 0, 100, origin.fetch)
            assert not store.stats().index_complete
            assert origin.calls == []  # served from disk while the scan is still running
            release.set()
            await wait_for_scan(store)
            assert store.stats().bytes_held <= budget_of(10, block)
            assert sum(block_files(tmp_path).values()) <= budget_of(10, block)

    run(main)


def test_rescan_counts_blocks_another_store_added_and_trims_to_budget(tmp_path: Path) -> None:
    block = 64 * KiB
    origin = Origin(20 * block)

    async def main() -> None:
        async with (
            BlockStore(tmp_path, budget=GiB, block_size=block, min_free=0, readahead=0) as big,
            BlockStore(tmp_path, budget=budget_of(5, block), block_size=block, min_free=0) as small,
        ):
            await read_all(big, "k", origin, chunk=block)
            await small.rescan()
            assert small.stats().bytes_held <= budget_of(5, block)
            assert sum(block_files(tmp_path).values()) <= budget_of(5, block)
            await read_all(big, "k", origin, chunk=block)  # the big store refetches what went

    run(main)


def _share(directory: str, seed: int, barrier: object, results: object) -> None:
    """One of two processes reading the same objects through one small shared cache."""
    block = 64 * KiB
    origins = [Origin(37 * block + 11, seed=s) for s in range(3)]
    rng = random.Random(seed)
    mismatches = 0

    async def main() -> None:
        nonlocal mismatches
        async with BlockStore(
            Path(directory),
            budget=budget_of(12, block),
            block_size=block,
            min_free=0,
            rescan_interval=0.02,
        ) as store:
            barrier.wait()  # type: ignore[attr-defined]
            for _ in range(300):
                origin = rng.choice(origins)
                if rng.random() < 0.3:
                    await read_all(store, f"obj{origin.seed}", origin, chunk=32 * KiB)
                    continue
                offset = rng.randrange(origin.size)
                data = await store.read(
                    f"obj{origin.seed}", origin.size, offset, 9000, origin.fetch
                )
                mismatches += data != origin.expect(offset, 9000)

    trio.run(main)
    results.put((seed, mismatches, sum(len(o.calls) for o in origins)))  # type: ignore[attr-defined]


def test_two_processes_share_one_directory(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    children = [
        ctx.Process(target=_share, args=(str(tmp_path), seed, barrier, results)) for seed in (1, 2)
    ]
    for child in children:
        child.start()
    outcome = [results.get(timeout=120) for _ in children]
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    assert [mismatches for _, mismatches, _ in outcome] == [0, 0]
    assert all(fetches > 0 for _, _, fetches in outcome)
    assert os.listdir(tmp_path / "tmp") == []
    assert os.listdir(tmp_path / "locks") == []
    assert sum(block_files(tmp_path).values()) <= 2 * budget_of(12, 64 * KiB)


def test_directory_is_private_and_files_are_owner_only(tmp_path: Path) -> None:
    directory = tmp_path / "cache"

    async def main() -> None:
        async with BlockStore(directory, budget=GiB, min_free=0) as store:
            await store.read("k", 3 * MiB, 0, 3 * MiB, Origin(3 * MiB).fetch)
            for path in [directory, *directory.rglob("*")]:
                mode = stat.S_IMODE(path.stat().st_mode)
                assert mode == (0o700 if path.is_dir() else 0o600), path

    run(main)


def test_cache_usage_and_clear_respect_running_processes(tmp_path: Path) -> None:
    stranger = tmp_path / "ab" / "not-a-block.txt"
    stranger.parent.mkdir()
    stranger.write_text("mine")

    async def main() -> None:
        store = BlockStore(tmp_path, budget=GiB, min_free=0)
        await store.read("k", 3 * MiB, 0, 3 * MiB, Origin(3 * MiB).fetch)
        usage = cache_usage(tmp_path)
        assert usage.users == [os.getpid()]
        assert (usage.blocks_held, usage.bytes_held) == (3, 3 * MiB + 3 * HEADER_SIZE)
        with pytest.raises(CacheInUseError):
            clear_cache(tmp_path)
        assert len(block_files(tmp_path)) == 4  # three blocks and the stranger
        await store.aclose()
        assert cache_usage(tmp_path).users == []
        assert clear_cache(tmp_path).blocks_held == 3
        assert block_files(tmp_path) == {"ab/not-a-block.txt": 4}

    run(main)


def test_forced_clear_under_a_running_store_only_costs_refetches(tmp_path: Path) -> None:
    origin = Origin(3 * MiB)

    async def main() -> None:
        async with BlockStore(tmp_path, budget=GiB, min_free=0, memory=0) as store:
            await read_all(store, "k", origin)
            await store.drain()
            clear_cache(tmp_path, force=True)
            await read_all(store, "k", origin)
            await store.drain()
            await store.rescan()
            assert store.stats().blocks_held == len(block_files(tmp_path)) == 3

    run(main)
    assert origin.fetched_bytes() == 2 * origin.size


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    reads=st.lists(
        st.tuples(st.integers(0, 70_000), st.integers(0, 20_000), st.sampled_from([0, 1, 2])),
        min_size=1,
        max_size=40,
    ),
    budget_blocks=st.integers(0, 6),
)
def test_any_reads_return_the_right_bytes_within_budget(
    reads: list[tuple[int, int, int]], budget_blocks: int
) -> None:
    block = 4 * KiB
    origins = [Origin(size, seed=seed) for seed, size in enumerate([0, 4096, 65_537])]

    async def main(directory: Path) -> None:
        async with BlockStore(
            directory, budget=budget_of(budget_blocks, block), block_size=block, min_free=0
        ) as store:
            for offset, length, which in reads:
                origin = origins[which]
                data = await store.read(f"o{which}", origin.size, offset, length, origin.fetch)
                assert data == origin.expect(offset, length)
                assert store.stats().bytes_held <= budget_of(budget_blocks, block)
            assert sum(block_files(directory).values()) <= budget_of(budget_blocks, block)

    with tempfile.TemporaryDirectory() as directory:
        trio.run(main, Path(directory))


def test_an_object_put_whole_is_read_without_fetching_and_held_across_instances(
    tmp_path: Path,
) -> None:
    origin = Origin(2 * MiB + 333)
    origin.fail_next = 1_000  # a read that reached the origin would fail

    async def main() -> None:
        async with BlockStore(tmp_path, budget=GiB, min_free=0) as store:
            assert not await store.holds("k", origin.size)
            await store.put("k", origin.expect(0, origin.size))
            assert await store.holds("k", origin.size)
            assert not await store.holds("other", origin.size)
            await read_all(store, "k", origin)
        async with BlockStore(tmp_path, budget=GiB, min_free=0, memory=0) as store:
            assert await store.holds("k", origin.size)
            await read_all(store, "k", origin)
            await store.put("k", origin.expect(0, origin.size))  # present: nothing rewritten
            await wait_for_scan(store)
            assert store.stats().blocks_held == 3

    run(main)
    assert origin.calls == []
    assert sum(block_files(tmp_path).values()) == origin.size + 3 * HEADER_SIZE


def test_put_keeps_to_the_budget(tmp_path: Path) -> None:
    budget = 3 * (MiB + HEADER_SIZE)

    async def main() -> None:
        async with BlockStore(tmp_path, budget=budget, min_free=0) as store:
            for key in "abc":
                await store.put(key, pattern(ord(key), 0, 2 * MiB))
                assert sum(block_files(tmp_path).values()) <= budget
            assert await store.holds("c", 2 * MiB)
            assert not await store.holds("a", 2 * MiB)

    run(main)
