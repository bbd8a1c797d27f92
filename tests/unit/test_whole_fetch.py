"""Fetching an object of unknown size whole (HealthImaging instances): in process, against
stores that honour Range or not, send a length or not, cut bodies, or take their time."""

from __future__ import annotations

import errno
import time

import httpx
import pytest
import trio

from fsmount.blob import RemoteBlob, SignedUrl
from fsmount.demo.content import pattern
from fsmount.errors import FetchError
from fsmount.transfer import HttpPolicy, Storage, TransferStats

DATA = pattern(11, 0, 200_000)
SIGNED = {"Authorization": "AWS4-HMAC-SHA256 Signature=abc", "Accept": "application/dicom"}


class Body(httpx.AsyncByteStream):
    """A body in pieces, each after `pause` seconds; it breaks after `keep` bytes if given."""

    def __init__(self, data: bytes, keep: int | None = None, pause: float = 0.0) -> None:
        self.data, self.keep, self.pause = data, keep, pause

    async def __aiter__(self):
        end = len(self.data) if self.keep is None else self.keep
        for at in range(0, end, 50_000):
            await trio.sleep(self.pause)
            yield self.data[at : min(at + 50_000, end)]
        if self.keep is not None:
            raise httpx.RemoteProtocolError("peer closed connection")


class Store:
    """One object behind a request signed in its headers."""

    def __init__(self, *, ranges: bool, length: bool, cuts: int = 0, pause: float = 0.0):
        self.ranges, self.length, self.cuts, self.pause = ranges, length, cuts, pause
        self.requests: list[httpx.Request] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if any(request.headers.get(k) != v for k, v in SIGNED.items()):
            return httpx.Response(403, json={"message": "Missing Authentication Token"})
        start = int(request.headers["Range"].removeprefix("bytes=").partition("-")[0])
        status, headers = 200, {}
        if self.ranges:
            status, headers = 206, {"Content-Range": f"bytes {start}-{len(DATA) - 1}/{len(DATA)}"}
        body = DATA[start:] if self.ranges else DATA
        if self.length:
            headers["Content-Length"] = str(len(body))
        keep = None
        if self.cuts:
            self.cuts -= 1
            keep = 75_000
        return httpx.Response(status, headers=headers, stream=Body(body, keep, self.pause))


def fetch_whole(store: Store, policy: HttpPolicy) -> bytes:
    async def resolve() -> SignedUrl:
        return SignedUrl("https://hi.test/instance?imageSetId=x", time.time() + 240, "GET", SIGNED)

    blob = RemoteBlob(key="k", resolve=resolve, description="instance", whole_fetch=True)
    got: list[bytes] = []

    async def sink(piece: bytes) -> None:
        got.append(piece)

    async def main() -> None:
        storage = Storage(policy, TransferStats(), transport=httpx.MockTransport(store.handler))
        try:
            await storage.fetch(blob, 0, None, None, sink)
        finally:
            await storage.aclose()

    trio.run(main)
    return b"".join(got)


FAST = HttpPolicy(deadline=5.0, base_delay=0.01, max_delay=0.05)


@pytest.mark.parametrize("ranges", [True, False], ids=["range", "no-range"])
@pytest.mark.parametrize("length", [True, False], ids=["length", "no-length"])
def test_a_cut_body_resumes_or_starts_again_and_the_bytes_are_exact(ranges, length) -> None:
    store = Store(ranges=ranges, length=length, cuts=2)
    assert fetch_whole(store, FAST) == DATA
    ranges_asked = [r.headers["Range"] for r in store.requests]
    # Each retry asks from the first byte it lacks; a store ignoring Range sends it all again.
    assert ranges_asked == [
        "bytes=0-",
        "bytes=75000-",
        "bytes=150000-" if ranges else "bytes=75000-",
    ]


def test_a_slow_body_is_not_cut_by_the_deadline_while_bytes_flow() -> None:
    policy = HttpPolicy(deadline=0.6, stall_timeout=0.5, base_delay=0.01, max_delay=0.05)
    store = Store(ranges=False, length=False, pause=0.2)  # 4 pieces: 0.8 s > the deadline
    assert fetch_whole(store, policy) == DATA
    assert len(store.requests) == 1


def test_a_body_that_never_gets_further_fails_within_the_deadline() -> None:
    policy = HttpPolicy(deadline=1.0, base_delay=0.01, max_delay=0.05)
    store = Store(ranges=False, length=False, cuts=1_000)  # every body cut at the same byte
    started = time.monotonic()
    with pytest.raises(FetchError) as err:
        fetch_whole(store, policy)
    assert err.value.errno == errno.ETIMEDOUT
    assert time.monotonic() - started < 3
