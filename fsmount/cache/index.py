"""The accounting of one store: which block files it counts, in LRU order, their total, the
blocks no one may evict, and the evicted ones whose files are still being deleted (NOTES.md
§2-§4).

It is synchronous on purpose: every change is made with no await in between, so the total is
exact at every checkpoint, and it can be tested without an event loop. It touches no file but
by reading the free space; the keeper does the file work its answers call for.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import trio

_TOUCH_INTERVAL = 600.0  # seconds between mtime updates of a block file that keeps being read
_EVICTION_BATCH = 64  # files deleted per worker-thread call when trimming to the budget


@dataclass(slots=True)
class _Entry:
    """A block file this process accounts for."""

    size: int  # bytes on disk, header included
    used: float  # wall-clock time of its last use (the file's mtime if another process made it)
    synced: float  # the file's mtime as last set or seen, so touches can be rate-limited


class Eviction:
    """Blocks already forgotten by the index whose files a worker thread is deleting."""

    __slots__ = ("done", "names", "size")

    def __init__(self, names: list[str], size: int) -> None:
        self.names = names
        self.size = size
        self.done = trio.Event()


class FreeSpace:
    """Free bytes on the cache's filesystem: a reading reused for `interval` seconds, corrected
    by what this process stored and deleted since (another process's show at the next reading).

    A statvfs on the event loop per block written was a measurable cost. `read` is statvfs of
    the cache directory, or in a test whatever the test needs the disk to say.
    """

    __slots__ = ("_delta", "_interval", "_read", "_read_at", "_reading")

    def __init__(self, read: Callable[[], int], interval: float = 0.25) -> None:
        self._read = read
        self._interval = interval
        self._read_at = -interval  # monotonic time of the last reading
        self._reading = 0  # what it said
        self._delta = 0  # bytes this process freed minus bytes it stored since

    def __call__(self) -> int:
        now = time.monotonic()
        if now - self._read_at >= self._interval:
            self._reading = self._read()
            self._read_at = now
            self._delta = 0
        return self._reading + self._delta

    def change(self, delta: int) -> None:
        self._delta += delta


class Index:
    """Which block files this process accounts for, least recently used first, and what each
    change of that costs the budget and the free-space floor."""

    def __init__(self, budget: int, min_free: int, free_space: FreeSpace) -> None:
        self.budget = budget
        self.min_free = min_free
        self._free_space = free_space
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self.total = 0  # sum of the sizes in _entries, always
        self._reserved = 0  # bytes being written, already counted against budget and disk
        self._pins: Counter[str] = Counter()  # blocks being read from disk: never evicted
        self._doomed: dict[str, Eviction] = {}  # evicted blocks whose files are being deleted
        self._freeing = 0  # bytes of those files
        self._scans: list[set[str]] = []  # per running scan: the names forgotten since it began
        self.evictions = 0
        self.complete = False  # the first scan is merged: names not here are not on disk

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def doomed(self, name: str) -> Eviction | None:
        """The eviction deleting the block's file, if one is."""
        return self._doomed.get(name)

    def touch(self, name: str) -> bool:
        """Mark a block used (last in LRU order); True when its file's mtime should be set now,
        at most every 10 minutes, so the order survives a remount and other processes see the
        use."""
        entry = self._entries.get(name)
        if entry is None:
            return False
        now = time.time()
        entry.used = now
        self._entries.move_to_end(name)
        if now - entry.synced < _TOUCH_INTERVAL:
            return False
        entry.synced = now
        return True

    def pin(self, name: str) -> None:
        """The block's file is being read: it is not evicted until `unpin`."""
        self._pins[name] += 1

    def unpin(self, name: str) -> None:
        self._pins[name] -= 1
        if not self._pins[name]:
            del self._pins[name]

    def adopt(self, name: str, size: int, mtime: float) -> None:
        """Account for a block file found on disk (the caller trims to the budget after)."""
        self._entries[name] = _Entry(size, time.time(), mtime)
        self.total += size

    def record(self, name: str, size: int) -> None:
        """Account for a block file this process just wrote."""
        self.forget(name)  # a scan during the write may have counted it already
        now = time.time()
        self._entries[name] = _Entry(size, now, now)
        self.total += size
        self._free_space.change(-size)

    def forget(self, name: str) -> None:
        """Stop accounting for a block (evicted, missing or bad); a scan running now may have
        listed its file before it went, and must not count it again."""
        entry = self._entries.pop(name, None)
        if entry is not None:
            self.total -= entry.size
        for forgotten in self._scans:
            forgotten.add(name)

    def make_room(self, size: int) -> Eviction | None:
        """Evict least recently used blocks so that `size` more bytes stay within the budget and
        above the free-space floor, and reserve them for the write (until `release`); None,
        evicting nothing, if that is impossible."""
        if size > self.budget:
            return None
        over_budget = self.total + self._reserved + size - self.budget
        available = self._free_space() + self._freeing
        short_of_space = self.min_free + self._reserved + size - available
        needed = max(over_budget, short_of_space)
        victims = self._victims(needed)
        if sum(self._entries[name].size for name in victims) < needed:
            return None
        self._reserved += size
        return self._evict(victims)

    def release(self, size: int, eviction: Eviction) -> None:
        """The write `make_room` reserved for is over (stored or failed), its victims deleted."""
        self._reserved -= size
        self.finish(eviction)

    def trim(self) -> Eviction | None:
        """The next batch of blocks to evict to get down to the budget, if it is exceeded and
        any block can go."""
        if self.total <= self.budget:
            return None
        victims = self._victims(self.total - self.budget, _EVICTION_BATCH)
        return self._evict(victims) if victims else None

    def finish(self, eviction: Eviction) -> None:
        """The files of an eviction are deleted (or failed to be): the names may be reused."""
        for name in eviction.names:
            if self._doomed.get(name) is eviction:
                del self._doomed[name]
        self._freeing -= eviction.size
        self._free_space.change(eviction.size)
        eviction.done.set()

    def _victims(self, needed: int, limit: int | None = None) -> list[str]:
        """Least recently used blocks not in use, adding up to at least `needed` bytes if they
        can (at most `limit` of them)."""
        victims: list[str] = []
        freed = 0
        for name, entry in self._entries.items():
            if freed >= needed or len(victims) == limit:
                break
            if name not in self._pins:
                victims.append(name)
                freed += entry.size
        return victims

    def _evict(self, names: list[str]) -> Eviction:
        """Forget blocks now; the caller deletes their files in a worker thread, because an
        unlink of a 1 MiB file takes ~350 µs here (ext4 mounted with `discard`)."""
        size = sum(self._entries[name].size for name in names)
        eviction = Eviction(names, size)
        for name in names:
            self.forget(name)
            self._doomed[name] = eviction
        self._freeing += size
        self.evictions += len(names)
        return eviction

    def begin_scan(self) -> set[str]:
        """A scan starts listing the directory: the names forgotten until it ends go here."""
        forgotten: set[str] = set()
        self._scans.append(forgotten)
        return forgotten

    def end_scan(self, forgotten: set[str]) -> None:
        self._scans.remove(forgotten)

    def merge_scan(
        self, found: list[tuple[float, str, int]], started: float, forgotten: set[str]
    ) -> None:
        """Fold a directory scan (sorted by mtime) into the LRU order.

        Blocks this process knows keep their place; blocks it did not know are placed by their
        mtime (the last use any process recorded), unless this process `forgot` them while
        the scan ran (their files were listed, then deleted); known blocks missing from the
        scan and unused since it started were evicted by someone else and are forgotten.
        """
        on_disk = {name for _, name, _ in found}
        gone = [
            name
            for name, entry in self._entries.items()
            if name not in on_disk and entry.used < started and name not in self._pins
        ]
        for name in gone:
            self.forget(name)
        unknown = [
            (mtime, name, _Entry(size, mtime, mtime))
            for mtime, name, size in found
            if name not in self._entries and name not in self._doomed and name not in forgotten
        ]
        if not unknown:  # the usual case with one process: the order stands as it is
            return
        known = [(entry.used, name, entry) for name, entry in self._entries.items()]
        merged = heapq.merge(unknown, known, key=lambda item: item[0])
        self._entries = OrderedDict((name, entry) for _, name, entry in merged)
        self.total += sum(entry.size for _, _, entry in unknown)
