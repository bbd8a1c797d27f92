"""Grand Challenge archives as tree nodes: archives -> items -> socket values -> Blobs.

Layout and names follow product.md, which follows the official client's "download archive
items" recipe except where that recipe is lossy. What never changes (image details) is kept in
the metadata store, so a remount lists without one request per image.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import trio

from fsmount.blob import InlineBlob, RemoteBlob, SignedUrl
from fsmount.cache.metadata import MetadataStore
from fsmount.errors import FetchError, StartupError
from fsmount.transfer import ApiClient, redact, url_expiry
from fsmount.tree import Directory, File, Node, PathBuilder, TreeContext, safe_name

log = logging.getLogger(__name__)

PAGE = 1000  # the API's maximum page size: fewest requests
IMAGE_SUFFIXES = frozenset({"mha", "tif", "tiff"})
LEGACY_SUFFIXES = frozenset({"mhd", "zraw", "raw"})
ROOT = "grand-challenge"
STARTUP_DEADLINE = 10.0  # seconds: a mount that cannot work must say so quickly


class GrandChallenge:
    """One Grand Challenge API, shown as `grand-challenge/<archive-slug>/<item-pk>/...`."""

    def __init__(
        self,
        api: ApiClient,
        ctx: TreeContext,
        metadata: MetadataStore,
        *,
        archives: list[str] | None = None,
    ) -> None:
        self._api = api
        self._ctx = ctx
        self._metadata = metadata
        self._only = archives or []
        self._image_limit = trio.CapacityLimiter(8)

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
        return Directory(
            ROOT,
            ROOT,
            self._ctx,
            loader=self._load_archives,
            xattrs={"source": "grand-challenge", "api": redact(self._api.base_url)},
        )

    async def _paged(self, path: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Every record of a listing, de-duplicated by pk (item pages have no stable order).

        When fewer distinct records than `count` arrived (the order moved between pages), the
        listing is read again, at most twice, to pick up what was skipped.
        """
        records: dict[str, dict[str, Any]] = {}
        count = 0
        for _ in range(3):
            offset = 0
            while True:
                page = await self._api.get_json(path, {**params, "limit": PAGE, "offset": offset})
                count = int(page.get("count", 0))
                for record in page.get("results", []):
                    if isinstance(record, dict) and "pk" in record:
                        records.setdefault(str(record["pk"]), record)
                offset += PAGE
                if offset >= count or not page.get("results") or not page.get("next"):
                    break
            if len(records) >= count:
                break
            log.info(
                "%s: %d of %d records seen; reading the listing again", path, len(records), count
            )
        return list(records.values())

    async def _load_archives(self, parent: Directory) -> list[Node]:
        if self._only:
            archives = []
            for slug in self._only:
                archives += await self._paged("archives/", {"slug": slug})
        else:
            archives = await self._paged("archives/", {})
        nodes: list[Node] = []
        for archive in archives:
            try:
                pk = str(archive["pk"])
                slug = urlsplit(archive["url"]).path.rstrip("/").rsplit("/", 1)[-1]
            except (KeyError, TypeError, AttributeError):
                log.warning("skipping a malformed archive record: %.200r", archive)
                continue
            name = safe_name(slug, pk)
            nodes.append(
                Directory(
                    name,
                    parent.child_path(name),
                    self._ctx,
                    loader=self._items_loader(pk, name),
                    xattrs={"archive": name, "archive-pk": pk, "title": archive.get("title", "")},
                )
            )
        return nodes

    def _items_loader(self, archive_pk: str, slug: str) -> Callable[[Directory], Any]:
        async def load(parent: Directory) -> list[Node]:
            items = await self._paged("archives/items/", {"archive": archive_pk})
            nodes: list[Node] = []
            for item in items:
                pk = str(item["pk"])
                nodes.append(
                    Directory(
                        pk,
                        parent.child_path(pk),
                        self._ctx,
                        loader=self._item_loader(item, slug),
                        xattrs={"archive": slug, "item": pk},
                    )
                )
            return nodes

        return load

    def _item_loader(self, item: dict[str, Any], slug: str) -> Callable[[Directory], Any]:
        async def load(parent: Directory) -> list[Node]:
            values = [v for v in item.get("values") or [] if isinstance(v, dict)]
            images: dict[str, dict[str, Any]] = {}

            async def fetch_image(url: str) -> None:
                async with self._image_limit:
                    images[url] = await self._image(url)

            async with trio.open_nursery() as nursery:
                for value in values:
                    if isinstance(value.get("image"), str) and value["image"] not in images:
                        images[value["image"]] = {}
                        nursery.start_soon(fetch_image, value["image"])

            builder = PathBuilder(parent, self._ctx)
            for value in values:
                try:
                    self._place(builder, value, images, slug, str(item["pk"]))
                except (KeyError, TypeError, ValueError, AttributeError):
                    log.warning("%s: skipping a malformed value: %.200r", parent.path, value)
            return builder.nodes()

        return load

    async def _image(self, url: str) -> dict[str, Any]:
        """Image details, which never change: from the metadata store when seen before."""
        key = f"gc:image:{url}"
        known = self._metadata.get(key)
        if known:
            return known
        image = await self._api.get_json(url)
        slim = {"pk": image["pk"], "files": image.get("files") or []}
        self._metadata.put(key, slim)
        return slim

    def _place(
        self,
        builder: PathBuilder,
        value: dict[str, Any],
        images: dict[str, dict[str, Any]],
        slug: str,
        item_pk: str,
    ) -> None:
        socket = value.get("interface") or value.get("socket")
        if not isinstance(socket, dict):
            raise ValueError("no socket")
        super_kind = str(socket.get("super_kind", "")).casefold()
        relative_path = socket["relative_path"]
        if not isinstance(relative_path, str):
            raise ValueError("relative_path is not a string")
        xattrs = {
            "archive": slug,
            "item": item_pk,
            "socket": str(socket.get("slug", "")),
            "kind": str(socket.get("kind", "")),
            "super-kind": str(socket.get("super_kind", "")),
        }
        what = f"socket {socket.get('slug')!r} (value {value.get('pk')})"
        if super_kind == "value":
            data = json.dumps(value.get("value"), indent=2).encode()
            builder.add_file(
                relative_path,
                lambda name, path: File(name, path, blob=InlineBlob(data), xattrs=xattrs),
                what,
            )
        elif super_kind == "file":
            blob = self._blob(
                f"gc:civ:{value['pk']}", value["file"], f"{slug}/{item_pk}/{relative_path}"
            )
            builder.add_file(
                relative_path, lambda name, path: File(name, path, blob=blob, xattrs=xattrs), what
            )
        elif super_kind == "image":
            image = images.get(value["image"]) or {}
            files = self._image_files(image, slug, item_pk, relative_path, xattrs)
            if files:
                builder.add_files_in(relative_path, files, what)
        else:
            log.warning("%s/%s: skipping %s: unknown super_kind", slug, item_pk, what)

    def _image_files(
        self,
        image: dict[str, Any],
        slug: str,
        item_pk: str,
        relative_path: str,
        xattrs: dict[str, str],
    ) -> list[tuple[str, Callable[[str, str], Node]]]:
        """`<image-pk>.<ext>` per stored file; DZI hidden; legacy MHD pairs keep stored names."""
        files: list[tuple[str, Callable[[str, str], Node]]] = []
        for image_file in image.get("files", []):
            url = image_file.get("file")
            if not isinstance(url, str) or image_file.get("image_type") == "DZI":
                continue
            stored = urlsplit(url).path.rsplit("/", 1)[-1]
            suffix = stored.rsplit(".", 1)[-1].lower() if "." in stored else ""
            if suffix in IMAGE_SUFFIXES:
                name = safe_name(f"{image['pk']}.{suffix}", f"{image_file['pk']}.{suffix}")
            elif suffix in LEGACY_SUFFIXES:
                name = safe_name(stored, f"{image['pk']}.{suffix}")
            else:
                continue
            described = "/".join(p for p in (slug, item_pk, relative_path, name) if p)
            blob = self._blob(f"gc:imagefile:{image_file['pk']}", url, described)
            attrs = {**xattrs, "image": str(image["pk"])}
            files.append(
                (name, lambda n, p, b=blob, a=attrs: File(n, p, blob=b, xattrs=a))  # type: ignore[misc]
            )
        return files

    def _blob(self, key: str, media_url: str, described: str) -> RemoteBlob:
        async def resolve() -> SignedUrl:
            target = await self._api.redirect_target(media_url)
            return SignedUrl(target, url_expiry(target))

        return RemoteBlob(key=key, resolve=resolve, description=f"grand-challenge {described}")
