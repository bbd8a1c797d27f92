"""What never changes on a service, kept across remounts: sizes, ETags, mtimes, image details,
and the time each object was first seen.

One SQLite database in WAL mode: readers never block the writer, two processes (two mounts, or
a mount and `fsmount cache`) may use it at once, and a busy timeout turns lock contention into
a short wait instead of an error. Calls run on the event loop thread: a lookup takes a few
microseconds and a 10,000-row transaction a few tens of milliseconds (measured figures in
NOTES.md beside this file), far below what a thread hop per call would add up to.

It is a cache: losing the last transactions to a power cut only costs a request later, hence
`synchronous=NORMAL`; a database that cannot be opened is set aside and started afresh.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

log = logging.getLogger(__name__)

_BUSY_TIMEOUT = 5.0  # seconds; transactions last milliseconds, so a wait is short
_encode = json.JSONEncoder(separators=(",", ":")).encode
_BATCH = 500  # keys per `IN (...)` query, well under SQLite's limit on bound parameters
_SEEN = "SELECT key, seen FROM first_seen"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS first_seen (key TEXT PRIMARY KEY, seen REAL NOT NULL) WITHOUT ROWID;
"""


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
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def get_many(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The objects stored under `keys`, absent ones left out: one query per 500 keys
        instead of one per key, for a directory's worth of files (timings in NOTES.md)."""
        rows = self._select("SELECT key, value FROM meta", list(dict.fromkeys(keys)))
        return {key: json.loads(value) for key, value in rows.items()}

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        """Store `value` (JSON-serialisable) under `key`, replacing what was there."""
        self.put_many({key: value})

    def put_many(self, items: Mapping[str, Mapping[str, Any]]) -> None:
        """Store many objects in one transaction: all of them, or (on error) none."""
        rows = [(key, _encode(value)) for key, value in items.items()]
        if not rows:
            return
        with self._write():
            self._db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                rows,
            )

    def first_seen(self, key: str) -> float:
        """When `key` was first seen (seconds since the epoch); now, recorded, if never."""
        return self.first_seen_many([key])[key]

    def first_seen_many(self, keys: Iterable[str]) -> dict[str, float]:
        """First-seen times of many keys; unseen keys are recorded as now, in one transaction.

        Two processes asking at once agree: the first insert wins and both read it back.
        """
        wanted = list(dict.fromkeys(keys))
        found = self._select(_SEEN, wanted)
        missing = [key for key in wanted if key not in found]
        if missing:  # only then take the write lock: listing a known directory never waits
            now = time.time()
            with self._write():
                self._db.executemany(
                    "INSERT INTO first_seen (key, seen) VALUES (?, ?) ON CONFLICT DO NOTHING",
                    ((key, now) for key in missing),
                )
                found.update(self._select(_SEEN, missing))
        return found

    def close(self) -> None:
        self._db.close()

    def _select(self, query: str, keys: list[str]) -> dict[str, Any]:
        """Run `query` (which selects key and one value) for the rows of `keys`, in batches."""
        found: dict[str, Any] = {}
        for start in range(0, len(keys), _BATCH):
            batch = keys[start : start + _BATCH]
            marks = ",".join("?" * len(batch))
            found.update(self._db.execute(f"{query} WHERE key IN ({marks})", batch).fetchall())
        return found

    @contextmanager
    def _write(self) -> Iterator[None]:
        """A write transaction that takes the write lock up front (BEGIN IMMEDIATE), so the
        busy timeout applies instead of a deadlock error when two processes write at once."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise


def _open(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))  # -wal/-shm copy it
    db = sqlite3.connect(path, isolation_level=None, timeout=_BUSY_TIMEOUT)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.executescript(_SCHEMA)
    except BaseException:
        db.close()
        raise
    return db
