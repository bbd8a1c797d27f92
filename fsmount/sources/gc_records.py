"""Grand Challenge records cut down to what the tree needs, as soon as their page arrives.

A 100,000-item archive costs tens of megabytes this way, not the raw JSON of every page: an
item keeps its values, a value its payload and a shared socket, an image its stored files;
`/media/` URLs shrink to nothing when the server's storage layout gives them (`MediaUrls`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import urljoin

from fsmount.tree import split_relative_path

log = logging.getLogger(__name__)


class Socket:
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


class Value:
    """One socket value. `payload` is, by the socket's super_kind: the rendered JSON (bytes)
    of a Value, the packed `/media/` URL of a File (see `MediaUrls`), or an Image's pk."""

    __slots__ = ("payload", "pk", "socket")

    def __init__(self, socket: Socket, pk: Any, payload: bytes | str | None) -> None:
        self.socket = socket
        self.pk = pk
        self.payload = payload

    def __str__(self) -> str:
        return f"socket {self.socket.slug!r} (value {self.pk})"


class Item:
    __slots__ = ("pk", "values")

    def __init__(self, pk: str, values: tuple[Value, ...]) -> None:
        self.pk = pk
        self.values = values


class Image:
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


class Records:
    """Cuts items and images down as their pages arrive (the source's `listing` keeps them).

    A socket is kept once, however many items' values name it.
    """

    def __init__(self, urls: MediaUrls) -> None:
        self.urls = urls
        self._sockets: dict[tuple[Any, ...], Socket] = {}

    def item(self, item: Mapping[str, Any]) -> tuple[str, Item] | None:
        """An item cut down to its values; a malformed value is logged and left out."""
        try:
            pk = str(item["pk"])
            raw_values = item.get("values") or []
        except (KeyError, TypeError, AttributeError):
            raw_values = None
        if not isinstance(raw_values, list):
            log.warning("skipping a malformed archive item: %.200r", item)
            return None
        values: list[Value] = []
        for raw in raw_values:
            try:
                value = self._value(raw) if isinstance(raw, dict) else None
            except (TypeError, ValueError, AttributeError):  # fields of the wrong types
                value = None
            if value is None:
                log.warning("item %s: skipping a malformed value: %.200r", pk, raw)
            else:
                values.append(value)
        return pk, Item(pk, tuple(values))

    def _value(self, raw: Mapping[str, Any]) -> Value | None:
        socket = raw.get("interface") or raw.get("socket")
        if not isinstance(socket, dict) or not isinstance(socket.get("relative_path"), str):
            return None
        get = socket.get
        fields = (get("slug", ""), get("kind", ""), get("super_kind", ""), get("relative_path"))
        shared = self._sockets.get(fields)
        if shared is None:
            shared = self._sockets[fields] = Socket(*map(str, fields))
        pk = raw.get("pk")
        super_kind = shared.super_kind.casefold()
        if super_kind == "value":  # kept compact (C encoder); `indent=2` when read
            return Value(shared, pk, _compact(raw.get("value")))
        if super_kind == "file" and isinstance(raw.get("file"), str):
            name = shared.parts[-1] if shared.parts else ""
            return Value(shared, pk, self.urls.pack_file(raw["file"], pk, name))
        if super_kind == "image" and isinstance(raw.get("image"), str):
            return Value(shared, pk, image_pk(raw["image"]))
        if super_kind in ("value", "file", "image"):
            return None
        return Value(shared, pk, None)  # an unknown kind: left out (and said) when listed

    def image(self, image: Mapping[str, Any]) -> tuple[str, Image] | None:
        try:
            pk = str(image["pk"])
            files = tuple(
                (
                    str(f["pk"]),
                    self.urls.pack_image_file(f["file"], pk, str(f["pk"])),
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
        return pk, Image(pk, files, set_id)


_TYPES = {t: t for t in ("MHD", "TIFF", "DZI")}


def image_pk(url: str) -> str:
    """The pk in a value's image hyperlink (`.../cases/images/<pk>/`)."""
    return url.partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


_compact = json.JSONEncoder(separators=(",", ":")).encode
