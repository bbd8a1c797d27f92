"""The HTTP layer's policy, in process: retries, deadlines, signed URLs, resume, versions."""

from __future__ import annotations

import errno
import json
import logging
import socket
import threading
import time

import httpcore
import httpx
import pytest
import trio

from fsmount.blob import RemoteBlob, SignedUrl
from fsmount.demo.content import pattern
from fsmount.errors import ContentChanged, FetchError
from fsmount.transfer import (
    ApiClient,
    Credentials,
    HttpPolicy,
    Storage,
    TransferStats,
    raise_read_size,
    redact,
    url_expiry,
)

FAST = HttpPolicy(deadline=5.0, base_delay=0.01, max_delay=0.05)
SIZE = 3_000_000


def api(handler, policy: HttpPolicy = FAST, creds: Credentials | None = None) -> ApiClient:
    creds = creds or Credentials(lambda: {"Authorization": "Bearer secret-token"})
    return ApiClient(
        "https://api.test/api/v1/",
        creds,
        policy,
        TransferStats(),
        name="test",
        transport=httpx.MockTransport(handler),
    )


class Body(httpx.AsyncByteStream):
    """A body streamed like a network one; with `keep`, it breaks after that many bytes."""

    def __init__(self, data: bytes, keep: int | None = None) -> None:
        self.data, self.keep = data, keep

    async def __aiter__(self):
        yield self.data[: self.keep]
        if self.keep is not None:
            raise httpx.RemoteProtocolError("peer closed connection")


class FakeStorage:
    """A ranged object store with knobs: cut bodies, 403 until re-signed, changing ETag."""

    def __init__(self) -> None:
        self.resolves = 0
        self.requests: list[httpx.Request] = []
        self.cut_first = 0
        self.etag = '"v1"'
        self.valid_generation = 1

    async def resolve(self) -> SignedUrl:
        self.resolves += 1
        return SignedUrl(
            f"https://cdn.test/obj?gen={self.resolves}&Signature=abc", time.time() + 300
        )

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if int(request.url.params["gen"]) < self.valid_generation:
            return httpx.Response(403, text="<Error>AccessDenied</Error>")
        first, last = request.headers["Range"].removeprefix("bytes=").split("-")
        start, end = int(first), min(int(last) + 1, SIZE)
        if_range = request.headers.get("If-Range")
        headers = {"ETag": self.etag, "Last-Modified": "Wed, 01 Jan 2025 00:00:00 GMT"}
        if if_range is not None and if_range != self.etag:
            return httpx.Response(200, headers=headers, stream=Body(pattern(7, 0, SIZE)))
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{SIZE}"
        body = pattern(7, start, end - start)
        if self.cut_first > 0 and end - start > 10:
            self.cut_first -= 1
            return httpx.Response(206, headers=headers, stream=Body(body, len(body) // 3))
        return httpx.Response(206, headers=headers, stream=Body(body))


def storage_for(fake: FakeStorage) -> tuple[Storage, RemoteBlob]:
    storage = Storage(FAST, TransferStats(), transport=httpx.MockTransport(fake.handler))
    blob = RemoteBlob(key="k", resolve=fake.resolve, description="test object")
    return storage, blob


def test_api_retries_503_then_succeeds_and_honours_retry_after() -> None:
    calls: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(time.monotonic())
        if len(calls) == 1:
            return httpx.Response(503, headers={"Retry-After": "0.2"})
        if len(calls) == 2:
            return httpx.Response(429, json={"remainingSeconds": 0.1})
        return httpx.Response(200, json={"ok": True})

    client = api(handler)
    assert trio.run(client.get_json, "archives/") == {"ok": True}
    assert len(calls) == 3
    assert calls[1] - calls[0] >= 0.2
    assert calls[2] - calls[1] >= 0.1


def test_api_does_not_retry_a_404_and_maps_it_to_enoent() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(404, json={"detail": "Not found."})

    with pytest.raises(FetchError) as err:
        trio.run(api(handler).get_json, "archives/x/")
    assert err.value.errno == errno.ENOENT and calls == 1
    assert "Not found." in str(err.value)


def test_api_gives_up_within_its_deadline_with_eio() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502)

    policy = HttpPolicy(deadline=0.5, base_delay=0.05, max_delay=0.1)
    started = time.monotonic()
    with pytest.raises(FetchError) as err:
        trio.run(api(handler, policy).get_json, "archives/")
    assert err.value.errno == errno.EIO
    assert time.monotonic() - started < 2.0


def test_throttling_past_the_budget_is_eagain_never_enoent() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429)

    policy = HttpPolicy(deadline=0.3, base_delay=0.05, max_delay=0.1)
    with pytest.raises(FetchError) as err:
        trio.run(api(handler, policy).get_json, "archives/")
    assert err.value.errno == errno.EAGAIN


def test_a_rotated_token_file_is_read_again_once_after_a_401() -> None:
    tokens = iter(["old", "new", "newer"])
    creds = Credentials(lambda: {"Authorization": f"Bearer {next(tokens)}"})
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["Authorization"])
        if request.headers["Authorization"] == "Bearer new":
            return httpx.Response(200, json={})
        return httpx.Response(401, json={"detail": "Invalid token."})

    assert trio.run(api(handler, creds=creds).get_json, "archives/") == {}
    assert seen == ["Bearer old", "Bearer new"]


def test_requests_rejected_together_read_the_rotated_token_once_and_all_succeed() -> None:
    """Two listings in flight when the token rotates both get a 401: the first re-reads the
    file, the second must try again with what it read rather than fail."""
    loads: list[str] = []
    current = {"token": "old"}

    def load() -> dict[str, str]:
        loads.append(current["token"])
        return {"Authorization": f"Bearer {current['token']}"}

    creds = Credentials(load)
    current["token"] = "new"
    both_sent = trio.Event()
    old_seen = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal old_seen
        if request.headers["Authorization"] == "Bearer new":
            return httpx.Response(200, json={"path": request.url.path})
        old_seen += 1
        if old_seen == 2:
            both_sent.set()
        await both_sent.wait()  # both are rejected only once both were sent
        return httpx.Response(401, json={"detail": "Invalid token."})

    client = api(handler, creds=creds)
    answers: list[object] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for path in ("archives/", "cases/images/"):
                nursery.start_soon(lambda p: _append(answers, client.get_json(p)), path)

    trio.run(main)
    assert sorted(a["path"] for a in answers) == ["/api/v1/archives/", "/api/v1/cases/images/"]
    assert old_seen == 2 and loads == ["old", "new"]  # read at start, then once


async def _append(answers: list[object], waiting) -> None:
    answers.append(await waiting)


async def fetch(
    storage: Storage, blob: RemoteBlob, start: int, end: int, etag: str | None = '"v1"'
) -> tuple[bytes, str | None]:
    """Storage.fetch with the body's chunks joined."""
    chunks: list[bytes] = []

    async def sink(chunk: bytes) -> None:
        chunks.append(chunk)

    seen = await storage.fetch(blob, start, end, etag, sink)
    return b"".join(chunks), seen


def test_signed_url_is_resolved_once_for_many_ranges_and_carries_no_authorization() -> None:
    fake = FakeStorage()
    storage, blob = storage_for(fake)

    async def main() -> bytes:
        parts = [
            (await fetch(storage, blob, off, off + 100_000))[0] for off in range(0, SIZE, 100_000)
        ]
        return b"".join(parts)

    assert trio.run(main) == pattern(7, 0, SIZE)
    assert fake.resolves == 1
    assert all("Authorization" not in r.headers for r in fake.requests)


def test_expired_url_is_refreshed_once_on_403() -> None:
    fake = FakeStorage()
    storage, blob = storage_for(fake)
    assert trio.run(fetch, storage, blob, 0, 10) == (pattern(7, 0, 10), '"v1"')
    fake.valid_generation = 2  # the first URL now answers 403
    assert trio.run(fetch, storage, blob, 10, 20) == (pattern(7, 10, 10), '"v1"')
    assert fake.resolves == 2


def test_interrupted_body_resumes_from_the_last_byte() -> None:
    fake = FakeStorage()
    fake.cut_first = 2
    storage, blob = storage_for(fake)
    data, etag = trio.run(fetch, storage, blob, 5, 2_000_005)
    assert (data, etag) == (pattern(7, 5, 2_000_000), '"v1"')
    ranges = [r.headers["Range"] for r in fake.requests]
    assert ranges[0] == "bytes=5-2000004"
    assert len(ranges) == 3 and ranges[1] != ranges[0] and ranges[2] != ranges[1]
    assert all(r.headers.get("If-Range") == '"v1"' for r in fake.requests)


def test_a_changed_etag_is_never_served_mixed() -> None:
    fake = FakeStorage()
    storage, blob = storage_for(fake)
    fake.etag = '"v2"'
    with pytest.raises(ContentChanged):
        trio.run(fetch, storage, blob, 100, 200)


def test_without_a_known_etag_the_first_response_pins_the_version_for_resumes() -> None:
    fake = FakeStorage()
    fake.cut_first = 1
    storage, blob = storage_for(fake)
    data, etag = trio.run(fetch, storage, blob, 0, 1_000_000, None)
    assert (data, etag) == (pattern(7, 0, 1_000_000), '"v1"')
    assert "If-Range" not in fake.requests[0].headers
    assert fake.requests[1].headers["If-Range"] == '"v1"'  # the resume names the version

    class Replaced(FakeStorage):  # the object is replaced between the cut and the resume
        def handler(self, request: httpx.Request) -> httpx.Response:
            response = super().handler(request)
            self.etag = '"v2"'
            return response

    fake = Replaced()
    fake.cut_first = 1
    storage, blob = storage_for(fake)
    with pytest.raises(ContentChanged):
        trio.run(fetch, storage, blob, 0, 1_000_000, None)


def test_probe_learns_size_time_and_etag_and_empty_files_are_size_zero() -> None:
    fake = FakeStorage()
    storage, blob = storage_for(fake)
    st = trio.run(storage.probe, blob)
    assert (st.size, st.etag) == (SIZE, '"v1"') and st.mtime == 1735689600.0

    def empty(request: httpx.Request) -> httpx.Response:
        return httpx.Response(416, headers={"Content-Range": "bytes */0"})

    storage = Storage(FAST, TransferStats(), transport=httpx.MockTransport(empty))
    assert trio.run(storage.probe, blob).size == 0


def test_expiry_is_read_from_canned_and_custom_policies_and_logs_drop_queries() -> None:
    assert url_expiry("https://s/x?Expires=1700000000&Signature=a") == 1700000000.0
    policy = '{"Statement":[{"Condition":{"DateLessThan":{"AWS:EpochTime":1717199999}}}]}'
    import base64

    encoded = base64.b64encode(policy.encode()).decode().replace("+", "-").replace("=", "_")
    assert url_expiry(f"https://c/a?Policy={encoded}&Signature=x") == 1717199999.0
    assert redact("https://user:pw@c.test:8443/a/b?Signature=secret") == "https://c.test:8443/a/b"


def test_storage_honours_retry_after() -> None:
    fake = FakeStorage()
    times: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        times.append(time.monotonic())
        if len(times) == 1:
            return httpx.Response(503, headers={"Retry-After": "0.3"})
        return fake.handler(request)

    storage = Storage(FAST, TransferStats(), transport=httpx.MockTransport(handler))
    blob = RemoteBlob(key="k", resolve=fake.resolve, description="test object")
    assert trio.run(fetch, storage, blob, 0, 10) == (pattern(7, 0, 10), '"v1"')
    assert len(times) == 2 and times[1] - times[0] >= 0.3


def test_a_malformed_retry_after_is_no_hint_and_the_request_is_retried() -> None:
    fake = FakeStorage()
    hints = [
        {"Retry-After": "soon"},
        {"Retry-After": "Mon, 99 Foo 2024 25:61:61 GMT"},
        {"Retry-After": "inf"},
        {"Retry-After": "nan"},
    ]
    answers = [httpx.Response(503, headers=hint) for hint in hints]
    bodies = ['{"remainingSeconds": "soon"}', '{"remainingSeconds": Infinity}', "[1, 2]"]
    json_type = {"Content-Type": "application/json"}
    answers += [httpx.Response(429, headers=json_type, text=body) for body in bodies]
    seen = 0

    def storage_handler(request: httpx.Request) -> httpx.Response:
        nonlocal seen
        seen += 1
        return answers[seen - 1] if seen <= len(answers) else fake.handler(request)

    storage = Storage(FAST, TransferStats(), transport=httpx.MockTransport(storage_handler))
    blob = RemoteBlob(key="k", resolve=fake.resolve, description="test object")
    assert trio.run(fetch, storage, blob, 0, 10) == (pattern(7, 0, 10), '"v1"')
    assert seen == len(answers) + 1

    calls = 0

    def api_handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return answers[calls - 1] if calls <= len(answers) else httpx.Response(200, json={})

    assert trio.run(api(api_handler).get_json, "archives/") == {}
    assert calls == len(answers) + 1


def test_a_stall_may_take_a_third_of_the_deadline_so_a_retry_fits() -> None:
    short = HttpPolicy.within(3.0)
    assert short.deadline == 3.0 and short.stall_timeout == 1.0 and short.connect_timeout == 1.0
    default = HttpPolicy.within(60.0)
    assert default.stall_timeout == 20.0 and default.connect_timeout == 10.0


@pytest.mark.parametrize("honours_range", [True, False])
def test_tail_is_the_last_bytes_and_the_size_in_one_request(honours_range: bool) -> None:
    data = pattern(3, 0, 100_000)
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        assert request.headers["Range"] == "bytes=-4096"
        headers = {"ETag": '"zip"', "Last-Modified": "Wed, 01 Jan 2025 00:00:00 GMT"}
        if not honours_range:  # the whole object: only its end may be kept
            return httpx.Response(200, headers=headers, stream=Body(data))
        headers["Content-Range"] = f"bytes {len(data) - 4096}-{len(data) - 1}/{len(data)}"
        cut = len(requests) == 1  # the first answer breaks off: asked again
        return httpx.Response(206, headers=headers, stream=Body(data[-4096:], 100 if cut else None))

    storage = Storage(FAST, TransferStats(), transport=httpx.MockTransport(handler))
    blob = RemoteBlob(key="zip", resolve=FakeStorage().resolve, description="test zip")
    st, tail = trio.run(storage.tail, blob, 4096)
    assert tail == data[-4096:]
    assert (st.size, st.etag) == (len(data), '"zip"')
    assert len(requests) == (2 if honours_range else 1)


def test_httpcore_hands_over_whatever_arrived_up_to_a_mebibyte_per_read() -> None:
    """The data path's speed rests on httpcore's per-read ceiling (transfer.raise_read_size):
    a body that has arrived comes in pieces of more than httpcore's default 64 KiB."""
    body = pattern(3, 0, 4 << 20)
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            while b"\r\n\r\n" not in conn.recv(65536):
                pass
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    async def pieces(url: str) -> list[int]:
        async with httpx.AsyncClient() as client, client.stream("GET", url) as response:
            await trio.sleep(0.3)  # let the body pile up in the socket
            return [len(piece) async for piece in response.aiter_raw()]

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    raise_read_size()
    try:
        sizes = trio.run(pieces, f"http://127.0.0.1:{server.getsockname()[1]}/")
    finally:
        server.close()
        thread.join(10)
    assert sum(sizes) == len(body)
    assert max(sizes) > 64 << 10, sizes


def test_without_httpcores_read_size_the_mount_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delattr(httpcore.AsyncHTTP11Connection, "READ_NUM_BYTES")
    with caplog.at_level(logging.WARNING, logger="fsmount.transfer"):
        raise_read_size()
    assert "READ_NUM_BYTES" in caplog.text
    assert not hasattr(httpcore.AsyncHTTP11Connection, "READ_NUM_BYTES")  # nothing invented


@pytest.mark.parametrize(
    "text",
    [
        b'{"n": 18446744073709563961, "m": -9223372036854775809}',
        b'{"f": [0.1, 1e16, -0.0, 1.7976931348623157e308], "s": "\\u00e9\\ud800"}',
        b"[NaN, Infinity, 12345678901234567890123]",
        b'{"a": 1, "a": 2, "b": {"c": [true, false, null]}}',
    ],
)
def test_json_pages_parse_to_exactly_what_the_standard_parser_gives(text: bytes) -> None:
    """A value socket may hold integers past 64 bits, NaN or lone surrogates: all kept."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=text, headers={"Content-Type": "application/json"})

    got = trio.run(api(handler).get_json, "archives/items/")
    assert json.dumps(got) == json.dumps(json.loads(text))
