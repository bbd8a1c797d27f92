"""The one HTTP layer: API clients, storage/CDN downloads, retries, deadlines, signed URLs.

Policy, in one place:
- every operation has an overall deadline; retries (connection errors, timeouts, 408, 429,
  5xx) back off exponentially with jitter inside it, honouring `Retry-After` and Scenario's
  `remainingSeconds`; other 4xx are final;
- a stall (no byte for `stall_timeout`) is a timeout, hence retried;
- an interrupted body resumes from the last byte received, with `If-Range` so versions never mix;
- signed URLs are reused for every range until shortly before they expire, and asked for again
  once when storage answers 403; a request signed in its headers (SigV4) is sent with exactly
  its method, URL and headers, plus only the unsigned Range ones;
- a body of unknown length (`fetch` to the end) is bounded by stalls, not by the deadline, and
  every byte it brought renews the retry budget;
- storage and CDN requests go through a client that has no credentials at all, so the API's
  `Authorization` can never reach them; URLs are logged without their query strings.
"""

from __future__ import annotations

import base64
import calendar
import dataclasses
import email.utils
import errno
import itertools
import json
import logging
import math
import os
import random
import re
import ssl
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import httpcore
import httpx
import orjson
import trio
from cachetools import TLRUCache

from fsmount.blob import BlobStat, RemoteBlob, SignedUrl
from fsmount.errors import ContentChanged, FetchError

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 507})
REDIRECTS = frozenset({301, 302, 303, 307, 308})
DEFAULT_URL_TTL = 60.0
_POOL_SHARDS = 4  # httpx clients per service and for storage (see _Clients)
_URL_BOOK_SIZE = 100_000  # signed URLs remembered at once (a URL is a few hundred bytes)

_READ_CEILING = 1 << 20  # bytes one socket read may hand over (see raise_read_size)


def raise_read_size() -> None:
    """Let one socket read hand over whatever has arrived, up to 1 MiB (httpcore: 64 KiB).

    Each read costs a trip through h11, httpcore and httpx in Python, which was a large share
    of the mount's CPU on a fast sequential read; recv never waits to fill the ceiling, so a
    4 MiB range takes a few reads instead of sixty-four. httpcore has no setting for it, only
    the class attribute changed here: a version without it is a warning at mount, never a
    silent slowdown (and tests/unit/test_transfer_policy.py fails on it).
    """
    connection = httpcore.AsyncHTTP11Connection
    if isinstance(getattr(connection, "READ_NUM_BYTES", None), int):
        connection.READ_NUM_BYTES = _READ_CEILING
    else:
        log.warning(
            "httpcore %s has no AsyncHTTP11Connection.READ_NUM_BYTES: downloads read 64 KiB at"
            " a time and cost more CPU (see fsmount/transfer.py)",
            httpcore.__version__,
        )


@dataclass(frozen=True)
class HttpPolicy:
    """Timeouts and retry budget; one instance per mount, from the configuration."""

    deadline: float = 60.0  # a whole operation (with its retries) never takes longer
    connect_timeout: float = 10.0
    stall_timeout: float = 20.0  # no byte received for this long counts as a failure
    base_delay: float = 0.25
    max_delay: float = 10.0
    max_connections: int = 32

    @classmethod
    def within(cls, deadline: float) -> HttpPolicy:
        """The policy for an overall deadline (`--timeout`): a stall or a connection attempt
        may use up a third of it at most, so that at least one retry always fits."""
        return cls(
            deadline=deadline,
            connect_timeout=min(cls.connect_timeout, max(0.5, deadline / 3)),
            stall_timeout=min(cls.stall_timeout, max(0.5, deadline / 3)),
        )


@dataclass
class TransferStats:
    """Counters for `fsmount status`; plain ints bumped inline (one thread)."""

    requests: int = 0
    retries: int = 0
    bytes_fetched: int = 0
    url_resolves: int = 0
    errors: int = 0
    by_status: Counter[int] = dataclasses.field(default_factory=Counter)


def tls_context() -> ssl.SSLContext:
    """The system trust store, or the CA bundle `SSL_CERT_FILE` names (as curl and git do)."""
    return ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE") or None)


def redact(url: str) -> str:
    """A URL fit for logs: no query string (signatures) and no userinfo."""
    parts = urlsplit(str(url))
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def url_expiry(url: str, now: float | None = None) -> float:
    """When a signed URL stops working: `Expires=` (canned), or a CloudFront custom `Policy`."""
    now = time.time() if now is None else now
    query = parse_qs(urlsplit(url).query)
    try:
        if "Expires" in query:
            return float(query["Expires"][0])
        if "X-Amz-Expires" in query and "X-Amz-Date" in query:
            start = calendar.timegm(time.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ"))
            return start + float(query["X-Amz-Expires"][0])
        if "Policy" in query:
            raw = query["Policy"][0].replace("-", "+").replace("_", "=").replace("~", "/")
            policy = json.loads(base64.b64decode(raw + "=" * (-len(raw) % 4)))
            condition = policy["Statement"][0]["Condition"]["DateLessThan"]
            return float(condition["AWS:EpochTime"])
    except (ValueError, KeyError, IndexError, TypeError):
        log.warning("cannot read the expiry of signed URL %s", redact(url))
    return now + DEFAULT_URL_TTL


def status_errno(status: int) -> int:
    """Errno a reader sees for a final HTTP status (never ENOENT for a transient error)."""
    if status == 404 or status == 410:
        return errno.ENOENT
    if status in (401, 403):
        return errno.EACCES
    if status == 429:
        return errno.EAGAIN
    return errno.EIO


def _http_date(value: str) -> float | None:
    """An HTTP date as seconds since the epoch, or None when it is not one.

    Every form HTTP allows means GMT, the asctime form too, though it writes no zone: the
    zone-less result of `email.utils` must not be read as local time.
    """
    try:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        return float(calendar.timegm((*parsed[:6], 0, 0, 0)) - (parsed[9] or 0))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds the server asked us to wait (`Retry-After`, or a `remainingSeconds` body).

    Anything else than a finite number of seconds or an HTTP date is no hint: the caller
    backs off as usual rather than failing a read over a header.
    """
    wait: float | None = None
    value = response.headers.get("Retry-After")
    if value:
        try:
            wait = float(value)
        except ValueError:
            when = _http_date(value)
            wait = None if when is None else when - time.time()
    elif response.headers.get("Content-Type", "").startswith("application/json"):
        try:
            body = response.json()
        except ValueError:
            return None
        seconds = body.get("remainingSeconds") if isinstance(body, dict) else None
        if isinstance(seconds, int | float) and not isinstance(seconds, bool):
            wait = float(seconds)
    if wait is None or not math.isfinite(wait):
        return None
    return max(0.0, wait)


class _Attempts:
    """Backoff bookkeeping for one operation: decides whether another try fits the deadline."""

    def __init__(self, policy: HttpPolicy, what: str, stats: TransferStats) -> None:
        self.policy = policy
        self.what = what
        self.stats = stats
        self.started = time.monotonic()
        self.count = 0

    def restart(self) -> None:
        """The operation made progress: its budget (time and backoff) starts again."""
        self.started = time.monotonic()
        self.count = 0

    def remaining(self) -> float:
        return self.policy.deadline - (time.monotonic() - self.started)

    async def backoff(self, reason: str, err: int, wait: float | None = None) -> None:
        """Sleep before the next try, or raise FetchError(err) when the budget is spent."""
        self.count += 1
        delay = min(self.policy.max_delay, self.policy.base_delay * 2 ** (self.count - 1))
        delay *= 1 - 0.25 * random.random()
        if wait is not None:
            delay = max(delay, wait)
        if delay >= self.remaining():
            self.stats.errors += 1
            raise FetchError(err, f"{self.what}: {reason}; giving up after {self.count} tries")
        self.stats.retries += 1
        log.debug("%s: %s; retry %d in %.2fs", self.what, reason, self.count, delay)
        await trio.sleep(delay)


class Credentials:
    """The API's auth header, re-read from its source once after a 401 (token rotation)."""

    def __init__(self, load: Callable[[], dict[str, str]]) -> None:
        self._load = load
        self._headers = load()

    def headers(self) -> dict[str, str]:
        return dict(self._headers)

    def reload(self) -> bool:
        """Re-read the secret; True when it changed (so one more try makes sense)."""
        fresh = self._load()
        changed = fresh != self._headers
        self._headers = fresh
        return changed


class _Clients:
    """A few httpx clients sharing a connection budget, one picked per request.

    httpcore's pool does work proportional to the square of its connections on every request
    it queues or releases; at 32 connections that was most of the mount's CPU while listing a
    directory of 10,000 files (two requests per size). Four pools of eight keep the same
    parallelism at a sixteenth of that cost.
    """

    def __init__(self, policy: HttpPolicy, **options: Any) -> None:
        shards = min(_POOL_SHARDS, policy.max_connections)
        per_shard = max(1, policy.max_connections // shards)
        tls = tls_context()  # the trust store is read once, not once per client
        self._clients = [
            httpx.AsyncClient(
                timeout=httpx.Timeout(policy.stall_timeout, connect=policy.connect_timeout),
                limits=httpx.Limits(max_connections=per_shard, max_keepalive_connections=per_shard),
                verify=tls,
                **options,
            )
            for _ in range(shards)
        ]
        self._turn = itertools.cycle(self._clients)

    def pick(self, key: str | None = None) -> httpx.AsyncClient:
        """The client for `key` (one object's requests share connections), or the next one."""
        if key is None:
            return next(self._turn)
        return self._clients[zlib.crc32(key.encode("utf-8", "surrogatepass")) % len(self._clients)]

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()


class ApiClient:
    """JSON requests to one service's API, with its credentials and the retry policy."""

    def __init__(
        self,
        base_url: str,
        credentials: Credentials,
        policy: HttpPolicy,
        stats: TransferStats,
        *,
        name: str,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url
        self.name = name
        self._credentials = credentials
        self._policy = policy
        self._stats = stats
        self._clients = _Clients(
            policy,
            base_url=base_url,
            headers={"Accept": "application/json"},
            follow_redirects=False,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._clients.aclose()

    async def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        ok: Callable[[httpx.Response], bool] = lambda r: r.is_success,
        deadline: float | None = None,
    ) -> httpx.Response:
        """Send with retries; return the first response `ok` accepts, else raise FetchError.

        `deadline` shortens the policy's budget (start-up checks must fail within seconds).
        """
        policy = self._policy
        if deadline is not None:
            policy = dataclasses.replace(policy, deadline=min(deadline, policy.deadline))
        attempts = _Attempts(policy, f"{self.name} {method} {redact(url)}", self._stats)
        reloaded = False
        while True:
            try:
                with trio.fail_after(max(attempts.remaining(), 0.001)):
                    self._stats.requests += 1
                    response = await self._clients.pick().request(
                        method,
                        url,
                        params=params,
                        json=json_body,
                        headers=self._credentials.headers(),
                    )
                    self._stats.by_status[response.status_code] += 1
            except (httpx.TransportError, trio.TooSlowError) as exc:
                await attempts.backoff(type(exc).__name__, errno.ETIMEDOUT)
                continue
            if ok(response):
                return response
            if response.status_code == 401 and not reloaded:
                reloaded = True
                if self._credentials.reload():
                    log.info("%s: credentials were rejected; re-read them, trying again", self.name)
                    continue
            if response.status_code in RETRY_STATUSES:
                err = errno.EAGAIN if response.status_code == 429 else errno.EIO
                await attempts.backoff(f"HTTP {response.status_code}", err, _retry_after(response))
                continue
            self._stats.errors += 1
            raise FetchError(
                status_errno(response.status_code),
                f"{self.name} {method} {redact(url)}: HTTP {response.status_code}"
                f" {_error_reason(response)}",
            )

    async def get_json(
        self, url: str, params: Mapping[str, Any] | None = None, *, deadline: float | None = None
    ) -> Any:
        return parse_json(
            (await self.request("GET", url, params=params, deadline=deadline)).content
        )

    async def post_json(self, url: str, body: Any, params: Mapping[str, Any] | None = None) -> Any:
        return (await self.request("POST", url, params=params, json_body=body)).json()

    async def redirect_target(self, url: str) -> str:
        """Follow one redirect by hand (Grand Challenge `/media/`): the signed storage URL."""
        response = await self.request("GET", url, ok=lambda r: r.status_code in REDIRECTS)
        self._stats.url_resolves += 1
        return str(response.url.join(response.headers["Location"]))


def parse_json(body: bytes) -> Any:
    """JSON with orjson, a few times faster than the standard parser on the megabyte pages
    of a large listing, giving the same objects; the standard parser takes bodies with a run
    of 19 digits or more (orjson turns integers past 64 bits, which a JSON value may hold, into
    floats) and what orjson refuses (NaN, lone surrogates)."""
    if _LONG_NUMBER.search(body) is None:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    return json.loads(body)


_LONG_NUMBER = re.compile(rb"[0-9]{19}")


def _error_reason(response: httpx.Response) -> str:
    """A short, secret-free reason from an error body (`detail`, `reason`, `message`)."""
    try:
        body = response.json()
    except ValueError:
        return ""
    if isinstance(body, dict):
        for field in ("detail", "reason", "message", "error"):
            if isinstance(body.get(field), str):
                return f"({body[field][:200]})"
    return ""


class Storage:
    """Downloads from storage/CDN hosts: signed-URL book, probes, resumable ranged reads."""

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
        self._clients = _Clients(policy, follow_redirects=True, transport=transport)
        # blob key -> (signed URL, reuse until); expired ones drop out, the book stays bounded
        self._urls: TLRUCache[str, tuple[SignedUrl, float]] = TLRUCache(
            maxsize=_URL_BOOK_SIZE, ttu=lambda _key, value, _now: value[1], timer=time.time
        )
        self._resolving: dict[str, trio.Event] = {}

    async def aclose(self) -> None:
        await self._clients.aclose()

    async def signed(self, blob: RemoteBlob, *, fresh: bool = False) -> SignedUrl:
        """The blob's signed URL, resolved at most once at a time and reused until near expiry."""
        while True:
            current = self._urls.get(blob.key)
            if current is not None and not fresh and time.time() < current[1]:
                return current[0]
            pending = self._resolving.get(blob.key)
            if pending is None:
                break
            await pending.wait()
            fresh = False  # somebody just resolved it for us
        done = self._resolving[blob.key] = trio.Event()
        try:
            signed = await blob.resolve()
            self._urls[blob.key] = (signed, _reuse_until(signed))
            return signed
        finally:
            del self._resolving[blob.key]
            done.set()

    def forget_url(self, blob: RemoteBlob) -> None:
        self._urls.pop(blob.key, None)

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
        attempts = _Attempts(self._policy, f"{blob.description} {what}", self._stats)
        refreshed = False
        fresh = False
        delivered = 0
        while True:
            signed = await self.signed(blob, fresh=fresh)
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
                        reason = _error_reason(response)
                        wait = _retry_after(response)
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


def _reuse_until(signed: SignedUrl) -> float:
    """Stop using a URL shortly before it expires: a fifth of its life early, at most 30 s."""
    now = time.time()
    return signed.expires_at - min(30.0, max(0.0, signed.expires_at - now) / 5)


def _etag(response: httpx.Response) -> str | None:
    return response.headers.get("ETag")


def _last_modified(response: httpx.Response) -> float:
    when = _http_date(response.headers.get("Last-Modified", ""))
    return 0.0 if when is None else when
