"""Grand Challenge archives as tree nodes: archives -> items -> socket values -> Blobs.

Layout and names follow product.md, which follows the official client's "download archive
items" recipe except where that recipe is lossy.

Walking names costs listing pages only: an archive's items come from its items listing, and
the details of its images from one images listing filtered by archive (the API's
`cases/images/?archive=<pk>`), never one request per item or image. After the first page the
rest of a listing is fetched a few pages at once. Each record is cut down to what the tree
needs as soon as its page arrives (gc_records.py); an item's directory tree is built from its
record when first listed, its files by gc_files.py and its DICOM image sets by gc_dicom.py. A
path under an item of an archive that was never listed costs that one item's request (and its
images'), not the whole listing.
"""

from __future__ import annotations

import errno
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import trio
from cachetools import LRUCache

from fsmount.blob import RemoteBlob, SignedUrl
from fsmount.config import Config, grand_challenge_token_source
from fsmount.errors import FetchError, StartupError
from fsmount.sources.base import Connect, signed_url, source_xattrs, startup_get
from fsmount.sources.gc_dicom import SIGNED_SETS_KEPT, ImageSetDirectory, Signer
from fsmount.sources.gc_files import MediaSource, StoredFile, ValueFile, image_files
from fsmount.sources.gc_records import Image, Item, MediaUrls, Records, Value, image_pk
from fsmount.transfer import ApiClient
from fsmount.tree import (
    Directory,
    ListedDirectory,
    Listing,
    Node,
    PathBuilder,
    TreeContext,
    safe_name,
)

log = logging.getLogger(__name__)

PAGE = 1000  # the API's maximum page size: fewest requests
PAGES_AT_ONCE = 4  # listing pages in flight after the first (which tells the count)
IMAGES_AT_ONCE = 8  # images fetched alone (added since the listing) in flight
SINGLES_BEFORE_LISTING = 64  # items looked up alone before the whole listing is cheaper
SINGLES_KEPT = 4096
ROOT = "grand-challenge"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

R = TypeVar("R")


# --------------------------------------------------------------------------- the source


def from_config(cfg: Config, connect: Connect, ctx: TreeContext) -> GrandChallenge | None:
    """The Grand Challenge API of the configuration, if it has a token (a Bearer token)."""
    token = grand_challenge_token_source(cfg)
    if token is None:
        return None
    api = connect(
        cfg.grand_challenge_url, lambda: {"Authorization": f"Bearer {token()}"}, "grand-challenge"
    )
    return GrandChallenge(api, ctx, archives=list(cfg.archive))


class GrandChallenge:
    """One Grand Challenge API, shown as `grand-challenge/<archive-slug>/<item-pk>/...`."""

    def __init__(
        self, api: ApiClient, ctx: TreeContext, *, archives: list[str] | None = None
    ) -> None:
        self._api = api
        self._ctx = ctx
        self._only = archives or []
        self._image_limit = trio.CapacityLimiter(IMAGES_AT_ONCE)
        # image pk -> its instances' signed requests, for the sets read from lately (`Signer`)
        self.signed_sets: LRUCache[str, dict[str, SignedUrl]] = LRUCache(SIGNED_SETS_KEPT)
        self.urls = MediaUrls(api.base_url if api is not None else "https://grand-challenge.test/")
        self.records = Records(self.urls)

    async def check(self) -> None:
        """Fail before mounting on a bad token, an unreachable API or an unknown archive."""
        await startup_get(self._api, "Grand Challenge", "archives/", {"limit": 1})
        for slug in self._only:
            page = await startup_get(
                self._api, "Grand Challenge", "archives/", {"slug": slug, "limit": 1}
            )
            if not page.get("results"):
                raise StartupError(
                    f"Grand Challenge archive {slug!r} does not exist or this token cannot see it"
                )

    def directory(self) -> Directory:
        return ListedDirectory(
            ROOT,
            self._ctx,
            loader=self._load_archives,
            xattrs=source_xattrs("grand-challenge", self._api),
        )

    # ----------------------------------------------------------------- listings

    async def listing(
        self, path: str, params: dict[str, Any], keep: Callable[[Any], tuple[str, R] | None]
    ) -> dict[str, R]:
        """Every record of a listing, cut down by `keep` as its page arrives, by pk.

        Pages after the first (which tells the count) are asked a few at once. Records are
        de-duplicated by pk: item pages have no stable order, so a record can show on two
        pages while another shows on none; when fewer distinct records than `count` arrived,
        the listing is read again, at most twice, to pick up what was skipped.
        """
        records: dict[str, R] = {}
        limit = trio.CapacityLimiter(PAGES_AT_ONCE)

        async def page_at(offset: int) -> int:
            async with limit:
                page = await self._api.get_json(path, {**params, "limit": PAGE, "offset": offset})
            for record in page.get("results") or []:
                kept = keep(record) if isinstance(record, dict) else None
                if kept is not None:
                    records.setdefault(kept[0], kept[1])
            return int(page.get("count", 0))

        count = 0
        for _ in range(3):
            count = await page_at(0)
            async with trio.open_nursery() as nursery:
                for offset in range(PAGE, count, PAGE):
                    nursery.start_soon(page_at, offset)
            if len(records) >= count:
                break
            log.info("%s: %d of %d records seen; reading it again", path, len(records), count)
        return records

    async def _load_archives(self, parent: ListedDirectory) -> list[Node]:
        def keep(archive: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
            return (str(archive["pk"]), archive) if "pk" in archive else None

        archives: dict[str, dict[str, Any]] = {}
        for slug in self._only or [None]:
            params = {"slug": slug} if slug else {}
            archives.update(await self.listing("archives/", params, keep))
        # An archive still there keeps its directory, and with it the listing of its items
        # (which has a TTL of its own): a refresh of this list costs no archive a new listing.
        before = {
            (node._pk, node.name): node
            for node in (parent.cached() or Listing([])).nodes
            if isinstance(node, ArchiveDirectory)
        }
        nodes: list[Node] = []
        for pk, archive in archives.items():
            try:
                slug = urlsplit(archive["url"]).path.rstrip("/").rsplit("/", 1)[-1]
            except (KeyError, TypeError, AttributeError):
                log.warning("skipping a malformed archive record: %.200r", archive)
                continue
            name = safe_name(slug, pk)
            xattrs = {"archive": name, "archive-pk": pk, "title": str(archive.get("title", ""))}
            kept = before.get((pk, name))
            if kept is None or kept.xattrs() != xattrs:  # new, or its title changed
                kept = ArchiveDirectory(name, self, pk, xattrs)
            nodes.append(kept)
        return nodes

    async def item_alone(self, pk: str, archive_pk: str) -> Item | None:
        """One item by pk, if it is in that archive (a path opened before any listing)."""
        try:
            item = await self._api.get_json(f"archives/items/{pk}/")
        except FetchError as exc:
            if exc.errno == errno.ENOENT:  # no such item, or not one this token can see
                return None
            raise
        archive = str(item.get("archive", "")) if isinstance(item, dict) else ""
        if image_pk(archive) != archive_pk:
            return None
        kept = self.records.item(item)
        return kept[1] if kept else None

    async def images_of(self, archive_pk: str) -> dict[str, Image]:
        return await self.listing("cases/images/", {"archive": archive_pk}, self.records.image)

    async def image_alone(self, pk: str) -> Image | None:
        async with self._image_limit:
            try:
                image = await self._api.get_json(f"cases/images/{pk}/")
            except FetchError as exc:
                log.warning("image %s: %s", pk, exc)
                return None
        kept = self.records.image(image) if isinstance(image, dict) else None
        return kept[1] if kept else None

    async def instances(self, pk: str) -> dict[str, SignedUrl]:
        """An image's DICOM instances, each once, in the order listed, with its signed request
        (`expires_at` 0: the caller knows when it was asked). A malformed entry is logged and
        left out; an instance listed once per frame shows once."""
        answer = await self._api.get_json(f"cases/images/{pk}/dicom/instances/")
        found: dict[str, SignedUrl] = {}
        entries = answer.get("instances") if isinstance(answer, dict) else None
        for entry in entries if isinstance(entries, list) else []:
            try:
                uid = str(entry["sop_instance_uid"])
                request = entry["get_instance"]
                headers = {str(k): str(v) for k, v in request["headers"].items()}
                signed = SignedUrl(str(request["url"]), 0.0, str(request["method"]), headers)
                if request.get("data") is not None:
                    raise TypeError("a request body")  # gcapi sends none either
            except (KeyError, TypeError, AttributeError) as exc:
                log.warning("image %s: skipping a malformed instance (%s)", pk, exc)
                continue
            found.setdefault(uid, signed)
        return found

    def blob(self, key: str, media_url: str, described: str) -> RemoteBlob:
        """Bytes behind a `/media/` URL, which redirects to a signed storage URL."""

        async def resolve() -> SignedUrl:
            return signed_url(await self._api.redirect_target(media_url))

        return RemoteBlob(key=key, resolve=resolve, description=f"grand-challenge {described}")


# --------------------------------------------------------------------------- the tree


class ArchiveDirectory(ListedDirectory):
    """An archive: its items, listed whole on first use, or looked up one by one before."""

    __slots__ = ("_images", "_images_loading", "_pk", "_singles", "_singles_asked", "source")

    def __init__(
        self, name: str, source: GrandChallenge, pk: str, xattrs: Mapping[str, str]
    ) -> None:
        super().__init__(name, source._ctx, loader=_list_archive, xattrs=xattrs)
        self.source = source
        self._pk = pk
        self._images: dict[str, Image] = {}
        self._images_loading: trio.Event | None = None
        self._singles: LRUCache[str, ItemDirectory] = LRUCache(maxsize=SINGLES_KEPT)
        self._singles_asked = 0

    async def child(self, name: str) -> Node | None:
        if self.cached() is not None:
            self._singles.clear()  # the listing's nodes stand for them now
            return await super().child(name)
        if not _UUID.fullmatch(name):
            return None  # item directories are named by their pks
        # Never listed: a script opening `ARCHIVE/<item-pk>/...` from a CSV costs that item.
        single = self._singles.get(name)
        if single is None:
            record = await self.source.item_alone(name, self._pk)
            if record is None:
                return None
            single = self._singles[name] = ItemDirectory(record, self)
            single.parent = self
            single.mtime = self._ctx.first_seen_many([single.path])[single.path]
            self._singles_asked += 1
            if self._singles_asked == SINGLES_BEFORE_LISTING:
                trio.lowlevel.spawn_system_task(self._list_behind)
        return single

    async def _list_behind(self) -> None:
        """Many items were opened one by one: the listing is now cheaper than going on."""
        try:
            await self.children()
        except Exception as exc:
            log.warning("%s: listing in the background failed: %s", self.path, exc)

    def _previous(self, name: str) -> Node | None:
        return super()._previous(name) or self._singles.get(name)

    def known_image(self, pk: str) -> Image | None:
        return self._images.get(pk)

    async def image(self, pk: str, listed: bool) -> Image | None:
        """An image's details: from the archive's images listing (fetched once, when an item
        of a listed archive first needs one), or alone when the listing lacks it."""
        image = self._images.get(pk)
        if image is None and listed:
            await self._load_images()
            image = self._images.get(pk)
        if image is None:
            image = await self.source.image_alone(pk)
            if image is not None:
                self._images[pk] = image
        return image

    async def _load_images(self) -> None:
        if self._images_loading is not None:
            await self._images_loading.wait()
            return
        self._images_loading = loading = trio.Event()
        try:
            self._images.update(await self.source.images_of(self._pk))
        except BaseException:
            self._images_loading = None  # the next item to need an image asks again
            raise
        finally:
            loading.set()

    async def prefetch_images(self) -> None:
        """`_load_images` as a task of its own, which must not raise: an item that needs an
        image after a failure asks again (and reports it)."""
        try:
            await self._load_images()
        except Exception as exc:
            log.info("%s: the images listing failed (asked again when needed): %s", self.path, exc)

    def forget_images(self) -> None:
        """A new listing of the archive: image details are asked again with it when needed."""
        if self._images_loading is None or self._images_loading.is_set():
            self._images = {}
            self._images_loading = None


async def _list_archive(directory: ListedDirectory) -> Sequence[Node]:
    """The items; the images listing is asked for at the same time, in the background: a walk
    needs it as soon as it enters the first item, and its pages then overlap the items'."""
    assert isinstance(directory, ArchiveDirectory)
    directory.forget_images()
    trio.lowlevel.spawn_system_task(directory.prefetch_images)
    records = await directory.source.listing(
        "archives/items/", {"archive": directory._pk}, directory.source.records.item
    )
    return [ItemDirectory(record, directory) for record in records.values()]


class ItemDirectory(Directory):
    """One archive item; its tree is built from its record when first listed, and then kept
    (it only changes with a new listing of the archive, which brings new item nodes)."""

    __slots__ = ("archive", "record")

    def __init__(self, record: Item, archive: ArchiveDirectory) -> None:
        super().__init__(record.pk)
        self._listing = None
        self.record = record
        self.archive = archive

    def install(self, nodes: list[Node], ctx: TreeContext | None = None) -> Listing:
        return super().install(nodes, self.archive._ctx)  # announces what it replaces

    def xattrs(self) -> Mapping[str, str]:
        return {"archive": self.archive.name, "item": self.record.pk}

    @property
    def archive_name(self) -> str:
        return self.archive.name

    @property
    def source(self) -> MediaSource:
        return self.archive.source

    def fresh(self) -> Listing | None:
        return self.without_io()

    def forgotten(self) -> None:
        self._listing = None  # built again from the record, if it is ever looked into

    def without_io(self) -> Listing | None:
        """Built from the record when every image it names is known already."""
        if self._listing is None and all(map(self._known, self.record.values)):
            self.install(self._layout())
        return self._listing

    async def children(self) -> Listing:
        listing = self.without_io()
        if listing is not None:
            return listing
        listed = self.archive.cached() is not None
        async with trio.open_nursery() as nursery:
            for value in self.record.values:
                if not self._known(value):
                    nursery.start_soon(self.archive.image, str(value.payload), listed)
        return self.install(self._layout())  # an image that could not be had is left out

    def _known(self, value: Value) -> bool:
        return not _is_image(value) or self.archive.known_image(str(value.payload)) is not None

    def _layout(self) -> list[Node]:
        builder = PathBuilder(self)
        for value in self.record.values:
            socket = value.socket
            super_kind = socket.super_kind.casefold()
            if super_kind == "value":
                builder.add_file(socket.where(), lambda n, v=value: ValueFile(n, self, v), value)
            elif super_kind == "file":
                builder.add_file(socket.where(), lambda n, v=value: StoredFile(n, self, v), value)
            elif super_kind == "image":
                image = self.archive.known_image(str(value.payload))
                if image is None:
                    log.warning("%s: skipping %s: its image is unknown", self.path, value)
                elif image.image_set is not None:
                    self._add_image_set(builder, value, image)
                elif files := image_files(self, value, image):
                    builder.add_files_in(socket.where(), files, value)
            else:
                log.warning("%s: skipping %s: unknown super_kind", self.path, value)
        return builder.nodes()

    def _add_image_set(self, builder: PathBuilder, value: Value, image: Image) -> None:
        """A DICOM image set's directory, listed when it is first looked into."""
        if not value.socket.parts:  # "" (the item itself) would cost a request per item
            log.warning("%s: skipping %s: an image set needs a directory", self.path, value)
            return

        def make(name: str) -> ImageSetDirectory:
            signer = Signer(self.archive.source, image.pk)
            return ImageSetDirectory(name, self, value, image, signer)

        builder.add_file(value.socket.parts, make, value)


def _is_image(value: Value) -> bool:
    return value.socket.super_kind.casefold() == "image" and isinstance(value.payload, str)
