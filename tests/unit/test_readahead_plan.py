"""Readahead planning alone: a pure function of a reader's last state, its read, and what the
other readers hold."""

from __future__ import annotations

from fsmount.cache.readahead import Limits, Stream, plan

KiB, MiB = 1 << 10, 1 << 20
LIMITS = Limits(block_size=MiB, readahead=64 * MiB, chunk_blocks=8, ahead_limit=256)
SIZE = 1 << 30


def follow(reads: list[tuple[int, int]], others: tuple[int, int] = (0, 0)) -> list[tuple]:
    """Plan each read in turn from the state the last one left, as Readahead does."""
    last: Stream | None = None
    plans = []
    for offset, end in reads:
        fresh, next_offset, window, ahead, start, stop = plan(
            last, "k", offset, end, SIZE, *others, LIMITS
        )
        if fresh:
            last = Stream("k")
        assert last is not None
        last.next_offset, last.window, last.ahead = next_offset, window, ahead
        plans.append((fresh, window // MiB, start, stop))
    return plans


def test_a_sequential_reader_gets_a_doubling_window_in_whole_chunks() -> None:
    reads = [(i * 128 * KiB, (i + 1) * 128 * KiB) for i in range(4)]
    assert follow(reads) == [
        (True, 0, 0, 0),  # a first read: no readahead
        (False, 8, 1, 9),  # one chunk (8 MiB) after the block being read
        (False, 16, 9, 17),
        (False, 32, 17, 33),
    ]


def test_a_read_out_of_order_keeps_the_state_and_a_jump_starts_afresh() -> None:
    reads = [(0, 128 * KiB), (128 * KiB, 256 * KiB), (128 * KiB, 256 * KiB), (500 * MiB, 501 * MiB)]
    plans = follow(reads)
    assert plans[2] == (False, 8, 0, 0)  # behind, within a block: nothing new, nothing lost
    assert plans[3] == (True, 0, 0, 0)


def test_a_reader_gets_only_its_share_of_what_the_others_leave() -> None:
    reads = [(i * 128 * KiB, (i + 1) * 128 * KiB) for i in range(8)]
    alone = follow(reads)
    shared = follow(reads, others=(200, 3))  # three other readers hold 200 of 256 blocks
    assert max(stop for *_, stop in alone) > 56
    assert max(stop for *_, stop in shared) <= 1 + 56  # the block being read, then 56 more


def test_nothing_is_planned_past_the_end() -> None:
    size = 20 * MiB
    last = Stream("k", next_offset=16 * MiB, window=16 * MiB, ahead=17)
    *_, start, stop = plan(last, "k", 16 * MiB, 17 * MiB, size, 0, 0, LIMITS)
    assert (start, stop) == (17, 20)  # the last blocks, though not a whole chunk
    *_, window, _, start, stop = plan(last, "k", 16 * MiB, size, size, 0, 0, LIMITS)
    assert (window, start, stop) == (0, 0, 0)
