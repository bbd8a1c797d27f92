"""The benchmark's one loopback HTTP server: the same bytes for curl, fsmount and rclone.

One hypercorn server answers three kinds of request, so every client in a run reads the same
objects through the same sockets, server and CPU budget:

- `/api/v1/...` and `/media/...`: the demo's fake Grand Challenge API (`GrandChallengeFake`),
  unchanged, with one extra public archive, `bench` (see `BenchData`), which is what fsmount
  mounts;
- everything else that is not `/plain/`: the fake's signed storage origin (the `/media/`
  redirects point here because the fake's `storage_url` is set to this server);
- `/plain/...`: the same objects without signatures, plus HTML directory indexes, which is
  what rclone's `http` backend and curl read.

A middleware counts requests and body bytes per kind, so the benchmark can say how many bytes a
workload made each client fetch. The fake's own two servers keep running, idle: the fake has no
way to be built without them, and reusing it beats writing a second Grand Challenge.
"""

from __future__ import annotations

import html
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

import trio
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.types import Message, Receive, Scope, Send

from fsmount.demo.content import pattern
from fsmount.demo.gc_samples import (
    STORED_AT,
    Archive,
    Item,
    Payload,
    SampleData,
    Socket,
    StoredObject,
    Value,
    uid,
)
from fsmount.demo.grand_challenge import API_PREFIX, GrandChallengeFake
from fsmount.demo.httpcommon import RunningServer, range_response, start_server

GIB = 1 << 30
ARCHIVE_SLUG = "bench"  # the two large files
MANY_SLUG = "bench-many"  # the 10,000 small files: a separate archive, so that mounts which
# only read the large files never load (and hold in memory) the 10,000-value item listing
BIG_NAME = "data-1gib.bin"
HUGE_NAME = "data-5gib.bin"
BENCH_ARCHIVES = (ARCHIVE_SLUG, MANY_SLUG)
MANY_DIR = "many"
MANY_COUNT = 10_000
_SEED = 20_250_101
_SMALL_STRIDE = 16_384  # small files are consecutive windows of one pattern stream
_PLAIN = "/plain/"
_WAN_SLICE = 64 << 10  # bytes per paced send under WAN emulation


def _small_size(index: int) -> int:
    """Sizes between 512 B and 8 KiB, varied so `du` has something to add up."""
    return 512 + (index * 7_919) % (8_192 - 512)


def _window(offset: int, size: int) -> Callable[[int, int], bytes]:
    """`Payload.read` for bytes `[offset, offset + size)` of the shared pattern stream.

    `pattern` keeps one period per seed in memory, so thousands of small files share one seed
    (and one period) instead of each generating its own.
    """

    def read(start: int, length: int) -> bytes:
        return pattern(_SEED, offset + start, min(length, size - start))

    return read


@dataclass(frozen=True)
class BenchFile:
    """One benchmark object: where it sits in the mount and in the plain tree, and its bytes."""

    plain_path: str  # under /plain/, e.g. "many/f00042.bin"
    stored: StoredObject

    @property
    def name(self) -> str:
        return self.plain_path.rsplit("/", 1)[-1]


def _stored(key: str, payload: Payload) -> StoredObject:
    return StoredObject(key, payload, "application/octet-stream", uid("etag", key).replace("-", ""))


def bench_files() -> tuple[BenchFile, BenchFile, list[BenchFile]]:
    """The 1 GiB file, the 5 GiB file and the 10,000 small files, all generated on the fly."""
    big = BenchFile(
        BIG_NAME, _stored(f"bench/{BIG_NAME}", Payload.generated(_SEED + 1, GIB, STORED_AT))
    )
    huge = BenchFile(
        HUGE_NAME,
        _stored(f"bench/{HUGE_NAME}", Payload.generated(_SEED + 5, 5 * GIB, STORED_AT)),
    )
    many = []
    for index in range(MANY_COUNT):
        name = f"f{index:05d}.bin"
        size = _small_size(index)
        payload = Payload(size, _window(index * _SMALL_STRIDE, size), STORED_AT + index)
        many.append(BenchFile(f"{MANY_DIR}/{name}", _stored(f"bench/{MANY_DIR}/{name}", payload)))
    return big, huge, many


def _file_value(pk: int, slug: str, relative_path: str, stored: StoredObject) -> Value:
    socket = Socket(pk, slug, slug, "Anything", "File", relative_path)
    return Value(pk, socket, file=stored)


class BenchData(SampleData):
    """The demo's sample archives plus two public ones: `bench`, whose one item holds the 1 GiB
    and 5 GiB files, and `bench-many`, whose one item holds the 10,000 small files (a directory
    of 10,000 entries in the mount).

    Only the lookups the fake makes for File values are extended (`item`, `stored`); the demo
    data stays as it is, so the fake behaves exactly as the tests pin it down.
    """

    def __init__(self, big: BenchFile, huge: BenchFile, many: list[BenchFile]) -> None:
        super().__init__()
        pk = 9_000_000
        large = Item(
            uid("item", ARCHIVE_SLUG, "large"),
            (
                _file_value(pk, "bench-1gib", BIG_NAME, big.stored),
                _file_value(pk + 1, "bench-5gib", HUGE_NAME, huge.stored),
            ),
        )
        small = Item(
            uid("item", MANY_SLUG, "many"),
            tuple(
                _file_value(pk + 10 + i, f"bench-small-{i:05d}", f.name, f.stored)
                for i, f in enumerate(many)
            ),
        )
        self.bench_archives = {
            ARCHIVE_SLUG: _archive(ARCHIVE_SLUG, large),
            MANY_SLUG: _archive(MANY_SLUG, small),
        }
        self.archives = (*self.archives, *self.bench_archives.values())
        self._bench_items = {
            item.pk: (archive, item)
            for archive in self.bench_archives.values()
            for item in archive.items
        }
        self._bench_objects = {
            value.file.key: (archive, value.file)
            for archive, item in self._bench_items.values()
            for value in item.values
            if value.file is not None
        }
        self.large_item_pk = large.pk
        self.many_item_pk = small.pk

    def item(self, pk: str) -> tuple[Archive, Item] | None:
        return self._bench_items.get(pk) or super().item(pk)

    def stored(self, key: str) -> tuple[Archive, StoredObject] | None:
        return self._bench_objects.get(key) or super().stored(key)


def _archive(slug: str, item: Item) -> Archive:
    return Archive(uid("archive", slug), slug, slug, "Files for bench/run.py", True, [item])


class Traffic:
    """Requests and response-body bytes per kind ("api", "media", "storage", "plain").

    Bytes are counted as the server hands them to the socket, so a client that hangs up early
    is charged for what was already sent: that is what it made the server fetch.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[str] = Counter()
        self._bytes: Counter[str] = Counter()

    def add(self, kind: str, *, requests: int = 0, body: int = 0) -> None:
        with self._lock:
            self._requests[kind] += requests
            self._bytes[kind] += body

    def snapshot(self) -> tuple[dict[str, int], dict[str, int]]:
        with self._lock:
            return dict(self._requests), dict(self._bytes)


@dataclass(frozen=True)
class Wan:
    """A wide-area link, roughly as a client far from its object store sees it: every response
    starts `latency` seconds late (one round trip and the store's own first-byte time), and one
    response body never moves faster than `rate` bytes per second (a single TCP stream to S3 or
    GCS typically gives 50-100 MB/s). Applied alike to every client and every kind of request."""

    latency: float
    rate: float

    def describe(self) -> str:
        rate = self.rate / (1 << 20)
        return f"{self.latency * 1000:.0f} ms to first byte, {rate:.0f} MiB/s per response"


@dataclass(frozen=True)
class TrafficDelta:
    """What one workload cost the server."""

    requests: dict[str, int]
    body_bytes: dict[str, int]

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.body_bytes.values())


class BenchServer:
    """The running server (see the module docstring); a context manager that stops it."""

    def __init__(self) -> None:
        big, huge, many = bench_files()
        self.big, self.huge = big, huge
        self._plain: dict[str, StoredObject] = {f.plain_path: f.stored for f in (big, huge, *many)}
        self._indexes = {
            "": _index_page([BIG_NAME, HUGE_NAME, f"{MANY_DIR}/"]),
            f"{MANY_DIR}/": _index_page([f.name for f in many]),
        }
        self.traffic = Traffic()
        self.wan: Wan | None = None  # set it to emulate a wide-area link from then on
        self.fake = GrandChallengeFake()
        try:
            self.data = BenchData(big, huge, many)
            self.fake.data = self.data
            self._server: RunningServer = start_server(self._app)
        except BaseException:
            self.fake.stop()
            raise
        self.url = self._server.url
        self.fake.storage_url = self.url  # /media/ redirects lead to this server
        self.api_url = self.url + API_PREFIX
        self.token = self.fake.token

    def plain_url(self, path: str = "") -> str:
        return f"{self.url}{_PLAIN}{path}"

    def mount_path(self, name: str) -> str:
        """Where fsmount shows a benchmark file or directory, relative to the mount point."""
        if name == MANY_DIR:
            return f"grand-challenge/{MANY_SLUG}/{self.data.many_item_pk}"
        return f"grand-challenge/{ARCHIVE_SLUG}/{self.data.large_item_pk}/{name}"

    def measure(self) -> Callable[[], TrafficDelta]:
        """Start counting; the returned function gives what was served since."""
        requests0, bytes0 = self.traffic.snapshot()

        def delta() -> TrafficDelta:
            requests1, bytes1 = self.traffic.snapshot()
            return TrafficDelta(
                {k: v - requests0.get(k, 0) for k, v in requests1.items()},
                {k: v - bytes0.get(k, 0) for k, v in bytes1.items()},
            )

        return delta

    def stop(self) -> None:
        self._server.stop()
        self.fake.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- the ASGI app ---------------------------------------------------------------------

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if path.startswith(_PLAIN):
            kind, app = "plain", self._plain_app
        elif path.startswith(API_PREFIX):
            kind, app = "api", self.fake.api_faults
        elif path.startswith("/media/"):
            kind, app = "media", self.fake.api_faults
        else:
            kind, app = "storage", self.fake.storage_faults
        self.traffic.add(kind, requests=1)
        wan = self.wan
        started = trio.current_time()
        sent = 0

        async def counting(message: Message) -> None:
            nonlocal sent
            if message["type"] == "http.response.body" and wan is not None:
                # In slices, each sent when it could have arrived at `rate`: a link delivers
                # bytes as they come, not a whole 1 MiB body message at once.
                body, more = message.get("body", b""), message.get("more_body", False)
                for at in range(0, len(body), _WAN_SLICE):
                    piece = body[at : at + _WAN_SLICE]
                    self.traffic.add(kind, body=len(piece))
                    sent += len(piece)
                    await trio.sleep_until(started + wan.latency + sent / wan.rate)
                    last = at + _WAN_SLICE >= len(body)
                    await send({**message, "body": piece, "more_body": more or not last})
                if not body:
                    await send(message)
                return
            if message["type"] == "http.response.body":
                self.traffic.add(kind, body=len(message.get("body", b"")))
            elif message["type"] == "http.response.start" and wan is not None:
                await trio.sleep_until(started + wan.latency)
            await send(message)

        await app(scope, receive, counting)

    async def _plain_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        await self._plain_response(request)(scope, receive, send)

    def _plain_response(self, request: Request) -> Response:
        rest = request.url.path.removeprefix(_PLAIN)
        if request.method not in ("GET", "HEAD"):
            return Response(b"", 405, headers={"Allow": "GET, HEAD"})
        if rest in self._indexes:
            return HTMLResponse(self._indexes[rest])
        stored = self._plain.get(rest)
        if stored is None:
            return Response(b"not found", 404)
        return range_response(
            request,
            size=stored.payload.size,
            read=stored.payload.read,
            etag=stored.etag,
            last_modified=stored.payload.last_modified or 0.0,
            content_type=stored.content_type,
        )


def _index_page(names: list[str]) -> str:
    """A minimal autoindex page: one link per entry, directories ending in `/` (as rclone's
    http backend expects)."""
    links = "\n".join(f'<a href="{html.escape(n)}">{html.escape(n)}</a><br>' for n in names)
    return (
        f"<!DOCTYPE html>\n<html><head><title>Index</title></head><body>\n{links}\n</body></html>\n"
    )
