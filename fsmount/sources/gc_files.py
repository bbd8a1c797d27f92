"""The files an item's values become: a Value's JSON, a File's stored bytes, an Image's files.

Each file is made from the item's compact record when the item is first listed, and asks the
source for its bytes only when read. DICOM image sets, which are directories, are
gc_dicom.py's.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Protocol
from urllib.parse import urlsplit

from fsmount.blob import RemoteBlob, RenderedBlob
from fsmount.sources.gc_records import Image, MediaUrls, Value
from fsmount.tree import File, Make, safe_name

IMAGE_SUFFIXES = frozenset({"mha", "tif", "tiff"})
LEGACY_SUFFIXES = frozenset({"mhd", "zraw", "raw"})


class MediaSource(Protocol):
    """What the files need of their source (grand_challenge.GrandChallenge)."""

    urls: MediaUrls

    def blob(self, key: str, media_url: str, described: str) -> RemoteBlob: ...


class ParentItem(Protocol):
    """What the files of a value need of their item (grand_challenge.ItemDirectory)."""

    name: str
    mtime: float | None

    @property
    def archive_name(self) -> str: ...

    @property
    def source(self) -> MediaSource: ...

    def xattrs(self) -> Mapping[str, str]: ...


class ValueNode(File):
    """A file of one item value: its blob and attributes come from the item's record."""

    __slots__ = ("item", "value")

    def __init__(self, name: str, item: ParentItem, value: Value) -> None:
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
        return "/".join(p for p in (self.item.archive_name, self.item.name, relative, name) if p)


class ValueFile(ValueNode):
    """A Value socket: `json.dumps(value, indent=2)`, made from memory when asked."""

    __slots__ = ()

    @property
    def blob(self) -> RenderedBlob:
        return RenderedBlob(functools.partial(indented, self.value.payload))


def indented(compact: object) -> bytes:
    """`json.dumps(value, indent=2)` of the value kept as compact JSON: the same bytes, since
    parsing gives back the same keys in the same order and the same numbers (floats print
    as the shortest text that reads back the same)."""
    return json.dumps(json.loads(str(compact)), indent=2).encode()


class StoredFile(ValueNode):
    """A File socket: the stored bytes behind its `/media/` URL."""

    __slots__ = ()

    @property
    def blob(self) -> RemoteBlob:
        value = self.value
        source = self.item.source
        packed = value.payload if isinstance(value.payload, str) else None
        url = source.urls.unpack_file(packed, value.pk, self.name)
        return source.blob(f"gc:civ:{value.pk}", url, self._described(""))


class ImageFile(ValueNode):
    """One stored file of an Image socket's image."""

    __slots__ = ("image", "stored")

    def __init__(
        self,
        name: str,
        item: ParentItem,
        value: Value,
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
        source = self.item.source
        url = source.urls.unpack_image_file(packed, self.image, file_pk)
        return source.blob(f"gc:imagefile:{file_pk}", url, self._described(self.name))


def image_files(item: ParentItem, value: Value, image: Image) -> list[tuple[str, Make]]:
    """`<image-pk>.<ext>` per stored file; DZI hidden; legacy MHD pairs keep stored names."""
    urls = item.source.urls
    files: list[tuple[str, Make]] = []
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
