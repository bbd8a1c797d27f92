"""Where a read meets the cache: sizes before the first byte, bytes through the block store.

`stat` answers from memory, then from the metadata kept across remounts, and only then probes
storage (one-byte ranged GET), so `ls -l` after a remount costs no request per file. `read`
hands the block store a fetch function bound to the blob's version, so the cache never sees a
URL and never mixes versions.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
from collections.abc import Iterable

import trio
from cachetools import LRUCache

from fsmount.blob import Blob, BlobStat, InlineBlob, RemoteBlob
from fsmount.cache.blocks import BlockStore, Sink
from fsmount.cache.metadata import MetadataStore
from fsmount.errors import ContentChanged, FetchError
from fsmount.transfer import Storage

log = logging.getLogger(__name__)

_MEMORY_ENTRIES = 200_000  # sizes and ETags kept in memory (each ~200 bytes)
_SAVE_BATCH = 256  # probe results written to the metadata store in one transaction


class Content:
    """Sizes and bytes of blobs, for the FUSE layer (which knows nothing of where they live)."""

    def __init__(
        self, storage: Storage, blocks: BlockStore, metadata: MetadataStore, *, parallel: int = 32
    ) -> None:
        self._storage = storage
        self._blocks = blocks
        self._metadata = metadata
        # Bounded: every size is also in the metadata store, so a dropped one costs a lookup.
        self._stats: LRUCache[str, BlobStat] = LRUCache(maxsize=_MEMORY_ENTRIES)
        self._probing: dict[str, trio.Event] = {}
        self._failures: dict[str, FetchError] = {}
        self._unsaved: dict[str, dict[str, object]] = {}  # probe results not yet on disk
        # ETags first seen, for blobs whose stat had none (a dropped one is pinned again)
        self._etags: LRUCache[str, str] = LRUCache(maxsize=_MEMORY_ENTRIES)
        self._limit = trio.CapacityLimiter(parallel)

    async def stat(self, blob: Blob) -> BlobStat:
        if isinstance(blob, InlineBlob):
            return BlobStat(len(blob.data), 0.0)
        known = self._known(blob)
        if known is not None:
            return known
        await self._probe_of(blob).wait()
        known = self._known(blob)
        if known is not None:
            return known
        failure = self._failures.get(blob.key)
        raise FetchError(
            failure.errno if failure else errno.EIO,
            str(failure) if failure else f"{blob.description}: size unknown",
        )

    async def stat_many(self, blobs: Iterable[Blob]) -> None:
        """Learn many sizes at once (a directory listing): bounded parallel probes.

        The probes outlive the request that wanted them: when a huge listing takes longer than
        the request's deadline, what was learned is kept and a retried `ls` goes on from there.
        Failures are left for each file's own `stat` to report.
        """
        waits = [
            self._probe_of(blob)
            for blob in blobs
            if isinstance(blob, RemoteBlob) and self._known(blob) is None
        ]
        for done in waits:
            await done.wait()

    def _probe_of(self, blob: RemoteBlob) -> trio.Event:
        """The running probe of `blob`, or a new one. (An Event has no truth value in trio:
        `get(...) or start()` raises on a probe in progress.)"""
        pending = self._probing.get(blob.key)
        return pending if pending is not None else self._start_probe(blob)

    def _start_probe(self, blob: RemoteBlob) -> trio.Event:
        done = self._probing[blob.key] = trio.Event()
        self._failures.pop(blob.key, None)
        trio.lowlevel.spawn_system_task(self._probe, blob, done)
        return done

    async def _probe(self, blob: RemoteBlob, done: trio.Event) -> None:
        """One size probe, as a task of its own: it must never raise (it would end the mount)."""
        try:
            async with self._limit:
                st = await self._storage.probe(blob)
            if blob.mtime is not None:  # the service's own time beats the storage's
                st = BlobStat(st.size, blob.mtime, st.etag)
            self._stats[_identity(blob)] = st
            self._unsaved[_meta_key(blob)] = {"size": st.size, "mtime": st.mtime, "etag": st.etag}
        except FetchError as exc:
            self._failures[blob.key] = exc
            log.warning("size of %s: %s", blob.description, exc)
        except Exception as exc:
            self._failures[blob.key] = FetchError.eio(f"{blob.description}: {exc!r}")
            log.exception("size of %s", blob.description)
        finally:
            del self._probing[blob.key]
            if len(self._unsaved) >= _SAVE_BATCH or not self._probing:
                self._save()
            done.set()

    def _save(self) -> None:
        """Write what probes learned in one transaction: a directory of 10,000 files costs a
        few transactions, not 10,000. A failure costs probes after a remount, nothing now."""
        unsaved, self._unsaved = self._unsaved, {}
        try:
            self._metadata.put_many(unsaved)
        except sqlite3.Error as exc:
            log.warning("could not keep %d sizes in the metadata cache: %s", len(unsaved), exc)

    async def read(
        self,
        blob: Blob,
        offset: int,
        length: int,
        version: BlobStat | None = None,
        reader: int | None = None,
    ) -> bytes:
        """Bytes of `blob`, of the given `version` (what the reader's open saw) if given.
        `reader` names the open file, whose readahead goes with `close_reader`.

        A version that is gone fails with ContentChanged (EIO) for good: a reader never gets
        bytes of two versions through one open file.
        """
        if isinstance(blob, InlineBlob):
            return blob.data[offset : offset + length]
        st = version or await self.stat(blob)
        if offset >= st.size or length <= 0:
            return b""

        ident = _identity(blob)

        def pin(seen: str | None) -> None:
            # Sizes the API gave come without an ETag: the first range read pins one, so the
            # blocks of one file never come from two versions. Checked before any byte flows.
            if seen is not None and self._etags.setdefault(ident, seen) != seen:
                raise ContentChanged(
                    errno.EIO, f"{blob.description}: the remote file changed while being read"
                )

        async def fetch(start: int, end: int, sink: Sink) -> None:
            etag = st.etag or self._etags.get(ident)
            await self._storage.fetch(blob, start, end, etag, sink, pin)

        version = blob.version or st.etag or ""
        try:
            key = f"{blob.key}@{version}"
            return await self._blocks.read(key, st.size, offset, length, fetch, reader=reader)
        except ContentChanged:
            self.forget(blob)  # the next open learns the current size/version afresh
            raise

    def close_reader(self, reader: int) -> None:
        self._blocks.close_reader(reader)

    def forget(self, blob: RemoteBlob) -> None:
        """Drop what is known of a blob's size and version (it changed, or failed)."""
        self._etags.pop(_identity(blob), None)
        self._unsaved.pop(_meta_key(blob), None)
        if blob.size is None:
            self._stats.pop(_identity(blob), None)
            self._metadata.put(_meta_key(blob), {})
        self._storage.forget_url(blob)

    def _known(self, blob: RemoteBlob) -> BlobStat | None:
        st = self._stats.get(_identity(blob))
        if st is not None:
            return st
        if blob.size is not None and blob.mtime is not None:
            st = BlobStat(blob.size, blob.mtime, None)
        else:
            stored = self._metadata.get(_meta_key(blob))
            if not stored or "size" not in stored:
                return None
            st = BlobStat(stored["size"], stored["mtime"], stored.get("etag"))
        self._stats[_identity(blob)] = st
        return st


def _identity(blob: RemoteBlob) -> str:
    """What a size is known for: the object, and its version when the service names one."""
    return f"{blob.key}@{blob.version}" if blob.version else blob.key


def _meta_key(blob: RemoteBlob) -> str:
    return f"stat:{_identity(blob)}"
