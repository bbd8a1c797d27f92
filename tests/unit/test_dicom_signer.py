"""The signed requests of a DICOM image set: one answer for all its files, asked for again
once when it grows old or HealthImaging refuses one of its requests."""

from __future__ import annotations

import pytest
import trio
from cachetools import LRUCache

from fsmount.blob import SignedUrl
from fsmount.sources.gc_dicom import SIGNATURE_MARGIN, SIGNED_FOR, SIGNED_SETS_KEPT, Signer

UIDS = [f"1.2.826.0.1.3680043.8.498.{n}" for n in range(5)]


class _Source:
    """Stands in for the Grand Challenge source: counts `dicom/instances/` answers."""

    def __init__(self) -> None:
        self.asked = 0
        self.signed_sets: LRUCache[str, dict[str, SignedUrl]] = LRUCache(SIGNED_SETS_KEPT)

    async def instances(self, pk: str) -> dict[str, SignedUrl]:
        self.asked += 1
        await trio.sleep(0.01)  # an answer takes a while: others ask meanwhile
        headers = {"X-Amz-Date": f"answer {self.asked}"}
        return {uid: SignedUrl(f"https://hi.test/{uid}", 0.0, "GET", headers) for uid in UIDS}


async def _all(signer: Signer) -> list[SignedUrl]:
    got: list[SignedUrl] = []

    async def one(uid: str) -> None:
        got.append(await signer.request(uid))

    async with trio.open_nursery() as nursery:
        for uid in UIDS:
            nursery.start_soon(one, uid)
    return got


def test_signatures_are_asked_for_again_once_for_all_files_when_old_or_refused() -> None:
    clock = [1_000_000.0]
    source = _Source()

    async def main() -> None:
        signer = Signer(source, "image-pk", clock=lambda: clock[0])
        first = await _all(signer)
        assert source.asked == 1
        assert {s.expires_at for s in first} == {clock[0] + SIGNED_FOR - SIGNATURE_MARGIN}
        clock[0] += SIGNED_FOR - SIGNATURE_MARGIN - 1  # still within the safe margin
        await _all(signer)
        assert source.asked == 1
        clock[0] += 1  # older than the margin: every file at once, one new answer
        second = await _all(signer)
        assert source.asked == 2
        assert {s.headers["X-Amz-Date"] for s in second} == {"answer 2"}
        for signed in first:  # refusals of an older answer change nothing
            assert signed.refused is not None
            signed.refused()
        await _all(signer)
        assert source.asked == 2
        for signed in second:  # HealthImaging refused this answer's requests: once more
            assert signed.refused is not None
            signed.refused()
        third = await _all(signer)
        assert source.asked == 3
        assert {s.headers["X-Amz-Date"] for s in third} == {"answer 3"}
        with pytest.raises(Exception, match="no longer listed"):
            await signer.request("9.9.9")
        # Many other sets read from since: this one's answer was let go, and is asked again.
        for other in range(SIGNED_SETS_KEPT):
            source.signed_sets[f"other-{other}"] = {}
        assert "image-pk" not in source.signed_sets
        await _all(signer)
        assert source.asked == 4

    trio.run(main)
