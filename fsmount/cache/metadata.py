"""What never changes on a service, kept across remounts: sizes, ETags, mtimes, image details,
and the time each object was first seen.

One SQLite database in WAL mode, which two processes (two mounts, or a mount and `fsmount
cache`) may use at once. Its calls come from the mount's event loop, where a wait for a lock
another process holds would stall every FUSE request, so none waits for one:

- reads run on the caller's thread: in WAL mode they never wait for a writer (a lookup takes a
  few microseconds, a 10,000-key one a few tens of milliseconds; figures in NOTES.md);
- writes are kept in memory, where reads find them at once, and a writer thread commits them,
  waiting for the lock there if another process holds it;
- a first-seen time is written at once when the lock is free, so two processes asking at once
  agree on it; when another process holds the lock, the time is kept in memory and written
  behind like the rest (the database then keeps whichever time was committed first).

It is a cache: losing the last transactions to a power cut (or writes still waiting for the
lock when `close` gives up) only costs a request later, hence `synchronous=NORMAL`; a
database that cannot be opened is set aside and started afresh.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

log = logging.getLogger(__name__)

_BUSY_TIMEOUT = 5.0  # seconds the writer thread waits for the lock per attempt
# How long a read may wait: in WAL mode only for a crash recovery or the last connection's
# clean-up, which take milliseconds, never for another process's write transaction.
_READ_WAIT = "PRAGMA busy_timeout = 250"  # ms
_encode = json.JSONEncoder(separators=(",", ":")).encode
_BATCH = 500  # keys per `IN (...)` query, well under SQLite's limit on bound parameters
_SEEN = "SELECT key, seen FROM first_seen"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS first_seen (key TEXT PRIMARY KEY, seen REAL NOT NULL) WITHOUT ROWID;
"""
_PUT = (
    "INSERT INTO meta (key, value) VALUES (?, ?)"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)
_FIRST = "INSERT INTO first_seen (key, seen) VALUES (?, ?) ON CONFLICT DO NOTHING"
_META, _FIRST_SEEN = 0, 1  # the two halves of what waits to be written


class MetadataStore:
    """A persistent map from keys to small JSON objects, plus first-seen times of keys."""

    def __init__(self, path: Path) -> None:
        """Open (creating if needed, with mode 0600) the database at `path`."""
        self._path = Path(path)
        try:
            self._db = _open(self._path)
        except sqlite3.DatabaseError as exc:
            if exc.sqlite_errorcode not in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
                raise  # locked, unreadable, disk full...: not a reason to drop what it holds
            aside = self._path.with_name(self._path.name + ".corrupt")
            log.warning("metadata cache %s is unreadable (%s); moved to %s", path, exc, aside)
            for suffix in ("", "-wal", "-shm"):
                source = Path(f"{self._path}{suffix}")
                if source.exists():
                    os.replace(source, f"{aside}{suffix}")
            self._db = _open(self._path)
        self._db.execute(_READ_WAIT)
        # Not yet committed, newest first: `_queued` (for the writer thread's next turn), then
        # `_writing` (its current one). Values as JSON text; first-seen times as numbers.
        self._wake = threading.Condition()
        self._queued: tuple[dict[str, str], dict[str, float]] = ({}, {})
        self._writing: tuple[dict[str, str], dict[str, float]] = ({}, {})
        self._writer: threading.Thread | None = None
        self._closing = False

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def get(self, key: str) -> dict[str, Any] | None:
        """The object stored under `key`, or None."""
        return self.get_many([key]).get(key)

    def get_many(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The objects stored under `keys`, absent ones left out: one query per 500 keys
        instead of one per key, for a directory's worth of files (timings in NOTES.md)."""
        wanted = list(dict.fromkeys(keys))
        found = self._unwritten(_META, wanted)
        found.update(self._select("SELECT key, value FROM meta", _without(wanted, found)))
        return {key: json.loads(value) for key, value in found.items()}

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        """Store `value` (JSON-serialisable) under `key`, replacing what was there."""
        self.put_many({key: value})

    def put_many(self, items: Mapping[str, Mapping[str, Any]]) -> None:
        """Store many objects, committed in one transaction with what else is waiting: all of
        them, or (on error) none. A value that is not JSON raises here, and nothing is kept."""
        rows = {key: _encode(value) for key, value in items.items()}
        if rows:
            self._write_behind(rows, {})

    def first_seen(self, key: str) -> float:
        """When `key` was first seen (seconds since the epoch); now, recorded, if never."""
        return self.first_seen_many([key])[key]

    def first_seen_many(self, keys: Iterable[str]) -> dict[str, float]:
        """First-seen times of many keys; unseen keys are recorded as now, in one transaction.

        Two processes asking at once agree (the first insert wins and both read it back),
        unless the other one holds the write lock: then the time is written behind, and this
        process answers it until it is (see the module docstring).
        """
        wanted = list(dict.fromkeys(keys))
        found = self._unwritten(_FIRST_SEEN, wanted)
        found.update(self._select(_SEEN, _without(wanted, found)))
        missing = _without(wanted, found)
        if missing:  # only then take the write lock: listing a known directory never waits
            now = time.time()
            if not self._insert_seen_now(missing, now, found):
                times = dict.fromkeys(missing, now)
                self._write_behind({}, times)
                found.update(times)
        return found

    def close(self) -> None:
        """Write what is still waiting, then close. Writes another process keeps the lock
        from for the whole busy timeout are given up (logged)."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._writer is not None:
            self._writer.join()
        self._db.close()

    def _select(self, query: str, keys: list[str]) -> dict[str, Any]:
        """Run `query` (which selects key and one value) for the rows of `keys`, in batches."""
        found: dict[str, Any] = {}
        for start in range(0, len(keys), _BATCH):
            batch = keys[start : start + _BATCH]
            marks = ",".join("?" * len(batch))
            found.update(self._db.execute(f"{query} WHERE key IN ({marks})", batch).fetchall())
        return found

    def _unwritten(self, table: int, keys: list[str]) -> dict[str, Any]:
        """What is waiting to be written for `keys`, in `_META` or `_FIRST_SEEN`."""
        with self._wake:
            queued, writing = self._queued[table], self._writing[table]
            if not (queued or writing):
                return {}
            found = {}
            for key in keys:
                value = queued.get(key, writing.get(key))
                if value is not None:
                    found[key] = value
            return found

    def _insert_seen_now(self, keys: list[str], now: float, found: dict[str, float]) -> bool:
        """Record first-seen times and read back the winners, if the write lock is free right
        now (False, having done nothing, if another process holds it)."""
        self._db.execute("PRAGMA busy_timeout = 0")
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc):
                raise
            return False
        finally:
            self._db.execute(_READ_WAIT)
        try:
            self._db.executemany(_FIRST, ((key, now) for key in keys))
            found.update(self._select(_SEEN, keys))
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        return True

    def _write_behind(self, rows: dict[str, str], times: dict[str, float]) -> None:
        with self._wake:
            if self._closing:  # what a write to a closed database raised before (callers know)
                raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
            self._queued[_META].update(rows)
            self._queued[_FIRST_SEEN].update(times)
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_loop, name=f"metadata writer {self._path}", daemon=True
                )
                self._writer.start()
            self._wake.notify()

    def _write_loop(self) -> None:
        """The writer thread: commit what is queued, one transaction per turn, until closed.

        While another process holds the lock, a turn waits for it (`_BUSY_TIMEOUT`) and tries
        again, what was queued meanwhile joining in; once closing, one such wait is the last.
        """
        db = _connect(self._path, _BUSY_TIMEOUT)
        try:
            while True:
                with self._wake:
                    while not (self._closing or any(self._queued)):
                        self._wake.wait()
                    if not any(self._queued):
                        return
                    self._writing, self._queued = self._queued, ({}, {})
                rows, times = self._writing
                try:
                    _commit(db, rows, times)
                except sqlite3.Error as exc:
                    if _is_busy(exc) and not self._closing:
                        self._requeue()
                        continue
                    lost = len(rows) + len(times)  # a cache: it costs requests after a remount
                    log.warning("could not keep %d entries in the metadata cache: %s", lost, exc)
                with self._wake:
                    self._writing = ({}, {})
        finally:
            db.close()

    def _requeue(self) -> None:
        """Put a turn that could not be written back in the queue, under what is newer."""
        with self._wake:
            (rows, times), (new_rows, new_times) = self._writing, self._queued
            self._queued = ({**rows, **new_rows}, {**times, **new_times})
            self._writing = ({}, {})


def _without(keys: list[str], found: Mapping[str, Any]) -> list[str]:
    return [key for key in keys if key not in found]


def _is_busy(exc: sqlite3.Error) -> bool:
    """Whether SQLite refused because another connection holds a lock."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and (code & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _commit(db: sqlite3.Connection, rows: dict[str, str], times: dict[str, float]) -> None:
    """One write transaction, taking the write lock up front (BEGIN IMMEDIATE): two writers
    then wait for each other instead of failing with a deadlock error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.executemany(_PUT, rows.items())
        db.executemany(_FIRST, times.items())
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _connect(path: Path, timeout: float) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, timeout=timeout)
    db.execute("PRAGMA synchronous = NORMAL")
    return db


def _open(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))  # -wal/-shm copy it
    db = _connect(path, _BUSY_TIMEOUT)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.executescript(_SCHEMA)
    except BaseException:
        db.close()
        raise
    return db
