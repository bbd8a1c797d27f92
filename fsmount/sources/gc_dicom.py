"""DICOM image sets (AWS HealthImaging) as directories of `<SOPInstanceUID>.dcm` files.

A set's instances are listed by the image's `dicom/instances/` request when its directory is
first listed, never with its item. The same answer carries a request signed for each
instance (SigV4 headers, valid about 5 minutes), shared by all the set's files and asked for
again, once for all of them, when it grows old or HealthImaging refuses it (`Signer`).
"""

from __future__ import annotations

import dataclasses
import errno
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import trio
from cachetools import LRUCache

from fsmount.blob import RemoteBlob, SignedUrl
from fsmount.errors import FetchError
from fsmount.sources.gc_files import ParentItem, ValueNode
from fsmount.sources.gc_records import Image, Value
from fsmount.tree import Directory, Listing, safe_name

# HealthImaging refuses a SigV4 request arriving ~5 minutes after it was signed. Signatures are
# used for that long after they were asked for, less a margin for a slow start and the
# retries of a read (measured on our clock from the request, not from X-Amz-Date: a clock
# apart from the server's must not make every signature look old or young).
SIGNED_FOR = 300.0
SIGNATURE_MARGIN = 60.0
SIGNED_SETS_KEPT = 64  # image sets whose signed requests are kept (a CT series: ~1 KB a slice)


class SignedSets(Protocol):
    """Where a set's signed requests come from and are kept (grand_challenge.GrandChallenge)."""

    signed_sets: LRUCache[str, dict[str, SignedUrl]]

    async def instances(self, pk: str) -> dict[str, SignedUrl]: ...


class Signer:
    """The signed requests of one DICOM image set's instances, from one `dicom/instances/`
    answer shared by all of the set's files.

    HealthImaging signs every request of a set at once, when Grand Challenge answers, and AWS
    refuses them about five minutes later: they are used until `SIGNED_FOR` less
    `SIGNATURE_MARGIN` after they were asked for, or until HealthImaging refuses one of this
    answer's (`SignedUrl.refused`). Then the next file to need one asks again, and every other
    file waits for that one request (an answer is asked for by one task at a time).

    Answers are kept by the source for the few sets read from lately (`signed_sets`), not by
    every set ever listed: a walk of thousands of series must not keep a signed request per
    slice; a set whose answer was dropped asks again when one of its files is next read.
    """

    __slots__ = ("_asking", "_clock", "_generation", "_pk", "_source", "_until")

    def __init__(
        self, source: SignedSets, pk: str, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._source = source
        self._pk = pk
        self._clock = clock  # wall-clock seconds, as `SignedUrl.expires_at` is
        self._until = 0.0
        self._generation = 0
        self._asking: trio.Event | None = None

    async def instances(self) -> dict[str, SignedUrl]:
        """The current answer: asked for now if there is none, or it is too old to use."""
        while True:
            answer = self._source.signed_sets.get(self._pk)
            if answer is not None and self._clock() < self._until:
                return answer
            if self._asking is not None:
                await self._asking.wait()  # asked by another file: use it, or ask if it failed
                continue
            self._asking = asking = trio.Event()
            try:
                asked = self._clock()
                self._source.signed_sets[self._pk] = await self._source.instances(self._pk)
                self._until = asked + SIGNED_FOR - SIGNATURE_MARGIN
                self._generation += 1
            finally:
                self._asking = None
                asking.set()

    async def request(self, uid: str) -> SignedUrl:
        """The signed request for one instance, told back when HealthImaging refuses it."""
        signed = (await self.instances()).get(uid)
        if signed is None:
            raise FetchError(errno.ENOENT, f"image {self._pk}: instance {uid} is no longer listed")
        generation = self._generation
        return dataclasses.replace(
            signed, expires_at=self._until, refused=lambda: self._refused(generation)
        )

    def _refused(self, generation: int) -> None:
        """A request of answer `generation` was refused: that answer is spent (a later answer
        already stands for it otherwise)."""
        if generation == self._generation:
            self._until = 0.0


class ImageSetDirectory(Directory):
    """A DICOM image set: `<SOPInstanceUID>.dcm` per distinct instance, in listed order.

    Listed once, when first looked into: one `dicom/instances/` request, never a download
    (sizes come when a program asks, each by fetching that instance whole).
    """

    __slots__ = ("image", "item", "signer", "value")

    def __init__(
        self, name: str, item: ParentItem, value: Value, image: Image, signer: Signer
    ) -> None:
        super().__init__(name, mtime=item.mtime)
        self._listing = None
        self.item = item
        self.value = value
        self.image = image
        self.signer = signer

    def xattrs(self) -> Mapping[str, str]:
        return {
            **self.item.xattrs(),
            "socket": self.value.socket.slug,
            "relative-path": self.value.socket.relative_path,
            "image": self.image.pk,
            "image-set": str(self.image.image_set),
        }

    async def children(self) -> Listing:
        if self._listing is None:
            uids = list(await self.signer.instances())
            if self._listing is None:  # another lookup may have listed it meanwhile
                self.install([DicomFile(safe_name(f"{uid}.dcm", "_"), self, uid) for uid in uids])
        assert self._listing is not None
        return self._listing


class DicomFile(ValueNode):
    """One instance of a DICOM image set: its Part-10 bytes from HealthImaging."""

    __slots__ = ("image_set", "uid")

    def __init__(self, name: str, image_set: ImageSetDirectory, uid: str) -> None:
        super().__init__(name, image_set.item, image_set.value)
        self.image_set = image_set
        self.uid = uid

    def xattrs(self) -> Mapping[str, str]:
        directory = self.image_set
        return {
            **super().xattrs(),
            "image": directory.image.pk,
            "image-set": str(directory.image.image_set),
            "sop-instance-uid": self.uid,
        }

    @property
    def blob(self) -> RemoteBlob:
        """No size anywhere, maybe no Range: learned by a whole fetch into the cache, which
        is also why no walk ahead of a program guesses it (`costly_probe`)."""
        directory, uid = self.image_set, self.uid

        async def resolve() -> SignedUrl:
            return await directory.signer.request(uid)

        return RemoteBlob(
            key=f"gc:dicom:{uid}",
            resolve=resolve,
            description=f"grand-challenge {self._described(self.name)}",
            version=str(directory.image.image_set),
            costly_probe=True,
            whole_fetch=True,
        )
