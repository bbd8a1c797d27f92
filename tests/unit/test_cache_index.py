"""The cache index, alone and synchronous: whatever happens, the total is the sum of the sizes
of the blocks it holds, a write it made room for fits the budget, and pinned blocks stay."""

from __future__ import annotations

from collections import Counter

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fsmount.cache.index import Eviction, FreeSpace, Index

NAMES = [f"{i:02x}/{i:032x}-0" for i in range(8)]
BUDGET = 1_000
names = st.sampled_from(NAMES)
sizes = st.integers(1, 400)


class IndexMachine(RuleBasedStateMachine):
    """Drives an Index through the calls the keeper makes, keeping the sizes it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.index = Index(BUDGET, 0, FreeSpace(lambda: 1 << 40))
        self.size: dict[str, int] = {}  # the size last given for each name
        self.pins: Counter[str] = Counter()
        self.writes: list[tuple[int, Eviction]] = []  # made room for, not released yet
        self.deleting: list[Eviction] = []  # trimmed, files not deleted yet
        self.scan: tuple[set[str], float] | None = None  # a scan running: (forgotten, started)

    def held(self) -> list[str]:
        return [name for name in NAMES if name in self.index]

    def evicted(self, eviction: Eviction) -> None:
        assert not set(eviction.names) & set(self.pins), "a pinned block was evicted"
        assert all(self.index.doomed(name) is eviction for name in eviction.names)
        assert not any(name in self.index for name in eviction.names)

    @rule(name=names, size=sizes, mtime=st.floats(0, 2e9))
    def adopt(self, name: str, size: int, mtime: float) -> None:
        if name not in self.index and self.index.doomed(name) is None:  # as the keeper checks
            self.index.adopt(name, size, mtime)
            self.size[name] = size

    @rule(size=sizes, name=names)
    def write(self, size: int, name: str) -> None:
        eviction = self.index.make_room(size)
        if eviction is None:
            return
        self.evicted(eviction)
        assert self.index.total + sum(s for s, _ in self.writes) + size <= BUDGET
        self.writes.append((size, eviction))
        self.index.record(name, size)  # the write succeeded
        self.size[name] = size

    @precondition(lambda self: self.writes)
    @rule(data=st.data())
    def write_ends(self, data: st.DataObject) -> None:
        size, eviction = self.writes.pop(data.draw(st.integers(0, len(self.writes) - 1)))
        self.index.release(size, eviction)
        assert eviction.done.is_set()

    @rule()
    def trim(self) -> None:
        eviction = self.index.trim()
        if eviction is not None:
            self.evicted(eviction)
            self.deleting.append(eviction)

    @precondition(lambda self: self.deleting)
    @rule()
    def deleted(self) -> None:
        self.index.finish(self.deleting.pop(0))

    @rule(name=names)
    def touch(self, name: str) -> None:
        self.index.touch(name)

    @rule(name=names)
    def forget(self, name: str) -> None:
        self.index.forget(name)

    @rule(name=names)
    def pin(self, name: str) -> None:
        self.index.pin(name)
        self.pins[name] += 1

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.pins)))
        self.index.unpin(name)
        self.pins[name] -= 1
        if not self.pins[name]:
            del self.pins[name]

    @precondition(lambda self: self.scan is None)
    @rule(started=st.floats(0, 2e9))
    def scan_starts(self, started: float) -> None:
        self.scan = self.index.begin_scan(), started

    @precondition(lambda self: self.scan is not None)
    @rule(found=st.dictionaries(names, st.tuples(st.floats(0, 2e9), sizes)))
    def scan_ends(self, found: dict[str, tuple[float, int]]) -> None:
        assert self.scan is not None
        forgotten, started = self.scan
        self.index.end_scan(forgotten)
        before = set(self.held())
        listing = sorted((mtime, name, size) for name, (mtime, size) in found.items())
        self.index.merge_scan(listing, started, forgotten)
        for name, (_, size) in found.items():
            if name not in before:
                self.size[name] = size
        self.scan = None

    @invariant()
    def total_is_the_sum_of_the_sizes(self) -> None:
        held = self.held()
        assert len(self.index) == len(held)
        assert self.index.total == sum(self.size[name] for name in held)


test_index_keeps_its_total = IndexMachine.TestCase
