"""Content, in process: versions of a file whose size the API gave (so no ETag was known)."""

from __future__ import annotations

import errno
import logging
import time
import tracemalloc
from pathlib import Path

import httpx
import pytest
import trio

from fsmount.blob import RemoteBlob, SignedUrl
from fsmount.cache.blocks import BlockStore
from fsmount.cache.metadata import MetadataStore
from fsmount.content import Content
from fsmount.demo.content import pattern
from fsmount.errors import ContentChanged, FetchError
from fsmount.transfer import HttpPolicy, Storage, TransferStats

MiB = 1 << 20
SIZE = 3 * MiB


class Cdn:
    """A ranged origin whose object can be replaced (new ETag, new bytes) between requests."""

    def __init__(self) -> None:
        self.version = 1

    def handler(self, request: httpx.Request) -> httpx.Response:
        first, last = request.headers["Range"].removeprefix("bytes=").split("-")
        start, end = int(first), int(last) + 1
        etag = f'"v{self.version}"'
        if request.headers.get("If-Range", etag) != etag:
            return httpx.Response(
                200, headers={"ETag": etag}, content=pattern(self.version, 0, SIZE)
            )
        headers = {"ETag": etag, "Content-Range": f"bytes {start}-{end - 1}/{SIZE}"}
        return httpx.Response(
            206, headers=headers, stream=httpx.ByteStream(pattern(self.version, start, end - start))
        )


async def resolve() -> SignedUrl:
    return SignedUrl("https://cdn.test/asset.png?Signature=x", time.time() + 300)


def test_blocks_of_a_file_with_an_api_size_never_mix_versions(tmp_path: Path) -> None:
    cdn = Cdn()
    policy = HttpPolicy(deadline=5.0, base_delay=0.01)
    blob = RemoteBlob("asset", resolve, "asset", size=SIZE, mtime=1.0, version="2025-01-01")

    async def main() -> None:
        storage = Storage(policy, TransferStats(), transport=httpx.MockTransport(cdn.handler))
        async with BlockStore(tmp_path / "blocks", budget=1 << 30, min_free=0, readahead=0) as bs:
            with MetadataStore(tmp_path / "meta.sqlite") as meta:
                content = Content(storage, bs, meta)
                version = await content.stat(blob)
                assert await content.read(blob, 0, 100, version) == pattern(1, 0, 100)
                cdn.version = 2  # replaced on the CDN, same updatedAt
                with pytest.raises(ContentChanged):
                    await content.read(blob, 2 * MiB, 100, version)
        await storage.aclose()

    trio.run(main)


def test_failed_probes_leave_nothing_behind(tmp_path: Path) -> None:
    """Each failure is told to those who waited for it, then dropped: failed sizes (objects
    the service no longer has) keep no state that grows with their number."""

    async def gone() -> SignedUrl:
        raise FetchError(errno.ENOENT, "no such object")

    async def main() -> int:
        storage = Storage(HttpPolicy(deadline=5.0), TransferStats())
        async with BlockStore(tmp_path / "blocks", budget=1 << 30, min_free=0, readahead=0) as bs:
            with MetadataStore(tmp_path / "meta.sqlite") as meta:
                content = Content(storage, bs, meta)

                async def fail_many(first: int) -> None:
                    for n in range(first, first + 2_500):
                        with pytest.raises(FetchError):
                            await content.stat(RemoteBlob(f"gone-{n}", gone, f"gone {n}"))

                await fail_many(0)  # warm: the libraries' own caches fill first
                tracemalloc.start()
                before = tracemalloc.get_traced_memory()[0]
                await fail_many(2_500)
                grown = tracemalloc.get_traced_memory()[0] - before
                tracemalloc.stop()
        await storage.aclose()
        return grown

    logging.disable(logging.WARNING)  # pytest keeps every log record: not ours to count
    try:
        grown = trio.run(main)
    finally:
        logging.disable(logging.NOTSET)
    assert grown < 512 * 1024, f"{grown} bytes kept after 2,500 failed probes"


def test_closing_stops_probes_in_flight_before_their_clients_close(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Guesses run on their own; at unmount they must end quietly, not fail against closed
    clients and log an error each (or keep the mount from exiting)."""
    started = 0

    async def slow(request: httpx.Request) -> httpx.Response:
        nonlocal started
        started += 1
        await trio.sleep(60)
        raise AssertionError("a probe outlived the mount")

    async def main() -> list[FetchError | None]:
        storage = Storage(
            HttpPolicy(deadline=90.0), TransferStats(), transport=httpx.MockTransport(slow)
        )
        async with BlockStore(tmp_path / "blocks", budget=1 << 30, min_free=0, readahead=0) as bs:
            with MetadataStore(tmp_path / "meta.sqlite") as meta:
                content = Content(storage, bs, meta, parallel=4, speculative=2)
                blobs = [RemoteBlob(f"b{n}", resolve, f"b{n}") for n in range(6)]
                for blob in blobs[1:]:
                    content.guess(blob)
                failures: list[FetchError | None] = []

                async def asked() -> None:
                    try:
                        await content.stat(blobs[0])
                    except FetchError as exc:
                        failures.append(exc)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(asked)
                    while started < 3:  # the asked one and two guesses; three guesses queue
                        await trio.sleep(0.01)
                    with trio.fail_after(5):
                        await content.aclose()  # every probe ended
                await storage.aclose()
        return failures

    with caplog.at_level(logging.WARNING):
        failures = trio.run(main)
    assert [f.errno for f in failures if f] == [errno.EIO] and "closing" in str(failures[0])
    assert started == 3
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
