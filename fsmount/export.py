"""`fsmount cache prefetch --batch`, run by the mount: Scenario native files brought through
batch export jobs and kept in the block cache under the keys reads look up.

It runs inside the mount process, asked over its control socket (status/control.py), for two
reasons. Only the mount knows what a path is: which asset and version a file shows, its size,
hence the block-store key a read of it uses (`content.block_key`). And the blocks must land in
the mount's own BlockStore, under its budget, eviction and free-space floor, not beside it.

One request, step by step:

1. The paths are walked in the mount's tree (its listings, as `ls` would get them). Native
   files are what an export holds; converted formats are only counted (they stay with the
   per-file path). Natives already cached need nothing; those without a listed size, or
   larger than `HOLD`, are left to the per-file path.
2. The rest is cut into jobs of at most `batch_size` assets (the API takes 1,000). Every job's
   cost is asked for with a dry run before any job starts; a cost above zero needs `yes`.
3. Job after job: start it, poll its status (each change is an event), then read the zip.
   Its central directory comes first, from one ranged read of its tail; each entry is matched
   to an asset by the id in its name (`<asset-id>.<ext>`, as asked) and by size, anything else
   is skipped with a warning. The entries' span is then streamed in `RANGE`-sized requests,
   never held whole in memory nor written to disk: each entry is held until its CRC checks,
   then stored. So nothing unchecked enters the cache, and a cut or failed download leaves
   only complete, checked files behind.
4. The answer lists the natives not stored, which the client then reads through the mount.

Events sent (JSON objects): `plan`, `cost`, `refused`, `job`, `download`, `bytes`, `warning`,
then `done` or `error`; see `BatchExport.run`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import trio

from fsmount import zipstream
from fsmount.blob import RemoteBlob
from fsmount.cache.blocks import BlockStore
from fsmount.content import Content, block_key
from fsmount.errors import FetchError
from fsmount.sources.scenario import (
    EXPORT_FAILED,
    EXPORT_LIMIT,
    EXPORT_SUCCEEDED,
    ROOT,
    Scenario,
    native_asset,
)
from fsmount.status.control import Send
from fsmount.transfer import Storage
from fsmount.tree import Directory, File, Node

log = logging.getLogger(__name__)

HOLD = 32 << 20
"""The largest native file exported: each entry is held in memory until its CRC checks. Larger
files take the per-file path, where a file's own ranged reads cost little by comparison."""
RANGE = 32 << 20
"""Bytes of a zip per request: each is one storage operation, bounded by the mount's
`--timeout` and resumed after a cut like any read."""
_DIRECTORY_MAX = 64 << 20  # a central directory larger than this is not one we asked for
_POLL_FIRST, _POLL_MAX = 0.25, 5.0  # seconds between status requests, growing
_JOB_DEADLINE = 3600.0  # seconds a job may take to be prepared before we give up on it


class ExportError(Exception):
    """The batch prefetch cannot go on; the message is the one line the user sees."""


@dataclass(frozen=True, slots=True)
class _Native:
    """A native file to bring, where the mount shows it (first path seen), and its cache key."""

    asset_id: str
    path: str
    blob: RemoteBlob
    key: str
    size: int


class BatchExport:
    """The mount's `batch-prefetch` control command."""

    def __init__(
        self,
        root: Directory,
        scenario: Scenario,
        storage: Storage,
        content: Content,
        blocks: BlockStore,
    ) -> None:
        self._root = root
        self._scenario = scenario
        self._storage = storage
        self._content = content
        self._blocks = blocks

    async def run(self, request: dict[str, Any], send: Send) -> None:
        """`{"paths": [...], "yes": bool, "batch_size": int}`, paths relative to the mount.

        Events: `plan` (what was found), `cost` (of all jobs, from their dry runs) or, when it
        is not accepted, `refused` and the end; per job `job` (every status answer), `download`
        (how many bytes of the zip it reads), `bytes` as they arrive, `warning`s; last `done`
        (what was stored, and the paths left to the per-file path) or `error` (one line).
        """
        try:
            await self._run(request, send)
        except (ExportError, FetchError) as exc:
            await send({"event": "error", "message": str(exc)})

    async def _run(self, request: dict[str, Any], send: Send) -> None:
        paths = request.get("paths")
        size = request.get("batch_size", EXPORT_LIMIT)
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ExportError("a batch prefetch needs a list of paths")
        if not isinstance(size, int) or not 1 <= size <= EXPORT_LIMIT:
            raise ExportError(f"a batch holds 1 to {EXPORT_LIMIT:,} assets")
        natives, left, converted = await self._collect(paths)
        todo: list[_Native] = []
        cached = 0
        for native in natives:
            if native.size > HOLD:
                left.append(native.path)
            elif await self._blocks.holds(native.key, native.size):
                cached += 1
            else:
                todo.append(native)
        jobs = [todo[start : start + size] for start in range(0, len(todo), size)]
        await send(
            {
                "event": "plan",
                "cached": cached,
                "export": len(todo),
                "jobs": len(jobs),
                "bytes": sum(native.size for native in todo),
                "budget": self._blocks.stats().budget,
                "converted": converted,
            }
        )
        if jobs:
            cost = sum([await self._scenario.export_cost(_ids(job)) for job in jobs])
            await send({"event": "cost", "cost": cost})
            if cost > 0 and request.get("yes") is not True:
                await send({"event": "refused", "cost": cost})
                return
        stored: list[_Native] = []
        for number, job in enumerate(jobs, 1):
            stored += await self._export(number, len(jobs), job, send)
        done = {native.asset_id for native in stored}
        left += [native.path for native in todo if native.asset_id not in done]
        await send(
            {
                "event": "done",
                "stored": len(stored),
                "bytes": sum(native.size for native in stored),
                "per_file": left,
            }
        )

    # -- what to bring ------------------------------------------------------------------------

    async def _collect(self, paths: list[str]) -> tuple[list[_Native], list[str], int]:
        """The distinct native files below the paths; the paths of those with no listed size
        (checking an entry needs it, and learning it costs a request); and how many distinct
        converted files there are."""
        natives: dict[str, _Native] = {}
        unsized: dict[str, str] = {}
        converted: set[str] = set()
        for path in paths:
            for file in await _files(await self._find(path)):
                blob = file.blob
                asset_id = native_asset(blob)
                if not isinstance(blob, RemoteBlob):
                    continue
                if asset_id is None:
                    converted.add(blob.key)
                elif blob.size is None:
                    unsized.setdefault(asset_id, file.path)
                elif asset_id not in natives:
                    stat = await self._content.stat(blob)
                    key = block_key(blob, stat.etag)
                    natives[asset_id] = _Native(asset_id, file.path, blob, key, stat.size)
        return list(natives.values()), list(unsized.values()), len(converted)

    async def _find(self, path: str) -> Node:
        parts = [part for part in path.split("/") if part]
        if not parts or parts[0] != ROOT:
            raise ExportError(f"{path}: only {ROOT}/ paths can be exported")
        node: Node = self._root
        for part in parts:
            child = (await node.children()).get(part) if isinstance(node, Directory) else None
            if child is None:
                raise ExportError(f"{path}: no such file or directory in the mount")
            node = child
        return node

    # -- one job ------------------------------------------------------------------------------

    async def _export(
        self, number: int, jobs: int, natives: list[_Native], send: Send
    ) -> list[_Native]:
        """Start a job, wait for it, store its entries; the natives stored."""
        job_id = await self._scenario.start_export(_ids(natives))
        log.info("scenario export %s: %d assets", job_id, len(natives))
        url = await self._wait(job_id, number, jobs, send)
        blob = self._scenario.export_blob(job_id, url)
        try:
            return await self._download(blob, job_id, number, jobs, natives, send)
        except FetchError as exc:
            reason = str(exc).strip()
            raise ExportError(f"cannot download the zip of export {job_id}: {reason}") from None
        except zipstream.ZipError as exc:
            raise ExportError(f"the zip of export {job_id} cannot be read: {exc}") from None

    async def _wait(self, job_id: str, number: int, jobs: int, send: Send) -> str:
        """Poll the job until it is done; its download URL. Every answer is an event, so the
        client hears from the mount at least every `_POLL_MAX` seconds however long it takes."""
        deadline = trio.current_time() + _JOB_DEADLINE
        delay = _POLL_FIRST
        while True:
            status, url = await self._scenario.export_status(job_id)
            await send({"event": "job", "job": number, "jobs": jobs, "status": status})
            if status == EXPORT_SUCCEEDED and url is not None:
                return url
            if status in EXPORT_FAILED:
                raise ExportError(f"scenario export {job_id} ended in {status}; nothing came of it")
            if trio.current_time() + delay > deadline:
                raise ExportError(f"scenario export {job_id} is still {status} after an hour")
            await trio.sleep(delay)
            delay = min(delay * 1.5, _POLL_MAX)

    async def _download(
        self,
        blob: RemoteBlob,
        job_id: str,
        number: int,
        jobs: int,
        natives: list[_Native],
        send: Send,
    ) -> list[_Native]:
        stat, tail = await self._storage.tail(blob, zipstream.TAIL)
        directory = zipstream.find_directory(tail, stat.size)
        if directory.length > _DIRECTORY_MAX:
            raise ExportError(f"export {job_id}: a zip directory of {directory.length:,} bytes")
        tail_start = stat.size - len(tail)
        before = max(0, tail_start - directory.offset)  # directory bytes before the tail
        if before:
            listing = await self._read(blob, directory.offset, tail_start, stat.etag)
            listing += tail[: directory.length - before]
        else:
            listing = tail[directory.offset - tail_start :][: directory.length]
        entries = zipstream.parse_directory(listing, directory)
        chosen = await self._match(job_id, entries, natives, send)
        stored: list[_Native] = []

        async def found(entry: zipstream.Entry, data: bytes) -> None:
            native = chosen[entry]
            await self._blocks.put(native.key, data)
            stored.append(native)

        async def rejected(entry: zipstream.Entry, reason: str) -> None:
            await _warn(send, f"export {job_id}: skipped {entry.name}: {reason}")

        start, end = zipstream.span(entries, chosen, directory)
        fetched = len(tail) + before
        await send(
            {"event": "download", "job": number, "jobs": jobs, "total": fetched + end - start}
        )
        await send({"event": "bytes", "count": fetched})
        reader = zipstream.EntryReader(chosen, start, found, rejected)

        async def sink(piece: bytes) -> None:
            await reader(piece)
            await send({"event": "bytes", "count": len(piece)})

        for first in range(start, end, RANGE):
            await self._storage.fetch(blob, first, min(first + RANGE, end), stat.etag, sink)
        for entry in reader.pending:  # the span ended before them: a zip that is not right
            await rejected(entry, "its data is not where the directory says")
        log.info("scenario export %s: stored %d of %d", job_id, len(stored), len(natives))
        return stored

    async def _read(self, blob: RemoteBlob, start: int, end: int, etag: str | None) -> bytes:
        parts: list[bytes] = []

        async def keep(piece: bytes) -> None:
            parts.append(piece)

        await self._storage.fetch(blob, start, end, etag, keep)
        return b"".join(parts)

    async def _match(
        self, job_id: str, entries: list[zipstream.Entry], natives: list[_Native], send: Send
    ) -> dict[zipstream.Entry, _Native]:
        """Each entry whose name is `<asset-id>.<ext>` of an asset asked for, with the asset's
        size; every other entry, and every asset without one, is a warning."""
        wanted = {native.asset_id: native for native in natives}
        chosen: dict[zipstream.Entry, _Native] = {}
        for entry in entries:
            name = entry.name.rpartition("/")[2]
            native = wanted.pop(name.partition(".")[0], None)
            if native is None:
                await _warn(send, f"export {job_id}: skipped {entry.name}: no asset asked for")
            elif entry.size != native.size:
                await _warn(
                    send,
                    f"export {job_id}: skipped {entry.name}: {entry.size:,} bytes,"
                    f" but the asset has {native.size:,}",
                )
            else:
                chosen[entry] = native
        for native in wanted.values():
            await _warn(send, f"export {job_id}: no entry for {native.path}")
        return chosen


def _ids(natives: Iterable[_Native]) -> list[str]:
    return [native.asset_id for native in natives]


async def _files(node: Node) -> list[File]:
    """`node` if it is a file, else every file below it (listing directories as `ls` would)."""
    files: list[File] = []
    stack = [node]
    while stack:
        node = stack.pop()
        if isinstance(node, Directory):
            stack.extend((await node.children()).nodes)
        elif isinstance(node, File):
            files.append(node)
    return files


async def _warn(send: Send, message: str) -> None:
    log.warning("%s", message)
    await send({"event": "warning", "message": message})
