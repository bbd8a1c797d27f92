"""Grand Challenge archives as tree nodes: archives -> items -> socket values -> Blobs.

Layout and names follow product.md, which follows the official client's "download archive
items" recipe except where that recipe is lossy.

Walking names costs listing pages only: an archive's items come from its items listing, and
the details of its images from one images listing filtered by archive (the API's
`cases/images/?archive=<pk>`), never one request per item or image. After the first page the
rest of a listing is fetched a few pages at once. Each record is cut down to what the tree
needs as soon as its page arrives (`_Item`, `_Value`, `_Image`), so a 100,000-item archive
costs tens of megabytes, not the raw JSON of every page; an item's directory tree is built
from its record when first listed. A path under an item of an archive that was never listed
costs that one item's request (and its images'), not the whole listing.

An image stored as a DICOM image set (AWS HealthImaging) is a directory of
`<SOPInstanceUID>.dcm` files listed by the image's `dicom/instances/` request when that
directory is first listed, never with its item. The same answer carries a request signed for
each instance (SigV4 headers, valid about 5 minutes), shared by all the set's files and asked
for again, once for all of them, when it grows old or HealthImaging refuses it (`_Signer`).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import trio
from cachetools import LRUCache

from fsmount.blob import RemoteBlob, RenderedBlob, SignedUrl
from fsmount.errors import FetchError, StartupError
from fsmount.transfer import ApiClient, redact, url_expiry
from fsmount.tree import (
    Directory,
    File,
    ListedDirectory,
    Listing,
    Node,
    PathBuilder,
    TreeContext,
    safe_name,
    split_relative_path,
)

log = logging.getLogger(__name__)

PAGE = 1000  # the API's maximum page size: fewest requests
PAGES_AT_ONCE = 4  # listing pages in flight after the first (which tells the count)
IMAGES_AT_ONCE = 8  # images fetched alone (added since the listing) in flight
SINGLES_BEFORE_LISTING = 64  # items looked up alone before the whole listing is cheaper
SINGLES_KEPT = 4096
IMAGE_SUFFIXES = frozenset({"mha", "tif", "tiff"})
LEGACY_SUFFIXES = frozenset({"mhd", "zraw", "raw"})
ROOT = "grand-challenge"
STARTUP_DEADLINE = 10.0  # seconds: a mount that cannot work must say so quickly
# HealthImaging refuses a SigV4 request arriving ~5 minutes after it was signed. Signatures are
# used for that long after they were asked for, less a margin for a slow start and the
# retries of a read (measured on our clock from the request, not from X-Amz-Date: a clock
# apart from the server's must not make every signature look old or young).
SIGNED_FOR = 300.0
SIGNATURE_MARGIN = 60.0
SIGNED_SETS_KEPT = 64  # image sets whose signed requests are kept (a CT series: ~1 KB a slice)
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

R = TypeVar("R")


# --------------------------------------------------------------------------- compact records


class _Socket:
    """What the tree needs of a socket; one object per distinct socket, shared by values.

    `parts` is the relative path split once (None if it is not in normal form): every item
    shares these strings.
    """

    __slots__ = ("kind", "parts", "relative_path", "slug", "super_kind")

    def __init__(self, slug: str, kind: str, super_kind: str, relative_path: str) -> None:
        self.slug = slug
        self.kind = kind
        self.super_kind = super_kind
        self.relative_path = relative_path
        self.parts = split_relative_path(relative_path)

    def where(self) -> str | tuple[str, ...]:
        """The parts, or the path as sent when it is not normal (to be refused, and said)."""
        return self.parts or self.relative_path


class _Value:
    """One socket value. `payload` is, by the socket's super_kind: the rendered JSON (bytes)
    of a Value, the packed `/media/` URL of a File (see `MediaUrls`), or an Image's pk."""

    __slots__ = ("payload", "pk", "socket")

    def __init__(self, socket: _Socket, pk: Any, payload: bytes | str | None) -> None:
        self.socket = socket
        self.pk = pk
        self.payload = payload

    def __str__(self) -> str:
        return f"socket {self.socket.slug!r} (value {self.pk})"


class _Item:
    __slots__ = ("pk", "values")

    def __init__(self, pk: str, values: tuple[_Value, ...]) -> None:
        self.pk = pk
        self.values = values


class _Image:
    """An image's stored files: (file pk, packed /media/ URL, image_type) each; or the id of
    its DICOM image set, whose instances are asked for when its directory is listed."""

    __slots__ = ("files", "image_set", "pk")

    def __init__(
        self,
        pk: str,
        files: tuple[tuple[str, str, str | None], ...],
        image_set: str | None = None,
    ) -> None:
        self.pk = pk
        self.files = files
        self.image_set = image_set


class MediaUrls:
    """`/media/` URLs kept small: as the few parts the server builds them from, when they are
    exactly what its storage layout gives (reference §2.3: `components/componentinterfacevalue/
    <hex>/<hex>/<civ pk>/<name>` and `images/<aa>/<bb>/<image pk>/<file pk>/<image pk>.<ext>`),
    else whole. A 100,000-item archive holds 300,000 of them; most shrink to nothing.
    """

    def __init__(self, api_url: str) -> None:
        self._media = urljoin(api_url, "/media/")

    def _file(self, pk: Any, name: str) -> str:
        code = hex(int(pk)) if isinstance(pk, int) else ""
        return (
            f"{self._media}components/componentinterfacevalue/{code[-4:-2]}/{code[-2:]}/{pk}/{name}"
        )

    def _image_file(self, image: str, file: str, suffix: str) -> str:
        return f"{self._media}images/{image[0:2]}/{image[2:4]}/{image}/{file}/{image}.{suffix}"

    def pack_file(self, url: str, pk: Any, name: str) -> str | None:
        return None if url == self._file(pk, name) else url

    def unpack_file(self, packed: str | None, pk: Any, name: str) -> str:
        return packed if packed is not None else self._file(pk, name)

    def pack_image_file(self, url: str, image: str, file: str) -> str:
        """The suffix alone (one of `_SUFFIXES`, shared) when the layout gives the URL."""
        suffix = url.rsplit(".", 1)[-1]
        known = _SUFFIXES.get(suffix)
        return known if known and url == self._image_file(image, file, known) else url

    def unpack_image_file(self, packed: str, image: str, file: str) -> str:
        return self._image_file(image, file, packed) if packed in _SUFFIXES else packed


_SUFFIXES = {s: s for s in ("mha", "tif", "tiff", "dzi", "mhd", "zraw", "raw")}


def _image_record(image: Mapping[str, Any], urls: MediaUrls) -> tuple[str, _Image] | None:
    try:
        pk = str(image["pk"])
        files = tuple(
            (
                str(f["pk"]),
                urls.pack_image_file(f["file"], pk, str(f["pk"])),
                _TYPES.get(f.get("image_type"), f.get("image_type")),
            )
            for f in image.get("files") or []
            if isinstance(f, dict) and isinstance(f.get("file"), str)
        )
        image_set = image.get("dicom_image_set")
        set_id = str(image_set["image_set_id"]) if image_set is not None else None
    except (KeyError, TypeError, AttributeError):
        log.warning("skipping a malformed image record: %.200r", image)
        return None
    return pk, _Image(pk, files, set_id)


_TYPES = {t: t for t in ("MHD", "TIFF", "DZI")}


def _image_pk(url: str) -> str:
    """The pk in a value's image hyperlink (`.../cases/images/<pk>/`)."""
    return url.partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


_compact = json.JSONEncoder(separators=(",", ":")).encode


# --------------------------------------------------------------------------- the source


class GrandChallenge:
    """One Grand Challenge API, shown as `grand-challenge/<archive-slug>/<item-pk>/...`."""

    def __init__(
        self, api: ApiClient, ctx: TreeContext, *, archives: list[str] | None = None
    ) -> None:
        self._api = api
        self._ctx = ctx
        self._only = archives or []
        self._image_limit = trio.CapacityLimiter(IMAGES_AT_ONCE)
        self._sockets: dict[tuple[Any, ...], _Socket] = {}
        # image pk -> its instances' signed requests, for the sets read from lately (`_Signer`)
        self.signed_sets: LRUCache[str, dict[str, SignedUrl]] = LRUCache(SIGNED_SETS_KEPT)
        self.urls = MediaUrls(api.base_url if api is not None else "https://grand-challenge.test/")

    async def check(self) -> None:
        """Fail before mounting on a bad token, an unreachable API or an unknown archive."""
        try:
            await self._api.get_json("archives/", {"limit": 1}, deadline=STARTUP_DEADLINE)
            for slug in self._only:
                page = await self._api.get_json(
                    "archives/", {"slug": slug, "limit": 1}, deadline=STARTUP_DEADLINE
                )
                if not page.get("results"):
                    raise StartupError(
                        f"Grand Challenge archive {slug!r} does not exist or this token cannot"
                        " see it"
                    )
        except FetchError as exc:
            raise StartupError(f"cannot use the Grand Challenge API: {exc}") from None

    def directory(self) -> Directory:
        return ListedDirectory(
            ROOT,
            self._ctx,
            loader=self._load_archives,
            xattrs={"source": "grand-challenge", "api": redact(self._api.base_url)},
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
        nodes: list[Node] = []
        for pk, archive in archives.items():
            try:
                slug = urlsplit(archive["url"]).path.rstrip("/").rsplit("/", 1)[-1]
            except (KeyError, TypeError, AttributeError):
                log.warning("skipping a malformed archive record: %.200r", archive)
                continue
            name = safe_name(slug, pk)
            xattrs = {"archive": name, "archive-pk": pk, "title": str(archive.get("title", ""))}
            nodes.append(ArchiveDirectory(name, self, pk, xattrs))
        return nodes

    # ----------------------------------------------------------------- records

    def item_record(self, item: Mapping[str, Any]) -> tuple[str, _Item] | None:
        """An item cut down to its values; a malformed value is logged and left out."""
        try:
            pk = str(item["pk"])
            raw_values = item.get("values") or []
        except (KeyError, TypeError, AttributeError):
            raw_values = None
        if not isinstance(raw_values, list):
            log.warning("skipping a malformed archive item: %.200r", item)
            return None
        values: list[_Value] = []
        for raw in raw_values:
            try:
                value = self._value(raw) if isinstance(raw, dict) else None
            except (TypeError, ValueError, AttributeError):  # fields of the wrong types
                value = None
            if value is None:
                log.warning("item %s: skipping a malformed value: %.200r", pk, raw)
            else:
                values.append(value)
        return pk, _Item(pk, tuple(values))

    def _value(self, raw: Mapping[str, Any]) -> _Value | None:
        socket = raw.get("interface") or raw.get("socket")
        if not isinstance(socket, dict) or not isinstance(socket.get("relative_path"), str):
            return None
        get = socket.get
        fields = (get("slug", ""), get("kind", ""), get("super_kind", ""), get("relative_path"))
        shared = self._sockets.get(fields)
        if shared is None:
            shared = self._sockets[fields] = _Socket(*map(str, fields))
        pk = raw.get("pk")
        super_kind = shared.super_kind.casefold()
        if super_kind == "value":  # kept compact (C encoder); `indent=2` when read
            return _Value(shared, pk, _compact(raw.get("value")))
        if super_kind == "file" and isinstance(raw.get("file"), str):
            name = shared.parts[-1] if shared.parts else ""
            return _Value(shared, pk, self.urls.pack_file(raw["file"], pk, name))
        if super_kind == "image" and isinstance(raw.get("image"), str):
            return _Value(shared, pk, _image_pk(raw["image"]))
        if super_kind in ("value", "file", "image"):
            return None
        return _Value(shared, pk, None)  # an unknown kind: left out (and said) when listed

    async def item_alone(self, pk: str, archive_pk: str) -> _Item | None:
        """One item by pk, if it is in that archive (a path opened before any listing)."""
        try:
            item = await self._api.get_json(f"archives/items/{pk}/")
        except FetchError as exc:
            if exc.errno == errno.ENOENT:  # no such item, or not one this token can see
                return None
            raise
        archive = str(item.get("archive", "")) if isinstance(item, dict) else ""
        if _image_pk(archive) != archive_pk:
            return None
        kept = self.item_record(item)
        return kept[1] if kept else None

    async def images_of(self, archive_pk: str) -> dict[str, _Image]:
        def keep(image: Mapping[str, Any]) -> tuple[str, _Image] | None:
            return _image_record(image, self.urls)

        return await self.listing("cases/images/", {"archive": archive_pk}, keep)

    async def image_alone(self, pk: str) -> _Image | None:
        async with self._image_limit:
            try:
                image = await self._api.get_json(f"cases/images/{pk}/")
            except FetchError as exc:
                log.warning("image %s: %s", pk, exc)
                return None
        kept = _image_record(image, self.urls) if isinstance(image, dict) else None
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
            target = await self._api.redirect_target(media_url)
            return SignedUrl(target, url_expiry(target))

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
        self._images: dict[str, _Image] = {}
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

    def known_image(self, pk: str) -> _Image | None:
        return self._images.get(pk)

    async def image(self, pk: str, listed: bool) -> _Image | None:
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

    def forget_images(self) -> None:
        """A new listing of the archive: image details are asked again with it when needed."""
        if self._images_loading is None or self._images_loading.is_set():
            self._images = {}
            self._images_loading = None


async def _list_archive(directory: ListedDirectory) -> Sequence[Node]:
    assert isinstance(directory, ArchiveDirectory)
    records = await directory.source.listing(
        "archives/items/", {"archive": directory._pk}, directory.source.item_record
    )
    directory.forget_images()
    return [ItemDirectory(record, directory) for record in records.values()]


class ItemDirectory(Directory):
    """One archive item; its tree is built from its record when first listed, and then kept
    (it only changes with a new listing of the archive, which brings new item nodes)."""

    __slots__ = ("archive", "record")

    def __init__(self, record: _Item, archive: ArchiveDirectory) -> None:
        super().__init__(record.pk)
        self._listing = None
        self.record = record
        self.archive = archive

    def _install(self, nodes: list[Node], ctx: TreeContext | None = None) -> Listing:
        return super()._install(nodes, self.archive._ctx)  # announces what it replaces

    def xattrs(self) -> Mapping[str, str]:
        return {"archive": self.archive.name, "item": self.record.pk}

    def fresh(self) -> Listing | None:
        return self.without_io()

    def forgotten(self) -> None:
        self._listing = None  # built again from the record, if it is ever looked into

    def without_io(self) -> Listing | None:
        """Built from the record when every image it names is known already."""
        if self._listing is None and all(map(self._known, self.record.values)):
            self._install(self._layout())
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
        return self._install(self._layout())  # an image that could not be had is left out

    def _known(self, value: _Value) -> bool:
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
                elif files := _image_files(self, value, image):
                    builder.add_files_in(socket.where(), files, value)
            else:
                log.warning("%s: skipping %s: unknown super_kind", self.path, value)
        return builder.nodes()

    def _add_image_set(self, builder: PathBuilder, value: _Value, image: _Image) -> None:
        """A DICOM image set's directory, listed when it is first looked into."""
        if not value.socket.parts:  # "" (the item itself) would cost a request per item
            log.warning("%s: skipping %s: an image set needs a directory", self.path, value)
            return
        make = lambda name: ImageSetDirectory(name, self, value, image)  # noqa: E731
        builder.add_file(value.socket.parts, make, value)


def _is_image(value: _Value) -> bool:
    return value.socket.super_kind.casefold() == "image" and isinstance(value.payload, str)


def _image_files(item: ItemDirectory, value: _Value, image: _Image) -> list[tuple[str, Any]]:
    """`<image-pk>.<ext>` per stored file; DZI hidden; legacy MHD pairs keep stored names."""
    urls = item.archive.source.urls
    files: list[tuple[str, Any]] = []
    for image_file in image.files:
        file_pk, packed, image_type = image_file
        if image_type == "DZI":
            continue
        url = urls.unpack_image_file(packed, image.pk, file_pk)
        stored = urlsplit(url).path.rsplit("/", 1)[-1]
        suffix = stored.rsplit(".", 1)[-1].lower() if "." in stored else ""
        if suffix in IMAGE_SUFFIXES:
            name = safe_name(f"{image.pk}.{suffix}", f"{file_pk}.{suffix}")
        elif suffix in LEGACY_SUFFIXES:
            name = safe_name(stored, f"{image.pk}.{suffix}")
        else:
            continue
        files.append((name, lambda n, f=image_file: ImageFile(n, item, value, image.pk, f)))
    return files


class _ValueNode(File):
    """A file of one item value: its blob and attributes come from the item's record."""

    __slots__ = ("item", "value")

    def __init__(self, name: str, item: ItemDirectory, value: _Value) -> None:
        super().__init__(name, mtime=item.mtime)
        self.item = item
        self.value = value

    def xattrs(self) -> Mapping[str, str]:
        socket = self.value.socket
        return {
            **self.item.xattrs(),
            "socket": socket.slug,
            "kind": socket.kind,
            "super-kind": socket.super_kind,
        }

    def _described(self, name: str) -> str:
        relative = self.value.socket.relative_path
        return "/".join(p for p in (self.item.archive.name, self.item.name, relative, name) if p)


class ValueFile(_ValueNode):
    """A Value socket: `json.dumps(value, indent=2)`, made from memory when asked."""

    __slots__ = ()

    @property
    def blob(self) -> RenderedBlob:
        return RenderedBlob(functools.partial(_indented, self.value.payload))


def _indented(compact: object) -> bytes:
    """`json.dumps(value, indent=2)` of the value kept as compact JSON: the same bytes, since
    parsing gives back the same keys in the same order and the same numbers (floats print
    as the shortest text that reads back the same)."""
    return json.dumps(json.loads(str(compact)), indent=2).encode()


class StoredFile(_ValueNode):
    """A File socket: the stored bytes behind its `/media/` URL."""

    __slots__ = ()

    @property
    def blob(self) -> RemoteBlob:
        value = self.value
        source = self.item.archive.source
        packed = value.payload if isinstance(value.payload, str) else None
        url = source.urls.unpack_file(packed, value.pk, self.name)
        return source.blob(f"gc:civ:{value.pk}", url, self._described(""))


class ImageFile(_ValueNode):
    """One stored file of an Image socket's image."""

    __slots__ = ("image", "stored")

    def __init__(
        self,
        name: str,
        item: ItemDirectory,
        value: _Value,
        image: str,
        stored: tuple[str, str, str | None],
    ) -> None:
        super().__init__(name, item, value)
        self.image = image
        self.stored = stored

    def xattrs(self) -> Mapping[str, str]:
        return {**super().xattrs(), "image": self.image}

    @property
    def blob(self) -> RemoteBlob:
        file_pk, packed, _ = self.stored
        source = self.item.archive.source
        url = source.urls.unpack_image_file(packed, self.image, file_pk)
        return source.blob(f"gc:imagefile:{file_pk}", url, self._described(self.name))


class _Signer:
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

    __slots__ = ("_asking", "_generation", "_pk", "_source", "_until")

    def __init__(self, source: GrandChallenge, pk: str) -> None:
        self._source = source
        self._pk = pk
        self._until = 0.0
        self._generation = 0
        self._asking: trio.Event | None = None

    async def instances(self) -> dict[str, SignedUrl]:
        """The current answer: asked for now if there is none, or it is too old to use."""
        while True:
            answer = self._source.signed_sets.get(self._pk)
            if answer is not None and time.time() < self._until:
                return answer
            if self._asking is not None:
                await self._asking.wait()  # asked by another file: use it, or ask if it failed
                continue
            self._asking = asking = trio.Event()
            try:
                asked = time.time()
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

    def __init__(self, name: str, item: ItemDirectory, value: _Value, image: _Image) -> None:
        super().__init__(name, mtime=item.mtime)
        self._listing = None
        self.item = item
        self.value = value
        self.image = image
        self.signer = _Signer(item.archive.source, image.pk)

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
                self._install([DicomFile(safe_name(f"{uid}.dcm", "_"), self, uid) for uid in uids])
        assert self._listing is not None
        return self._listing


class DicomFile(_ValueNode):
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
