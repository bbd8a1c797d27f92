"""Where a read meets the cache: sizes before the first byte, bytes through the block store.

`stat` answers from memory, then from the metadata kept across remounts, and only then probes
storage (one-byte ranged GET), so `ls -l` after a remount costs no request per file. A blob
whose storage tells no size (`RemoteBlob.whole_fetch`) is probed by fetching it whole into the
block store, so the reads that follow are cache hits. `read` hands the block store a fetch
function bound to the blob's version, so the cache never sees a URL and never mixes versions.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
from collections.abc import Iterable
from typing import Any

import trio
from cachetools import LRUCache

from fsmount.blob import Blob, BlobStat, InlineBlob, RemoteBlob, RenderedBlob
from fsmount.cache.blocks import BlockStore, Sink
from fsmount.cache.metadata import MetadataStore
from fsmount.errors import ContentChanged, FetchError
from fsmount.transfer import Storage

log = logging.getLogger(__name__)

_MEMORY_ENTRIES = 200_000  # sizes and ETags kept in memory (each ~200 bytes)
_SAVE_BATCH = 256  # probe results written to the metadata store in one transaction


class _Probe:
    """One size probe in flight: who waits on it, what it found, or how it failed (for them
    alone)."""

    __slots__ = ("done", "failure", "found", "scope", "started")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.failure: FetchError | None = None
        self.found: BlobStat | None = None
        self.started = False  # a guess waits for a slot before it starts
        self.scope = trio.CancelScope()  # cancelled when the mount closes


class Content:
    """Sizes and bytes of blobs, for the FUSE layer (which knows nothing of where they live)."""

    def __init__(
        self,
        storage: Storage,
        blocks: BlockStore,
        metadata: MetadataStore,
        *,
        parallel: int = 32,
        speculative: int = 24,
    ) -> None:
        self._storage = storage
        self._blocks = blocks
        self._metadata = metadata
        # Bounded: every size is also in the metadata store, so a dropped one costs a lookup.
        self._stats: LRUCache[str, BlobStat] = LRUCache(maxsize=_MEMORY_ENTRIES)
        self._probing: dict[str, _Probe] = {}
        self._unsaved: dict[str, dict[str, object]] = {}  # probe results not yet on disk
        # ETags first seen, for blobs whose stat had none (a dropped one is pinned again)
        self._etags: LRUCache[str, str] = LRUCache(maxsize=_MEMORY_ENTRIES)
        self._limit = trio.CapacityLimiter(parallel)
        # Probes nobody waits for yet take at most this many of the slots above, so a
        # program's own stat never queues behind a whole window of guesses.
        self._guesses = trio.CapacityLimiter(min(speculative, parallel))
        self._closed = False

    async def aclose(self) -> None:
        """The mount is closing: probes still running (guesses, mostly) stop, and are waited
        for, before the clients they use close. A probe woken just before would otherwise run
        on, without a checkpoint, into a closed client."""
        self._closed = True
        for probe in self._probing.values():
            probe.scope.cancel()
        with trio.move_on_after(5):
            while self._probing:
                await next(iter(self._probing.values())).done.wait()

    def known(self, blob: Blob) -> BlobStat | None:
        """The size and time if known without any I/O (memory, or what the API gave); a
        rendered blob's only once it is asked for (`stat`)."""
        if isinstance(blob, InlineBlob):
            return BlobStat(len(blob.data), 0.0)
        if isinstance(blob, RenderedBlob):
            return None
        st = self._stats.get(_identity(blob))
        if st is None and blob.size is not None and blob.mtime is not None:
            st = BlobStat(blob.size, blob.mtime, None)
        return st

    def recall_many(self, blobs: Iterable[Blob]) -> None:
        """Bring sizes kept by earlier mounts into memory, one query for many blobs (a
        directory's worth), so `known` answers for them without a query each."""
        missing = {
            _meta_key(blob): blob
            for blob in blobs
            if isinstance(blob, RemoteBlob) and self.known(blob) is None
        }
        if not missing:
            return
        for key, stored in self._metadata.get_many(missing).items():
            if "size" in stored:
                blob = missing[key]
                self._stats[_identity(blob)] = _stored_stat(stored)

    async def stat(self, blob: Blob) -> BlobStat:
        if isinstance(blob, InlineBlob):
            return BlobStat(len(blob.data), 0.0)
        if isinstance(blob, RenderedBlob):
            return BlobStat(len(blob.render()), 0.0)
        found: BlobStat | None = None
        for _ in range(2):  # a size forgotten as its probe ended (the file changed): again
            known = self.recalled(blob)
            if known is not None:
                return known
            probe = self._probe_of(blob)
            await probe.done.wait()
            if probe.failure is not None:
                raise probe.failure
            found = probe.found
        # Forgotten again (readers of the old version keep finding it changed): the last
        # probe's answer is the newest there is.
        assert found is not None
        return found

    def guess(self, blob: RemoteBlob) -> None:
        """Probe a size no program asked for yet but one probably will (a walk ahead): it
        runs under the narrower limit, and a program asking meanwhile does not queue behind
        it (`_probe_of` starts it at once)."""
        if blob.key not in self._probing and self.recalled(blob) is None:
            probe = self._probing[blob.key] = _Probe()
            trio.lowlevel.spawn_system_task(self._guessed, blob, probe)

    def _probe_of(self, blob: RemoteBlob) -> _Probe:
        probe = self._probing.get(blob.key)
        if probe is None:
            probe = self._probing[blob.key] = _Probe()
        if not probe.started:
            probe.started = True
            trio.lowlevel.spawn_system_task(self._probe, blob, probe)
        return probe

    async def _guessed(self, blob: RemoteBlob, probe: _Probe) -> None:
        async with self._guesses:
            if not probe.started:  # else a program asked meanwhile: it runs already
                probe.started = True
                await self._probe(blob, probe)

    async def _probe(self, blob: RemoteBlob, probe: _Probe) -> None:
        """One size probe, as a task of its own: it must never raise (it would end the mount)."""
        try:
            with probe.scope:
                if self._closed:
                    probe.scope.cancel()
                async with self._limit:
                    if blob.whole_fetch:
                        st = await self._fetched_whole(blob)
                    else:
                        st = await self._storage.probe(blob)
                if blob.mtime is not None:  # the service's own time beats the storage's
                    st = BlobStat(st.size, blob.mtime, st.etag)
                self._stats[_identity(blob)] = probe.found = st
                meta = {"size": st.size, "mtime": st.mtime, "etag": st.etag}
                self._unsaved[_meta_key(blob)] = meta
            if probe.scope.cancelled_caught:
                probe.failure = FetchError.eio(f"{blob.description}: the mount is closing")
        except FetchError as exc:
            probe.failure = exc
            log.warning("size of %s: %s", blob.description, exc)
        except Exception as exc:
            probe.failure = FetchError.eio(f"{blob.description}: {exc!r}")
            log.exception("size of %s", blob.description)
        finally:
            del self._probing[blob.key]
            if len(self._unsaved) >= _SAVE_BATCH or not self._probing:
                self._save()
            probe.done.set()

    async def _fetched_whole(self, blob: RemoteBlob) -> BlobStat:
        """The size of a blob whose storage tells none: the count of its bytes, fetched whole
        into the block store (retried and resumed like any read). Only a complete fetch gives
        a size, so a half-fetched object is never served."""
        etag: str | None = None

        async def fetch(sink: Sink) -> None:
            nonlocal etag
            etag = await self._storage.fetch(blob, 0, None, None, sink)

        size = await self._blocks.keep(block_key(blob, None), fetch)
        return BlobStat(size, 0.0, etag)

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
        if isinstance(blob, RenderedBlob):
            return blob.render()[offset : offset + length]
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

        try:
            key = block_key(blob, st.etag)
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

    def recalled(self, blob: RemoteBlob) -> BlobStat | None:
        """`known`, or else what the metadata store kept: no request to any service."""
        st = self.known(blob)
        if st is None:
            stored = self._metadata.get(_meta_key(blob))
            if not stored or "size" not in stored:
                return None
            st = _stored_stat(stored)
        self._stats[_identity(blob)] = st
        return st


def _stored_stat(stored: dict[str, Any]) -> BlobStat:
    return BlobStat(stored["size"], stored["mtime"], stored.get("etag"))


def block_key(blob: RemoteBlob, etag: str | None) -> str:
    """What the block store keeps a blob's bytes under: the object and its version (the
    service's own name for it, or else the storage's ETag). A batch export stores under it
    too, so that a later read finds what the export brought."""
    return f"{blob.key}@{blob.version or etag or ''}"


def _identity(blob: RemoteBlob) -> str:
    """What a size is known for: the object, and its version when the service names one."""
    return f"{blob.key}@{blob.version}" if blob.version else blob.key


def _meta_key(blob: RemoteBlob) -> str:
    return f"stat:{_identity(blob)}"
