"""HTTP plumbing shared by the fake services: request log, ranged responses, signed URLs, servers.

The fakes are real HTTP servers on loopback so that clients are exercised through sockets, TLS
and redirects exactly as in production. Everything here is service-neutral: the Grand Challenge
and Scenario fakes both build on it, and fault injection wraps their ASGI apps from outside
(`FaultInjector`), so the apps themselves stay faithful and simple.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import json
import logging
import queue
import random
import re
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qsl, unquote, urlsplit

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CHUNK_SIZE = 1 << 20


# --------------------------------------------------------------------------- request log


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it; header names are lower-case."""

    kind: str
    method: str
    url: str  # path and query, as sent
    headers: dict[str, str]
    time: float


class RequestLog:
    """Counts requests per kind and keeps the most recent ones, for tests to assert on.

    Counters are exact and never trimmed; the entry list is bounded so that a benchmark serving
    millions of requests does not grow without limit. Thread-safe: servers record from their own
    threads while tests read from the main one.

    Besides counts, it can tell how many requests of a kind were being served at once (an app
    wraps its work in `in_flight(kind)`; `peak_in_flight(kind)` is the most at one time) and
    how many records a listing handed out (`add_records` / `records`), kept apart from the
    request counts.
    """

    def __init__(self, maxlen: int = 20_000) -> None:
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()
        self._entries: collections.deque[RecordedRequest] = collections.deque(maxlen=maxlen)
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._peaks: collections.Counter[str] = collections.Counter()
        self._records: collections.Counter[str] = collections.Counter()

    def record(self, kind: str, request: Request) -> None:
        """Count `request` under `kind` and remember its method, target and headers."""
        target = request.url.path
        if request.url.query:
            target += "?" + request.url.query
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        entry = RecordedRequest(kind, request.method, target, headers, time.time())
        with self._lock:
            self._counts[kind] += 1
            self._entries.append(entry)

    @contextlib.contextmanager
    def in_flight(self, kind: str) -> Iterator[None]:
        """Mark a request of `kind` as being served for the duration of the block."""
        with self._lock:
            self._in_flight[kind] += 1
            self._peaks[kind] = max(self._peaks[kind], self._in_flight[kind])
        try:
            yield
        finally:
            with self._lock:
                self._in_flight[kind] -= 1

    def peak_in_flight(self, kind: str) -> int:
        """The most requests of `kind` served at one time since the last `reset`."""
        with self._lock:
            return self._peaks[kind]

    def add_records(self, kind: str, number: int = 1) -> None:
        """Count `number` records (rows of a listing page, say) handed out under `kind`."""
        with self._lock:
            self._records[kind] += number

    def records(self, kind: str) -> int:
        with self._lock:
            return self._records[kind]

    def count(self, kind: str) -> int:
        with self._lock:
            return self._counts[kind]

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def entries(self, kind: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            return [e for e in self._entries if kind is None or e.kind == kind]

    def reset(self) -> None:
        """Forget counts, entries and records; peaks start again from what is in flight now."""
        with self._lock:
            self._counts.clear()
            self._entries.clear()
            self._records.clear()
            self._peaks = +self._in_flight


# --------------------------------------------------------------------------- JSON


def json_response(
    payload: object, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """A DRF-style JSON response: compact, UTF-8 unescaped, `application/json` with no charset.

    The missing charset matters: gcapi parses a body only when the Content-Type is exactly
    `application/json`.
    """
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return Response(body, status_code, headers=headers, media_type="application/json")


# --------------------------------------------------------------------------- ranged bodies


def parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """Return `(start, end_inclusive)`, None to ignore the header, or "unsatisfiable".

    Like S3, a header that is malformed or asks for several ranges is ignored (full 200).
    """
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":  # suffix range: the last N bytes
        length = int(last)
        if length == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - length), size - 1
    start = int(first)
    if last != "" and int(last) < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, size - 1 if last == "" else min(int(last), size - 1)


def _if_range_holds(if_range: str, etag: str, last_modified: float) -> bool:
    value = if_range.strip()
    if value.startswith(('"', "W/")):
        return value == etag  # strong comparison: a weak tag never matches
    try:
        return int(parsedate_to_datetime(value).timestamp()) == int(last_modified)
    except (TypeError, ValueError):
        return False


def range_response(
    request: Request,
    *,
    size: int,
    read: Callable[[int, int], bytes],
    etag: str,
    last_modified: float,
    content_type: str,
) -> Response:
    """Answer a GET or HEAD for an object as S3/CloudFront do, honouring `Range` and `If-Range`.

    `read(offset, length)` is called for at most `CHUNK_SIZE` bytes at a time, so objects of
    several GiB are streamed without ever being held whole. `etag` is the opaque tag without
    quotes.
    """
    quoted = f'"{etag}"'
    headers = {
        "accept-ranges": "bytes",
        "etag": quoted,
        "last-modified": formatdate(last_modified, usegmt=True),
        "content-type": content_type,
    }
    wanted = None
    if "range" in request.headers and _if_range_holds(
        request.headers.get("if-range", quoted), quoted, last_modified
    ):
        wanted = parse_range(request.headers["range"], size)
    if wanted == "unsatisfiable":
        headers["content-range"] = f"bytes */{size}"
        headers["content-type"] = "application/xml"
        body = b"<Error><Code>InvalidRange</Code><Message>The requested range is not satisfiable</Message></Error>"  # noqa: E501
        return Response(body, 416, headers=headers)
    status, start, end = 200, 0, size - 1
    if isinstance(wanted, tuple):
        status, (start, end) = 206, wanted
        headers["content-range"] = f"bytes {start}-{end}/{size}"
    length = end - start + 1
    headers["content-length"] = str(length)
    if request.method == "HEAD" or length == 0:
        return Response(b"", status, headers=headers)

    async def chunks() -> AsyncIterator[bytes]:
        offset = start
        while offset <= end:
            take = min(CHUNK_SIZE, end + 1 - offset)
            yield read(offset, take)
            offset += take
            await trio.lowlevel.checkpoint()

    return StreamingResponse(chunks(), status, headers=headers)


# --------------------------------------------------------------------------- signed URLs


def _cf_b64(data: bytes) -> str:
    """CloudFront's URL-safe base64 alphabet (`+=/` become `-_~`)."""
    return base64.b64encode(data).decode().translate(str.maketrans("+=/", "-_~"))


def _cf_unb64(text: str) -> bytes:
    return base64.b64decode(text.translate(str.maketrans("-_~", "+=/")), validate=True)


_SIGNATURE_PARAMS = ("Expires", "Policy", "Signature", "Key-Pair-Id")


def _split_signature(url: str) -> tuple[str, dict[str, str]]:
    """Split a URL into its path+query without signature parameters, and those parameters.

    The scheme and host are dropped on purpose: the fakes listen on loopback ports, and a proxy
    or a `localhost`/`127.0.0.1` spelling must not turn a valid signature into a bad one. The
    path is unquoted because servers see it decoded while signers may be given it encoded.
    """
    parts = urlsplit(url)
    kept, params = [], {}
    for piece in parts.query.split("&") if parts.query else []:
        name = piece.split("=", 1)[0]
        if name in _SIGNATURE_PARAMS:
            params[name] = dict(parse_qsl(piece, keep_blank_values=True)).get(name, "")
        else:
            kept.append(piece)
    return unquote(parts.path) + ("?" + "&".join(kept) if kept else ""), params


def _policy(resource: str, expires: int) -> bytes:
    statement = {"Resource": resource, "Condition": {"DateLessThan": {"AWS:EpochTime": expires}}}
    return json.dumps({"Statement": [statement]}, separators=(",", ":")).encode()


def _resource_matches(pattern: str, target: str) -> bool:
    regex = ".*".join(re.escape(piece) for piece in pattern.split("*"))
    return re.fullmatch(regex, target) is not None


class UrlSigner:
    """Signs URLs the way CloudFront does, and checks them the way a CDN edge would.

    Two styles: GC's canned policy (`Expires`, `Signature`, `Key-Pair-Id`) and Scenario's custom
    policy (`Policy`, `Signature`, `Key-Pair-Id`, resource may end in `*` so that parameters can
    be appended after signing). An HMAC stands in for CloudFront's RSA: tests need tampering and
    expiry to be detected, not public-key cryptography.
    """

    def __init__(
        self, secret: bytes, key_pair_id: str, clock: Callable[[], float] = time.time
    ) -> None:
        self._secret = secret
        self.key_pair_id = key_pair_id
        self._clock = clock

    def _sign(self, policy: bytes) -> str:
        return _cf_b64(hmac.new(self._secret, policy, hashlib.sha256).digest())

    def canned(self, url: str, expires_at: float) -> str:
        """Return `url` with canned-policy parameters, valid until `expires_at` (epoch s)."""
        expires = int(expires_at)
        resource, _ = _split_signature(url)
        signature = self._sign(_policy(resource, expires))
        sep = "&" if urlsplit(url).query else "?"
        return f"{url}{sep}Expires={expires}&Signature={signature}&Key-Pair-Id={self.key_pair_id}"

    def custom(self, url: str, expires_at: float, *, wildcard: bool = True) -> str:
        """Return `url` with a custom policy; `wildcard` lets callers append parameters later."""
        policy = _policy(_split_signature(url)[0] + ("*" if wildcard else ""), int(expires_at))
        sep = "&" if urlsplit(url).query else "?"
        return (
            f"{url}{sep}Policy={_cf_b64(policy)}&Signature={self._sign(policy)}"
            f"&Key-Pair-Id={self.key_pair_id}"
        )

    def verify(self, url: str) -> str | None:
        """Return None when `url` carries a valid, unexpired signature, else why it does not.

        The reasons are "missing", "invalid" (tampered, wrong key) and "expired".
        """
        resource, params = _split_signature(url)
        if "Signature" not in params or "Key-Pair-Id" not in params:
            return "missing"
        if params["Key-Pair-Id"] != self.key_pair_id:
            return "invalid"
        try:
            if "Policy" in params:
                policy = _cf_unb64(params["Policy"])
                statement = json.loads(policy)["Statement"][0]
                pattern = statement["Resource"]
                expires = int(statement["Condition"]["DateLessThan"]["AWS:EpochTime"])
            elif "Expires" in params:
                expires = int(params["Expires"])
                pattern = resource
                policy = _policy(resource, expires)
            else:
                return "missing"
        except (ValueError, KeyError, IndexError, TypeError):
            return "invalid"
        if not hmac.compare_digest(self._sign(policy), params["Signature"]):
            return "invalid"
        if not _resource_matches(pattern, resource):
            return "invalid"
        if self._clock() >= expires:
            return "expired"
        return None


def access_denied(reason: str) -> Response:
    """CloudFront's answer to a missing, tampered or expired signature."""
    body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code><Message>Access denied ({reason})</Message></Error>"  # noqa: E501
    return Response(body.encode(), 403, media_type="application/xml")


# --------------------------------------------------------------------------- servers


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA and a server certificate it signed, as PEM files."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def make_tls(directory: Path) -> TlsFiles:
    """Create a CA and a certificate for 127.0.0.1 and localhost in `directory`.

    The official Grand Challenge client refuses plain http, so the conformance tests point
    `SSL_CERT_FILE` at `ca_file`.
    """
    import trustme  # a test extra: only TLS demos and the conformance tests need it

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="fsmount demo CA")
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    ca.cert_pem.write_to_path(str(files.ca_file))
    leaf.private_key_pem.write_to_path(str(files.key_file))
    with open(files.cert_file, "wb") as out:
        for blob in leaf.cert_chain_pems:
            out.write(blob.bytes())
    return files


@dataclass
class RunningServer:
    """A server started by `start_server`; `url` has no trailing slash.

    `refuse()` takes it down for a while, as a crashed backend is: connections to its port are
    refused (the port stays reserved), until `resume()` serves the same app there again.
    """

    url: str
    _thread: threading.Thread
    _token: trio.lowlevel.TrioToken
    _shutdown: trio.Event
    _stopped: bool = field(default=False)
    _app: ASGIApp | None = field(default=None, repr=False)
    _tls: TlsFiles | None = field(default=None, repr=False)
    _placeholder: socket.socket | None = field(default=None, repr=False)

    @property
    def refusing(self) -> bool:
        return self._placeholder is not None

    def stop(self) -> None:
        """Shut down (idempotent) and wait for the server thread to end."""
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(self._shutdown.set, trio_token=self._token)
        self._thread.join(timeout=10)

    def refuse(self) -> None:
        """Stop serving and refuse connections (RST), keeping the port, until `resume()`.

        A socket bound to the port but not listening holds it: the kernel answers SYNs with a
        reset, and no other socket can take the port meanwhile.
        """
        if self._placeholder is not None or self._stopped:
            return
        port = urlsplit(self.url).port
        self.stop()
        holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", port))
        self._placeholder = holder

    def resume(self) -> None:
        """Serve again on the same port after `refuse()` (a no-op when not refusing)."""
        if self._placeholder is None:
            return
        assert self._app is not None
        port = urlsplit(self.url).port
        self._placeholder.close()
        self._placeholder = None
        fresh = start_server(self._app, tls=self._tls, port=port)
        self._thread, self._token, self._shutdown = fresh._thread, fresh._token, fresh._shutdown
        self._stopped = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _without_lifespan(app: ASGIApp) -> ASGIApp:
    """Acknowledge lifespan events here, so a bare ASGI callable need not speak that protocol.

    The fakes have no startup or shutdown work; hypercorn fails to start an app that simply
    returns on a lifespan scope.
    """

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    return wrapped


class InjectedCut(Exception):
    """Raised after a partial body to make the server drop the connection mid-response."""


class _NotInjected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], InjectedCut))


@functools.cache
def _server_log() -> logging.Logger:
    """hypercorn's error log, minus the tracebacks of connections cut on purpose."""
    log = logging.getLogger("fsmount.demo.server")
    log.setLevel(logging.WARNING)
    log.propagate = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s fake server %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.addFilter(_NotInjected())
    return log


def start_server(app: ASGIApp, *, tls: TlsFiles | None = None, port: int = 0) -> RunningServer:
    """Serve `app` with hypercorn under trio in a daemon thread on 127.0.0.1, on `port` (by
    default a free one).

    Returns once the socket is listening, so callers never poll for readiness. The app's own
    lifespan handlers are not run (see `_without_lifespan`).
    """
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.loglevel = "WARNING"
    config.errorlog = _server_log()
    config.graceful_timeout = 1.0
    config.keep_alive_max_requests = 1_000_000
    if tls is not None:
        config.certfile = str(tls.cert_file)
        config.keyfile = str(tls.key_file)
    ready: queue.Queue[tuple[str, trio.lowlevel.TrioToken, trio.Event] | BaseException]
    ready = queue.Queue()

    async def main() -> None:
        shutdown = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                run = functools.partial(serve, _without_lifespan(app), config)
                binds = await nursery.start(functools.partial(run, shutdown_trigger=shutdown.wait))
                ready.put((binds[0], trio.lowlevel.current_trio_token(), shutdown))
        except BaseException as error:
            ready.put(error)
            raise

    thread = threading.Thread(target=trio.run, args=(main,), name="fake-server", daemon=True)
    thread.start()
    started = ready.get(timeout=30)
    if isinstance(started, BaseException):
        raise RuntimeError("fake server failed to start") from started
    url, token, shutdown = started
    return RunningServer(url, thread, token, shutdown, _app=app, _tls=tls)


# --------------------------------------------------------------------------- fault injection


@dataclass
class Faults:
    """What a `FaultInjector` does to the requests whose path matches `path_pattern`.

    Rates are probabilities per request, drawn from the injector's seeded generator, so a
    sequential test sees the same faults on every run. `scripted` and `fail_next` are the exact
    forms, considered before any rate: the next matching requests get the `scripted` answers,
    one each and in order (`(status, Retry-After or None)`), then the next `fail_next` ones fail
    with `error_statuses[0]`; `cut_next` cuts the bodies of the next ones. A Retry-After is
    seconds, or any text (a malformed header).

    A full outage with connections refused is not an ASGI matter: see `RunningServer.refuse`
    and `FakeService.refusing_connections`.
    """

    path_pattern: str = ""  # regex searched in the request path; "" matches everything
    latency: float = 0.0  # seconds before the answer starts (a stall before the headers)
    outage: bool = False  # every request gets 503, as from a load balancer with no backend
    scripted: tuple[tuple[int, int | str | None], ...] = ()
    fail_next: int = 0
    error_rate: float = 0.0
    error_statuses: tuple[int, ...] = (429, 502, 503, 504)
    retry_after: int | str | None = 1  # sent with 429 and 503 errors; None: no header
    # Scenario's cooldown form: 429 bodies are `{"reason", "remainingSeconds"}` (None: GC-style
    # `{"detail"}` bodies, no `remainingSeconds`)
    remaining_seconds: float | None = None
    cut_rate: float = 0.0  # the body stops half-way and the connection drops
    cut_next: int = 0  # the next N matching requests are cut (the exact form of cut_rate)
    stall_rate: float = 0.0  # the body stops half-way for `stall_seconds`, then drops
    stall_seconds: float = 3600.0
    etag_generation: int = 0  # > 0: objects look replaced (new ETag and Last-Modified)


@dataclass(frozen=True)
class InjectedFault:
    """One fault as done to one request, for tests that check how a client reacted to it.

    `kind` is "outage", "error", "cut" or "stall" (added latency alone is only counted);
    `delivered` is how many body bytes went out before a cut or stall dropped the connection.
    """

    time: float  # time.time() when the answer was sent, or when the body stopped
    kind: str
    method: str
    path: str
    headers: dict[str, str]  # the request's, names lower-case
    status: int | None = None
    delivered: int | None = None


@dataclass(frozen=True)
class _Plan:
    latency: float
    fault: str | None  # "outage" or "error" when `status` is set
    status: int | None
    retry_after: int | str | None
    remaining_seconds: float | None
    interrupt: str | None  # "cut" or "stall"
    stall_seconds: float
    generation: int


_GENERATION_SECONDS = 86_400


def _etag_for(etag: bytes, generation: int) -> bytes:
    return etag[:-1] + b"-g%d" % generation + b'"' if generation else etag


def _if_range_for_app(value: str, generation: int) -> str:
    """Map a validator of the current generation back to the app's; others never match."""
    never = '"superseded"'
    if value.startswith(('"', "W/")):
        suffix = f'-g{generation}"'
        return value.removesuffix(suffix) + '"' if value.endswith(suffix) else never
    try:
        when = parsedate_to_datetime(value).timestamp() - generation * _GENERATION_SECONDS
    except (TypeError, ValueError):
        return never
    return formatdate(when, usegmt=True)


class FaultInjector:
    """ASGI middleware that makes a fake misbehave on demand: latency, errors, cuts, outages.

    It wraps a fake's app from outside, so the fakes stay faithful and every fault is available
    to every service. Knobs are set with `configure(...)` from any thread and read once per
    request. Faulted requests may never reach the app (and so its `RequestLog`); `injected`
    counts what was done, by kind ("latency", "outage", "error", "cut", "stall"), and `events()`
    lists the most recent faults one by one (`InjectedFault`, latency left out).
    Bytes never change: `etag_generation` only changes the validators (ETag, Last-Modified,
    If-Range), so reads stay checkable against the oracle while clients see a replaced object.
    """

    def __init__(self, app: ASGIApp, *, seed: int = 0) -> None:
        self.app = app
        self._seed = seed
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._faults = Faults()
        self.injected: collections.Counter[str] = collections.Counter()
        self._events: collections.deque[InjectedFault] = collections.deque(maxlen=20_000)

    def events(self, kind: str | None = None) -> list[InjectedFault]:
        """The most recent faults done (oldest first), all or of one kind."""
        with self._lock:
            return [e for e in self._events if kind is None or e.kind == kind]

    def _record(self, scope: Scope, kind: str, **details: Any) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        event = InjectedFault(time.time(), kind, scope["method"], scope["path"], headers, **details)
        with self._lock:
            self._events.append(event)

    @property
    def faults(self) -> Faults:
        """A copy of the current knobs."""
        with self._lock:
            return dataclasses.replace(self._faults)

    def configure(self, **knobs: Any) -> None:
        """Change some knobs (names of `Faults` fields); the others keep their values."""
        with self._lock:
            self._faults = dataclasses.replace(self._faults, **knobs)

    def reset(self) -> None:
        """Back to a well-behaved server, with the generator reseeded and counts cleared."""
        with self._lock:
            self._faults = Faults()
            self._random = random.Random(self._seed)
            self.injected.clear()
            self._events.clear()

    def _plan(self, path: str) -> _Plan | None:
        with self._lock:
            f = self._faults
            if f.path_pattern and not re.search(f.path_pattern, path):
                return None
            status = 503 if f.outage else None
            retry_after = f.retry_after
            if status is None and f.scripted:
                (status, retry_after), rest = f.scripted[0], f.scripted[1:]
                self._faults = dataclasses.replace(f, scripted=rest)
            elif status is None and f.fail_next > 0:
                self._faults = dataclasses.replace(f, fail_next=f.fail_next - 1)
                status = f.error_statuses[0]
            if status is None and self._random.random() < f.error_rate:
                status = self._random.choice(f.error_statuses)
            interrupt = None
            if status is None and self._faults.cut_next > 0:
                self._faults = dataclasses.replace(self._faults, cut_next=f.cut_next - 1)
                interrupt = "cut"
            elif status is None and self._random.random() < f.cut_rate:
                interrupt = "cut"
            elif status is None and self._random.random() < f.stall_rate:
                interrupt = "stall"
            if f.latency:
                self.injected["latency"] += 1
            if status is not None:
                self.injected["outage" if f.outage else "error"] += 1
            if interrupt is not None:
                self.injected[interrupt] += 1
            if status not in (429, 503) or f.outage:
                retry_after = None
            remaining = f.remaining_seconds if status == 429 else None
            return _Plan(
                f.latency,
                None if status is None else "outage" if f.outage else "error",
                status,
                retry_after,
                remaining,
                interrupt,
                f.stall_seconds,
                f.etag_generation,
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        plan = self._plan(scope["path"]) if scope["type"] == "http" else None
        if plan is None:
            await self.app(scope, receive, send)
            return
        if plan.latency:
            await trio.sleep(plan.latency)
        if plan.status is not None:
            self._record(scope, plan.fault or "error", status=plan.status)
            headers = {} if plan.retry_after is None else {"Retry-After": str(plan.retry_after)}
            body: dict[str, Any] = {"detail": f"Injected fault: HTTP {plan.status}."}
            if plan.remaining_seconds is not None:  # Scenario's cooldown answer
                body = {"reason": "Too Many Requests", "remainingSeconds": plan.remaining_seconds}
            await json_response(body, plan.status, headers)(scope, receive, send)
            return
        if plan.generation:
            scope = dict(scope)
            scope["headers"] = [
                (name, _if_range_for_app(value.decode(), plan.generation).encode())
                if name == b"if-range"
                else (name, value)
                for name, value in scope["headers"]
            ]
        await self.app(scope, receive, self._faulty_send(scope, send, plan))

    def _faulty_send(self, scope: Scope, send: Send, plan: _Plan) -> Send:
        sent = 0
        stop_at: int | None = None

        async def faulty(message: Message) -> None:
            nonlocal sent, stop_at
            if message["type"] == "http.response.start":
                headers = []
                for name, value in message["headers"]:
                    if name == b"etag":
                        value = _etag_for(value, plan.generation)
                    elif name == b"last-modified" and plan.generation:
                        shifted = parsedate_to_datetime(value.decode()).timestamp()
                        shifted += plan.generation * _GENERATION_SECONDS
                        value = formatdate(shifted, usegmt=True).encode()
                    elif name == b"content-length":
                        stop_at = int(value) // 2
                    headers.append((name, value))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and plan.interrupt is not None:
                body = message.get("body", b"")
                limit = len(body) if stop_at is None else stop_at - sent
                if len(body) >= limit or not message.get("more_body", False):
                    part = body[: max(limit, 0)]
                    await send({**message, "body": part, "more_body": True})
                    self._record(scope, plan.interrupt, delivered=sent + len(part))
                    if plan.interrupt == "stall":
                        await trio.sleep(plan.stall_seconds)
                    raise InjectedCut(plan.interrupt)
                sent += len(body)
            await send(message)

        return faulty


class FakeService:
    """The lifecycle both fakes share: one request log, servers to stop, injectors to reset.

    A subclass sets `log` and lists its parts in `_servers` and `_injectors`.
    """

    log: RequestLog
    _servers: tuple[RunningServer, ...]
    _injectors: tuple[FaultInjector, ...]

    def reset_counters(self) -> None:
        self.log.reset()

    def reset_faults(self) -> None:
        """Every server back to well-behaved and listening, its fault generator reseeded."""
        for server in self._servers:
            server.resume()
        for injector in self._injectors:
            injector.reset()

    @contextlib.contextmanager
    def refusing_connections(self, *servers: RunningServer) -> Iterator[None]:
        """A full outage for the block: the given servers (default: all) refuse connections,
        then serve again on the same ports."""
        chosen = servers or self._servers
        try:
            for server in chosen:
                server.refuse()
            yield
        finally:
            for server in chosen:
                server.resume()

    def stop(self) -> None:
        for server in self._servers:
            server.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
