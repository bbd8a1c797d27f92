"""Downloads from storage and CDN hosts: probes, suffix reads and resumable ranged reads, under
the retry policy, through signed URLs and clients that carry no credentials."""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import Awaitable, Callable, Mapping

import httpx
import trio

from fsmount.blob import BlobStat, RemoteBlob
from fsmount.errors import ContentChanged, FetchError
from fsmount.transfer.clients import Clients
from fsmount.transfer.policy import (
    RETRY_STATUSES,
    Attempts,
    HttpPolicy,
    TransferStats,
    error_reason,
    http_date,
    retry_after,
    status_errno,
)
from fsmount.transfer.urls import UrlBook

log = logging.getLogger(__name__)


class Storage:
    """Downloads from storage/CDN hosts through the signed-URL book: probes, suffix reads,
    resumable ranged reads."""

    def __init__(
        self,
        policy: HttpPolicy,
        stats: TransferStats,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._policy = policy
        self._stats = stats
        # No auth, no default headers beyond httpx's own: nothing secret can leak from here.
        self._clients = Clients(policy, follow_redirects=True, transport=transport)
        self._urls = UrlBook()

    async def aclose(self) -> None:
        await self._clients.aclose()

    def forget_url(self, blob: RemoteBlob) -> None:
        self._urls.forget(blob)

    async def probe(self, blob: RemoteBlob) -> BlobStat:
        """Size, time and ETag from a one-byte ranged GET (HEAD is not signed for GET URLs)."""
        result: BlobStat | None = None

        async def handle(response: httpx.Response) -> bool:
            nonlocal result
            if response.status_code == 416:
                result = BlobStat(0, _last_modified(response), _etag(response))
            elif response.status_code == 206:
                total = response.headers.get("Content-Range", "").rpartition("/")[2]
                if not total.isdigit():
                    raise FetchError.eio(f"{blob.description}: no total size in Content-Range")
                result = BlobStat(int(total), _last_modified(response), _etag(response))
            elif response.status_code == 200 and "Content-Length" in response.headers:
                size = int(response.headers["Content-Length"])
                result = BlobStat(size, _last_modified(response), _etag(response))
            else:
                return False
            if response.status_code != 200:
                await response.aread()  # one byte at most: keeps the connection reusable
            return True

        probe_headers = {"Range": "bytes=0-0", "Accept-Encoding": "identity"}
        await self._exchange(blob, probe_headers, handle, "probe")
        assert result is not None
        return result

    async def tail(self, blob: RemoteBlob, length: int) -> tuple[BlobStat, bytes]:
        """The blob's last `length` bytes (all of it when shorter), with its size and ETag,
        from one suffix-range GET: where a zip archive keeps its directory.

        A storage that ignores Range sends the whole object; only its end is kept, so memory
        stays bounded by `length` either way.
        """
        found: tuple[BlobStat, bytes] | None = None

        async def keep_end(response: httpx.Response) -> bool:
            nonlocal found
            if response.status_code not in (200, 206):
                return False
            total = response.headers.get("Content-Range", "").rpartition("/")[2]
            if response.status_code == 206 and not total.isdigit():
                raise FetchError.eio(f"{blob.description}: no total size in Content-Range")
            end, received = bytearray(), 0
            async for chunk in response.aiter_raw():
                self._stats.bytes_fetched += len(chunk)
                received += len(chunk)
                end += chunk
                del end[:-length]
            size = int(total) if response.status_code == 206 else received
            if len(end) != min(length, size):
                raise httpx.RemoteProtocolError("body ended early")
            found = BlobStat(size, _last_modified(response), _etag(response)), bytes(end)
            return True

        suffix = {"Range": f"bytes=-{length}", "Accept-Encoding": "identity"}
        await self._exchange(blob, suffix, keep_end, f"last {length} bytes")
        assert found is not None
        return found

    async def fetch(
        self,
        blob: RemoteBlob,
        start: int,
        end: int | None,
        etag: str | None,
        sink: Callable[[bytes], Awaitable[None]],
        pin: Callable[[str | None], None] | None = None,
    ) -> str | None:
        """Hand bytes `[start, end)` of the blob's version `etag` to `sink`, in order, as the
        body's chunks arrive, resuming after interruptions; return the ETag they came with.

        Every byte handed over is right: the status, range and version of a response are
        checked before its body flows, so a failure later only means the rest is missing.
        With `etag` None, the first response's ETag pins the version for the resumes, so the
        pieces of one range never come from two versions either; `pin` sees that ETag first
        and may raise to refuse it (one file's ranges must agree with each other).

        `end` None means to the end of an object whose size is not known (`whole_fetch`): the
        body ends where the server's framing (Content-Length, chunked) or Content-Range says.
        """
        want = None if end is None else end - start  # bytes to hand over, if known
        got = 0  # bytes of [start, end) handed to `sink`
        pinned = etag

        async def handle(response: httpx.Response) -> bool:
            nonlocal got, pinned
            if response.status_code not in (200, 206):
                return False
            if pinned is None:
                pinned = _etag(response)
                if pin is not None:
                    pin(pinned)
            elif _etag(response) != pinned:
                raise ContentChanged(
                    errno.EIO, f"{blob.description}: the remote file changed while being read"
                )
            if response.status_code == 206:
                first = response.headers.get("Content-Range", "").removeprefix("bytes ")
                if not first.startswith(f"{start + got}-"):
                    raise FetchError.eio(f"{blob.description}: storage sent another range")
                to = first.partition("-")[2].partition("/")[0]
                ends = int(to) + 1 if to.isdigit() else start  # where this body must end
                skip = 0
            else:  # 200: Range ignored, skip to where we are
                ends = start
                skip = start + got
            async for chunk in response.aiter_raw():
                self._stats.bytes_fetched += len(chunk)
                if skip:
                    cut = min(skip, len(chunk))
                    chunk, skip = chunk[cut:], skip - cut
                if want is not None and len(chunk) > want - got:
                    chunk = chunk[: want - got]
                if chunk:
                    got += len(chunk)
                    await sink(chunk)
                # A 206 body is read to its end so the connection can be reused; a whole
                # object (Range ignored) is abandoned once we have our part.
                if want is not None and got >= want and response.status_code == 200:
                    break
            if got < (want if want is not None else ends - start):
                raise httpx.RemoteProtocolError("body ended early")
            return True

        def headers() -> dict[str, str]:
            until = "" if end is None else end - 1
            h = {"Range": f"bytes={start + got}-{until}", "Accept-Encoding": "identity"}
            if pinned:
                h["If-Range"] = pinned
            return h

        if end is not None and end <= start:
            return etag
        what = f"bytes {start}-{'' if end is None else end - 1}"
        await self._exchange(blob, headers, handle, what, (lambda: got) if end is None else None)
        return pinned

    async def _exchange(
        self,
        blob: RemoteBlob,
        headers: Mapping[str, str] | Callable[[], Mapping[str, str]],
        handle: Callable[[httpx.Response], Awaitable[bool]],
        what: str,
        progress: Callable[[], int] | None = None,
    ) -> None:
        """One storage GET with the full policy: retries, resume, 403 → new URL once.

        With `progress` (bytes handed over so far), the body is of unknown length: once its
        headers are in, only a stall ends it, and an attempt that brought bytes renews the
        retry budget (a large object must not fail for taking longer than the deadline).
        """
        attempts = Attempts(self._policy, f"{blob.description} {what}", self._stats)
        refreshed = False
        fresh = False
        delivered = 0
        while True:
            signed = await self._urls.signed(blob, fresh=fresh)
            fresh = False
            h = headers() if callable(headers) else headers
            try:
                with trio.fail_after(max(attempts.remaining(), 0.001)) as scope:
                    self._stats.requests += 1
                    client = self._clients.pick(blob.key)
                    async with client.stream(
                        signed.method, signed.url, headers={**signed.headers, **h}
                    ) as response:
                        if progress is not None:
                            scope.deadline = math.inf
                        self._stats.by_status[response.status_code] += 1
                        if await handle(response):
                            return
                        status = response.status_code
                        await response.aread()
                        reason = error_reason(response)
                        wait = retry_after(response)
            except (httpx.TransportError, trio.TooSlowError) as exc:
                if progress is not None and progress() > delivered:
                    delivered = progress()
                    attempts.restart()
                await attempts.backoff(f"{type(exc).__name__} from storage", errno.ETIMEDOUT)
                continue
            if status in (400, 401, 403) and not refreshed:
                refreshed = fresh = True  # expired or otherwise refused signature: ask again
                if signed.refused is not None:
                    signed.refused()
                log.info("%s: storage answered %d; asking for a new URL", blob.description, status)
                continue
            if status in RETRY_STATUSES:
                await attempts.backoff(f"storage HTTP {status}", status_errno(status), wait)
                continue
            self._stats.errors += 1
            raise FetchError(
                status_errno(status), f"{blob.description}: storage HTTP {status} {reason}"
            )


def _etag(response: httpx.Response) -> str | None:
    return response.headers.get("ETag")


def _last_modified(response: httpx.Response) -> float:
    when = http_date(response.headers.get("Last-Modified", ""))
    return 0.0 if when is None else when
