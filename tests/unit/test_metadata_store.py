"""MetadataStore: what never changes on a service, kept across remounts and shared safely."""

from __future__ import annotations

import logging
import multiprocessing
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fsmount.cache.metadata import MetadataStore


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "metadata.sqlite"


def test_missing_key_is_none_and_values_round_trip(db_path: Path) -> None:
    with MetadataStore(db_path) as store:
        assert store.get("stat:a") is None
        store.put("stat:a", {"size": 12, "mtime": 1.5, "etag": '"x"', "nested": {"n": [1, 2]}})
        assert store.get("stat:a") == {
            "size": 12,
            "mtime": 1.5,
            "etag": '"x"',
            "nested": {"n": [1, 2]},
        }
        store.put("stat:a", {})
        assert store.get("stat:a") == {}


def test_keys_may_contain_any_character(db_path: Path) -> None:
    keys = ["a/b?c=d&e", "naïve ünïcode", "nul\0inside", "'; DROP TABLE meta; --", ""]
    with MetadataStore(db_path) as store:
        store.put_many({key: {"k": key} for key in keys})
        assert [store.get(key) for key in keys] == [{"k": key} for key in keys]
        assert store.get("nul") is None


def test_values_persist_across_instances(db_path: Path) -> None:
    with MetadataStore(db_path) as store:
        store.put_many({f"k{i}": {"size": i} for i in range(10_000)})
    with MetadataStore(db_path) as store:
        assert store.get("k9999") == {"size": 9999}
        assert store.get_many(["k1", "k2", "absent"]) == {"k1": {"size": 1}, "k2": {"size": 2}}
        assert len(store.get_many(f"k{i}" for i in range(10_000))) == 10_000


def test_put_many_stores_all_or_nothing(db_path: Path) -> None:
    with MetadataStore(db_path) as store:
        store.put("before", {"v": 1})
        with pytest.raises(TypeError):
            store.put_many({"a": {"v": 1}, "b": {"v": object()}, "c": {"v": 3}})
        assert store.get("a") is None
        assert store.get("c") is None
        assert store.get("before") == {"v": 1}


def test_first_seen_is_recorded_once_and_kept(db_path: Path) -> None:
    with MetadataStore(db_path) as store:
        before = time.time()
        first = store.first_seen("item")
        assert before <= first <= time.time()
        time.sleep(0.01)
        assert store.first_seen("item") == first
        many = store.first_seen_many(["item", "new", "new"])
        assert many["item"] == first
        assert many["new"] > first
        assert set(many) == {"item", "new"}
    with MetadataStore(db_path) as store:
        assert store.first_seen_many(["item", "new"]) == {"item": first, "new": many["new"]}
        assert store.first_seen_many([]) == {}


def test_first_seen_many_handles_a_large_directory(db_path: Path) -> None:
    keys = [f"gc/archive/item-{i}" for i in range(10_000)]
    with MetadataStore(db_path) as store:
        seen = store.first_seen_many(keys)
        assert set(seen) == set(keys)
        assert store.first_seen_many(reversed(keys)) == seen


def test_database_and_directory_are_private_and_in_wal_mode(db_path: Path) -> None:
    with MetadataStore(db_path) as store:
        store.put("k", {"v": 1})
        assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700
        for suffix in ("-wal", "-shm"):
            assert stat.S_IMODE(Path(f"{db_path}{suffix}").stat().st_mode) == 0o600
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_unreadable_database_is_set_aside_and_started_afresh(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not an SQLite database" * 100)
    with caplog.at_level(logging.WARNING), MetadataStore(db_path) as store:
        assert store.get("k") is None
        store.put("k", {"v": 1})
        assert store.get("k") == {"v": 1}
    assert "unreadable" in caplog.text
    assert db_path.with_name("metadata.sqlite.corrupt").exists()


def _hammer(path: str, worker: int, rounds: int) -> dict[str, float]:
    """One process of the two-process test: interleaved writes and first-seen lookups."""
    seen: dict[str, float] = {}
    with MetadataStore(Path(path)) as store:
        for r in range(rounds):
            store.put_many({f"w{worker}-{r}-{i}": {"r": r, "i": i} for i in range(200)})
            seen.update(store.first_seen_many(f"shared-{r}-{i}" for i in range(200)))
            store.put("shared", {"worker": worker, "round": r})
    return seen


def test_two_processes_share_one_database(db_path: Path) -> None:
    MetadataStore(db_path).close()
    ctx = multiprocessing.get_context("spawn")
    started = time.time()
    with ctx.Pool(2) as pool:
        results = pool.starmap(_hammer, [(str(db_path), 0, 30), (str(db_path), 1, 30)])
    took = time.time() - started
    assert results[0].keys() == results[1].keys()
    with MetadataStore(db_path) as store:
        stored = store.first_seen_many(results[0])
    # Each process answered the stored time, unless it asked while the other held the write
    # lock: then its own, written behind, and the one committed first was kept.
    for key, seen in stored.items():
        assert seen in (results[0][key], results[1][key]), key
        assert abs(results[0][key] - results[1][key]) < took, key
    with MetadataStore(db_path) as store:
        assert store.get("w0-29-199") == {"r": 29, "i": 199}
        assert store.get("w1-29-199") == {"r": 29, "i": 199}
        assert store.get("shared") in ({"worker": 0, "round": 29}, {"worker": 1, "round": 29})


@contextmanager
def locked_by_another_process(path: Path) -> Iterator[None]:
    """Another process holds the database's write lock (a write transaction) for the block."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys\n"
            f"db = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
            "db.execute('BEGIN IMMEDIATE')\n"
            "db.execute('INSERT INTO meta VALUES (?, ?)', ('theirs', '{}'))\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n"
            "db.execute('COMMIT')\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        yield
    finally:
        holder.communicate("", timeout=30)


def test_no_call_waits_while_another_process_holds_the_write_lock(db_path: Path) -> None:
    """Calls run on the mount's event loop: a lock held elsewhere must not stop every request."""
    with MetadataStore(db_path) as store:
        store.put("known", {"v": 1})
        old = store.first_seen("old")
    with MetadataStore(db_path) as store:
        with locked_by_another_process(db_path):
            started = time.monotonic()
            store.put("k", {"v": 2})
            store.put_many({f"m{i}": {"i": i} for i in range(1000)})
            seen = store.first_seen_many(["old", "new"])
            assert seen["old"] == old and seen["new"] >= started - 1
            assert store.get("k") == {"v": 2} and store.get("known") == {"v": 1}
            assert store.get_many(["m7", "absent"]) == {"m7": {"i": 7}}
            assert store.first_seen("new") == seen["new"]  # the same answer until it is written
            assert time.monotonic() - started < 0.5
        store.put("k", {"v": 3})  # a later write of the same key wins
    with MetadataStore(db_path) as store:  # everything was written once the lock was free
        assert store.get("k") == {"v": 3} and store.get("m999") == {"i": 999}
        assert store.get("theirs") == {}
        assert store.first_seen("new") == seen["new"]
