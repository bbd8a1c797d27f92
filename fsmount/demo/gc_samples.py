"""The sample archives behind the fake Grand Challenge, and the tree fsmount must show for them.

Everything is deterministic (UUIDv5 pks, fixed timestamps, generated pixels) so that a test, a
benchmark and `fsmount demo` all see the same data, and a cache kept across runs stays valid.
The files are real enough to open: MetaImage that SimpleITK reads, a TIFF Pillow wrote, a PDF,
zlib-compressed legacy `.mhd`/`.zraw` pairs. Files of several GiB are generated on the fly from
`content.pattern`, never stored.

`SampleData.expected_tree` is the oracle the kernel tests compare a mount with. It follows
product.md from the sample model alone and shares no code with fsmount, so a bug in fsmount's
tree rules cannot hide itself by also living in the oracle.
"""

from __future__ import annotations

import array
import hashlib
import io
import json
import math
import sys
import threading
import uuid
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image as PILImage

from fsmount.demo.content import pattern
from fsmount.demo.dicom_samples import DicomInstance, ct_series, slide_instance, slide_label

_NAMESPACE = uuid.UUID("7d3a6c1e-2f0b-4a51-9c4e-6b1f0e2d9a10")
STORED_AT = 1_717_236_000  # 2024-06-01T10:00:00Z: Last-Modified of the first stored object
HUGE_SIZE = 3 * 1024**3
COHORT_SIZE = 1_050


def uid(*parts: object) -> str:
    """A stable UUID string for a sample object, so pks survive restarts."""
    return str(uuid.uuid5(_NAMESPACE, "/".join(map(str, parts))))


# --------------------------------------------------------------------------- bytes


@dataclass(frozen=True)
class Payload:
    """A byte sequence of known size that can be read at any offset without being held whole.

    `last_modified` is the storage's time for stored objects and None for rendered values,
    which have no service time.
    """

    size: int
    read: Callable[[int, int], bytes]  # (offset, length) -> at most length bytes
    last_modified: float | None = None

    @classmethod
    def of(cls, data: bytes, last_modified: float | None = None) -> Payload:
        return cls(len(data), lambda offset, length: data[offset : offset + length], last_modified)

    @classmethod
    def generated(cls, seed: int, size: int, last_modified: float) -> Payload:
        def read(offset: int, length: int) -> bytes:
            return pattern(seed, offset, min(length, size - offset))

        return cls(size, read, last_modified)

    def bytes(self) -> bytes:
        """The whole content; meant for small files only."""
        return self.read(0, self.size)


ExpectedFile = Payload  # what the oracle maps each path to


@dataclass(frozen=True)
class StoredObject:
    """An object in protected storage, with the metadata S3/CloudFront would send."""

    key: str
    payload: Payload
    content_type: str
    etag: str


_CONTENT_TYPES = {
    "json": "application/json",
    "pdf": "application/pdf",
    "csv": "text/csv",
    "zip": "application/zip",
    "tif": "image/tiff",
    "tiff": "image/tiff",
}


def _stored(key: str, payload: Payload, etag_source: bytes) -> StoredObject:
    """Content type as django-storages guesses it from the name, unknown ones octet-stream."""
    content_type = _CONTENT_TYPES.get(key.rsplit(".", 1)[-1], "application/octet-stream")
    return StoredObject(key, payload, content_type, hashlib.md5(etag_source).hexdigest())


# --------------------------------------------------------------------------- file formats


def _voxels(typecode: str, values: Iterable[int]) -> bytes:
    data = array.array(typecode, values)
    if sys.byteorder == "big":
        data.byteswap()  # MetaImage files here declare little-endian data
    return data.tobytes()


def _phantom(seed: int, width: int, height: int, depth: int) -> list[int]:
    """A CT-like int16 phantom: air, an elliptic body, a bright rim and one lesion per seed."""
    cx, cy = width / 2, height / 2
    lx, ly, lz = 8 + seed % 12, 10 + seed % 9, depth // 2
    out = []
    for z in range(depth):
        for y in range(height):
            for x in range(width):
                r = math.hypot((x - cx) / (0.45 * width), (y - cy) / (0.38 * height))
                value = -1000 if r > 1 else (400 if r > 0.9 else 40 + (x * 7 + y * 3 + z) % 30)
                if (x - lx) ** 2 + (y - ly) ** 2 + 4 * (z - lz) ** 2 < 9:
                    value = 120
                out.append(value)
    return out


def _metaimage_header(dims: tuple[int, int, int], element: str, data_file: str, extra: str) -> str:
    return (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        f"{extra}TransformMatrix = 1 0 0 0 1 0 0 0 1\nOffset = -10.5 -10.5 0\n"
        "CenterOfRotation = 0 0 0\nAnatomicalOrientation = RAI\n"
        "ElementSpacing = 0.68 0.68 1.25\n"
        f"DimSize = {dims[0]} {dims[1]} {dims[2]}\nElementType = {element}\n"
        f"ElementDataFile = {data_file}\n"
    )


def mha_ct(seed: int, dims: tuple[int, int, int] = (32, 32, 8)) -> bytes:
    """A single-file MetaImage (`ElementDataFile = LOCAL`), as panimg stores every 3D image."""
    header = _metaimage_header(dims, "MET_SHORT", "LOCAL", "CompressedData = False\n")
    return header.encode() + _voxels("h", _phantom(seed, *dims))


def mha_segmentation(seed: int, dims: tuple[int, int, int] = (32, 32, 8)) -> bytes:
    """A uint8 label map matching `mha_ct(seed)`: 0 outside, 1 body, 2 lesion."""
    labels = [0 if v == -1000 else (2 if v == 120 else 1) for v in _phantom(seed, *dims)]
    header = _metaimage_header(dims, "MET_UCHAR", "LOCAL", "CompressedData = False\n")
    return header.encode() + _voxels("B", labels)


def legacy_mhd_pair(seed: int, data_name: str) -> tuple[bytes, bytes]:
    """A detached MetaImage header and its zlib data file, as legacy uploads were stored.

    The header names `data_name`, which is why the pair must keep its stored basenames.
    """
    dims = (32, 32, 8)
    compressed = zlib.compress(_voxels("h", _phantom(seed, *dims)), 6)
    extra = f"CompressedData = True\nCompressedDataSize = {len(compressed)}\n"
    return _metaimage_header(dims, "MET_SHORT", data_name, extra).encode(), compressed


def tiff_slide(seed: int, width: int = 64, height: int = 48) -> bytes:
    """A small RGB TIFF (an H&E-looking gradient), written by Pillow."""
    image = PILImage.new("RGB", (width, height))
    image.putdata(
        [
            (200 + (x * seed) % 55, 120 + (y * 3) % 80, 180 + (x + y) % 60)
            for y in range(height)
            for x in range(width)
        ]
    )
    out = io.BytesIO()
    image.save(out, format="TIFF")
    return out.getvalue()


def dzi_descriptor(width: int = 64, height: int = 48) -> bytes:
    """The Deep Zoom XML panimg writes next to a TIFF (its tiles are never served)."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="jpeg" Overlap="1" '
        f'TileSize="254"><Size Height="{height}" Width="{width}"/></Image>\n'
    ).encode()


def pdf_report(text: str) -> bytes:
    """A one-page PDF with a valid cross-reference table."""
    stream = f"BT /F1 14 Tf 72 720 Td ({text}) Tj ET".encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Socket:
    """A ComponentInterface. `relative_path` is unique on the real server, not here."""

    pk: int
    slug: str
    title: str
    kind: str
    super_kind: str  # "Value", "File" or "Image"
    relative_path: str
    overlay_segments: list[dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "description": "",
            "slug": self.slug,
            "kind": self.kind,
            "pk": self.pk,
            "default_value": None,
            "super_kind": self.super_kind,
            "relative_path": self.relative_path,
            "overlay_segments": self.overlay_segments if self.overlay_segments else [],
            "look_up_table": None,
        }


@dataclass(frozen=True)
class ImageFile:
    pk: str
    image_type: str  # "MHD", "TIFF" or "DZI"
    stored: StoredObject

    @property
    def basename(self) -> str:
        return self.stored.key.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class DicomImageSet:
    """An AWS HealthImaging image set. `entries` are the instances as the instances endpoint
    lists them: once per frame, so a multi-frame instance repeats."""

    image_set_id: str
    entries: tuple[DicomInstance, ...]

    def instances(self) -> list[DicomInstance]:
        """Each instance once, in the order the listing first names it."""
        return list({i.sop_instance_uid: i for i in self.entries}.values())


@dataclass(frozen=True)
class Image:
    pk: str
    name: str
    files: tuple[ImageFile, ...]
    meta: dict[str, Any]  # every HyperlinkedImage field but pk, name, files, api_url, set
    image_set: DicomImageSet | None = None


@dataclass(frozen=True)
class Value:
    """A ComponentInterfaceValue: exactly one of `value`, `file`, `image` is meaningful."""

    pk: int
    socket: Socket
    value: Any = None
    file: StoredObject | None = None
    image: Image | None = None


@dataclass
class Item:
    pk: str
    values: tuple[Value, ...]
    title: str = ""


@dataclass
class Archive:
    pk: str
    slug: str
    title: str
    description: str
    public: bool
    items: list[Item] = field(default_factory=list)
    hanging_protocol: dict[str, Any] | None = None
    view_content: dict[str, Any] = field(default_factory=dict)


_SORT_GROUPS = {"Value": 0, "File": 3, "Image": 4}


def sort_civs(values: Iterable[Value]) -> tuple[Value, ...]:
    """The server's value order: JSON values, thumbnails, charts, files, images; then by slug."""

    def group(value: Value) -> int:
        if value.socket.kind.startswith("Thumbnail"):
            return 1
        if value.socket.kind == "Chart":
            return 2
        return _SORT_GROUPS[value.socket.super_kind]

    return tuple(sorted(values, key=lambda v: (group(v), v.socket.slug)))


# --------------------------------------------------------------------------- sockets

_S = Socket
SOCKETS: tuple[Socket, ...] = (
    _S(1, "generic-medical-image", "Generic Medical Image", "Image", "Image", ""),
    _S(3, "results-json-file", "Results JSON File", "Anything", "Value", "results.json"),
    _S(10, "predictions-csv-file", "Predictions CSV File", "CSV file", "File", "predictions.csv"),
    _S(11, "predictions-zip-file", "Predictions ZIP File", "ZIP file", "File", "predictions.zip"),
    _S(201, "ct", "CT", "Image", "Image", "images/ct"),
    _S(
        202,
        "lung-segmentation",
        "Lung Segmentation",
        "Segmentation",
        "Image",
        "images/lung-segmentation",
        [
            {"name": "body", "visible": True, "voxel_value": 1},
            {"name": "lesion", "visible": True, "voxel_value": 2},
        ],
    ),
    _S(203, "pathology-slide", "Pathology Slide", "Image", "Image", "images/pathology-slide"),
    _S(204, "legacy-ct", "Legacy CT", "Image", "Image", "images/legacy-ct"),
    _S(
        205,
        "dicom-image-set",
        "DICOM Image Set",
        "DICOM Image Set",
        "Image",
        "images/dicom-image-set",
    ),
    _S(212, "detections-json-file", "Detections JSON File", "Anything", "File", "detections.json"),
    _S(215, "report", "Report", "PDF file", "File", "files/report.pdf"),
    _S(220, "points", "Points", "Multiple points", "Value", "annotations/2024/points.json"),
    _S(221, "clinical-comment", "Clinical Comment", "String", "Value", "clinical-comment.json"),
    _S(222, "lesion-count", "Lesion Count", "Integer", "Value", "lesion-count.json"),
    _S(223, "accession-number", "Accession Number", "Integer", "Value", "accession-number.json"),
    _S(224, "malignancy-score", "Malignancy Score", "Float", "Value", "malignancy-score.json"),
    _S(225, "is-referable", "Is Referable", "Bool", "Value", "is-referable.json"),
    _S(226, "reviewer-notes", "Reviewer Notes", "Anything", "Value", "reviewer-notes.json"),
    _S(227, "measurements", "Measurements", "Anything", "Value", "measurements.json"),
    _S(228, "lesion-diameters", "Lesion Diameters", "Anything", "Value", "lesion-diameters.json"),
    _S(230, "cohort-score", "Cohort Score", "Float", "Value", "cohort-score.json"),
    # Sockets the real server would refuse (its relative_path validators), for the edge-case
    # archive: a client must leave these values out and still show everything else.
    _S(900, "edge-absolute", "Edge Absolute", "Anything", "Value", "/etc/passwd-copy.json"),
    _S(901, "edge-parent", "Edge Parent", "Anything", "Value", "../escape.json"),
    _S(902, "edge-double-slash", "Edge Double Slash", "Anything", "Value", "a//b.json"),
    _S(903, "edge-current-dir", "Edge Current Dir", "Anything", "Value", "./x.json"),
    _S(904, "edge-nul", "Edge NUL", "Anything", "Value", "nul\x00byte.json"),
    _S(905, "edge-empty-path", "Edge Empty Path", "Anything", "Value", ""),
    _S(906, "edge-trailing-slash", "Edge Trailing Slash", "Anything", "Value", "dir/"),
    _S(907, "edge-dup-value", "Edge Duplicate (value)", "Anything", "Value", "duplicate.json"),
    _S(908, "edge-dup-file", "Edge Duplicate (file)", "CSV file", "File", "duplicate.json"),
    _S(909, "edge-notes", "Edge Notes", "Anything", "Value", "notes"),
    _S(910, "edge-notes-inner", "Edge Notes Inner", "CSV file", "File", "notes/inner.csv"),
    _S(911, "edge-image-blocker", "Edge Image Blocker", "CSV file", "File", "images/edge"),
    _S(912, "edge-blocked-image", "Edge Blocked Image", "Image", "Image", "images/edge"),
    _S(913, "edge-summary", "Edge Summary", "Anything", "Value", "summary.json"),
    _S(914, "edge-table", "Edge Table", "CSV file", "File", "edge-files/table.csv"),
    _S(915, "edge-ok-image", "Edge OK Image", "Image", "Image", "images/edge-ok"),
)
SOCKET = {socket.slug: socket for socket in SOCKETS}


# --------------------------------------------------------------------------- building


class _Builder:
    """Hands out CIV pks, storage keys and Last-Modified times in creation order."""

    def __init__(self) -> None:
        self.next_civ = 1_793_366
        self.next_time = STORED_AT
        self.objects: dict[str, StoredObject] = {}

    def _time(self) -> float:
        self.next_time += 97
        return self.next_time

    def _civ_pk(self) -> int:
        self.next_civ += 1
        return self.next_civ

    def value(self, slug: str, value: Any) -> Value:
        return Value(self._civ_pk(), SOCKET[slug], value=value)

    def file(self, slug: str | Socket, data: bytes, filename: str | None = None) -> Value:
        """A File value; `filename` is the stored basename when it is not the socket's."""
        pk = self._civ_pk()
        socket = slug if isinstance(slug, Socket) else SOCKET[slug]
        name = filename or socket.relative_path.rsplit("/", 1)[-1] or "file"
        key = f"components/componentinterfacevalue/{hex(pk)[-4:-2]}/{hex(pk)[-2:]}/{pk}/{name}"
        stored = _stored(key, Payload.of(data, self._time()), data)
        self.objects[key] = stored
        return Value(pk, socket, file=stored)

    def huge_file(self, slug: str, seed: int, size: int) -> Value:
        pk = self._civ_pk()
        socket = SOCKET[slug]
        name = socket.relative_path.rsplit("/", 1)[-1]
        key = f"components/componentinterfacevalue/{hex(pk)[-4:-2]}/{hex(pk)[-2:]}/{pk}/{name}"
        payload = Payload.generated(seed, size, self._time())
        stored = _stored(key, payload, f"pattern:{seed}:{size}".encode())
        self.objects[key] = stored
        return Value(pk, socket, file=stored)

    def image(
        self, slug: str, name: str, files: list[tuple[str, str, bytes]], meta: dict[str, Any]
    ) -> Value:
        """An Image value; `files` are (stored filename, image_type, bytes)."""
        pk = uid("image", name, self.next_civ)
        image_files = []
        for filename, image_type, data in files:
            file_pk = uid("imagefile", pk, filename)
            key = f"images/{pk[0:2]}/{pk[2:4]}/{pk}/{file_pk}/{filename.format(pk=pk)}"
            stored = _stored(key, Payload.of(data, self._time()), data)
            self.objects[key] = stored
            image_files.append(ImageFile(file_pk, image_type, stored))
        return Value(self._civ_pk(), SOCKET[slug], image=Image(pk, name, tuple(image_files), meta))

    def ct(self, slug: str, seed: int, name: str) -> Value:
        return self.image(slug, name, [("{pk}.mha", "MHD", mha_ct(seed))], _CT_META)

    def segmentation(self, seed: int, name: str) -> Value:
        meta = dict(_CT_META, window_center=None, window_width=None, segments=[0, 1, 2])
        data = mha_segmentation(seed)
        return self.image("lung-segmentation", name, [("{pk}.mha", "MHD", data)], meta)

    def slide(self, seed: int, name: str, suffix: str) -> Value:
        files = [
            ("{pk}." + suffix, "TIFF", tiff_slide(seed)),
            ("{pk}.dzi", "DZI", dzi_descriptor()),
        ]
        return self.image("pathology-slide", name, files, _SLIDE_META)

    def dicom_set(self, name: str, entries: list[DicomInstance], meta: dict[str, Any]) -> Value:
        """A DICOM Image Set value: an image with no stored files, only an image set."""
        pk = uid("image", name, self.next_civ)
        image_set = DicomImageSet(uid("image-set", name).replace("-", ""), tuple(entries))
        image = Image(pk, name, (), meta, image_set)
        return Value(self._civ_pk(), SOCKET["dicom-image-set"], image=image)

    def legacy(self, seed: int, stem: str) -> Value:
        header, data = legacy_mhd_pair(seed, f"{stem}.zraw")
        files = [(f"{stem}.mhd", "MHD", header), (f"{stem}.zraw", "MHD", data)]
        return self.image("legacy-ct", f"{stem}.mhd", files, _CT_META)


_CT_META: dict[str, Any] = {
    "dicom_image_set": None,
    "width": 32,
    "height": 32,
    "depth": 8,
    "color_space": "GRAY",
    "modality": {"modality": "CT"},
    "eye_choice": "NA",
    "stereoscopic_choice": None,
    "field_of_view": None,
    "shape_without_color": [8, 32, 32],
    "shape": [8, 32, 32],
    "voxel_width_mm": 0.68,
    "voxel_height_mm": 0.68,
    "voxel_depth_mm": 1.25,
    "window_center": -600.0,
    "window_width": 1500.0,
    "segments": None,
}
_SLIDE_META: dict[str, Any] = dict(
    _CT_META,
    width=64,
    height=48,
    depth=None,
    color_space="RGB",
    modality={"modality": "Microscopy"},
    shape_without_color=[48, 64],
    shape=[48, 64, 3],
    voxel_width_mm=0.00025,
    voxel_height_mm=0.00025,
    voxel_depth_mm=None,
    window_center=None,
    window_width=None,
)


def _csv(rows: Iterable[tuple[object, ...]]) -> bytes:
    return "".join(",".join(map(str, row)) + "\n" for row in rows).encode()


def _medical(b: _Builder) -> Archive:
    first = Item(
        uid("item", "demo-medical", 1),
        sort_civs(
            [
                b.value("results-json-file", {"covid_probability": 0.87, "model": "v2.1"}),
                b.value(
                    "points",
                    {
                        "type": "Multiple points",
                        "points": [
                            {"name": "nodule", "point": [12.5, -3.25, 40.0]},
                            {"name": "carina", "point": [0.0, 7.75, 22.5]},
                        ],
                        "version": {"major": 1, "minor": 0},
                    },
                ),
                b.value("clinical-comment", "Patiënt: geen afwijkingen — 東京 ✓"),
                b.value("lesion-count", 3),
                b.value("accession-number", 2**64 + 12_345),  # beyond float precision
                b.value("malignancy-score", 0.1 + 0.2),
                b.value("is-referable", True),
                b.value("reviewer-notes", None),
                b.value(
                    "measurements",
                    {
                        "volume_ml": 12.75,
                        "hu": -650,
                        "größe": "groß",
                        "flags": [True, False, None],
                        "nested": {"empty": {}, "list": []},
                    },
                ),
                b.value("lesion-diameters", [12.5, 7, 3.25]),
                b.file("detections-json-file", b'{"detections":[1,2,3]}'),
                b.file("report", pdf_report("Scan report: case 001"), "scan_report_final.pdf"),
                b.file("predictions-csv-file", _csv([("lesion", "x", "y", "p"), (1, 12, 9, 0.9)])),
                b.ct("ct", 1, "case_001.mha"),
                b.segmentation(1, "case_001_seg.mha"),
                b.ct("generic-medical-image", 2, "case_001_overview.mha"),
                b.slide(1, "case_001_slide.tif", "tif"),
                b.legacy(3, "chest_ct_2009"),
            ]
        ),
    )
    second = Item(
        uid("item", "demo-medical", 2),
        sort_civs(
            [
                b.value("results-json-file", {"covid_probability": 0.12, "model": "v2.1"}),
                b.file("report", pdf_report("Scan report: case 002")),
                b.file("predictions-csv-file", b""),  # an empty stored object
                b.ct("ct", 4, "case_002.mha"),
                b.slide(2, "case_002_slide.tiff", "tiff"),
            ]
        ),
        title="case-002",
    )
    third = Item(uid("item", "demo-medical", 3), (b.ct("generic-medical-image", 5, "scan.mha"),))
    empty = Item(uid("item", "demo-medical", 4), ())
    return Archive(
        uid("archive", "demo-medical"),
        "demo-medical",
        "Demo medical imaging",
        "CT scans with segmentations, slides, reports and values: every kind of socket.",
        public=True,
        items=[first, second, third, empty],
        hanging_protocol={
            "json": [{"viewport_name": "main"}],
            "title": "Single viewport",
            "pk": uid("hanging-protocol", 1),
            "svg_icon": '<svg xmlns="http://www.w3.org/2000/svg" width="32" height="18"/>',
        },
        view_content={"main": ["ct"]},
    )


_DICOM_META: dict[str, Any] = dict(
    _CT_META, width=16, height=16, depth=4, shape_without_color=[4, 16, 16], shape=[4, 16, 16]
)
_WSI_META: dict[str, Any] = dict(
    _SLIDE_META, width=1024, height=512, shape_without_color=[512, 1024], shape=[512, 1024, 3]
)


def _dicom(b: _Builder) -> Archive:
    """DICOM image sets in AWS HealthImaging: a CT series, and a slide whose 2-frame instance
    the instances endpoint lists once per frame (around its single-frame label image)."""
    tiles, label = slide_instance("demo-slide"), slide_label("demo-slide")
    series = Item(
        uid("item", "demo-dicom", 1),
        sort_civs(
            [
                b.value("results-json-file", {"modality": "CT", "slices": 4}),
                b.dicom_set("ct_series.dcm", ct_series("demo-ct"), _DICOM_META),
            ]
        ),
    )
    slide = Item(
        uid("item", "demo-dicom", 2),
        (b.dicom_set("slide.dcm", [tiles, label, tiles], _WSI_META),),
    )
    return Archive(
        uid("archive", "demo-dicom"),
        "demo-dicom",
        "Demo DICOM image sets",
        "Images stored as DICOM image sets in AWS HealthImaging: one .dcm per instance.",
        public=True,
        items=[series, slide],
    )


def cohort_item(b: _Builder, slug: str, index: int) -> Item:
    """A light item: one Value socket and one small CSV file."""
    score = round((index * 7919 % 1000) / 1000, 3)
    return Item(
        uid("item", slug, index),
        sort_civs(
            [
                b.value("cohort-score", score),
                b.file("predictions-csv-file", _csv([("case", "score"), (index, score)])),
            ]
        ),
    )


def _cohort(b: _Builder) -> Archive:
    slug = "demo-cohort"
    return Archive(
        uid("archive", slug),
        slug,
        f"Demo cohort ({COHORT_SIZE:,} cases)",
        "More items than one page of the API can hold.",
        public=True,
        items=[cohort_item(b, slug, index) for index in range(COHORT_SIZE)],
    )


def _edge_cases(b: _Builder) -> Archive:
    hostile = Item(
        uid("item", "demo-edge-cases", 1),
        sort_civs(
            [
                b.value("edge-summary", {"ok": True}),
                b.value("edge-absolute", "must not escape"),
                b.value("edge-parent", "must not escape"),
                b.value("edge-double-slash", "empty component"),
                b.value("edge-current-dir", "dot component"),
                b.value("edge-nul", "NUL in the name"),
                b.value("edge-empty-path", "no name"),
                b.value("edge-trailing-slash", "trailing slash"),
                b.value("edge-dup-value", {"first": True}),
                b.file("edge-dup-file", b"second,claim\n"),
                b.value("edge-notes", "a file named notes"),
                b.file("edge-notes-inner", b"needs,notes,as,a,directory\n"),
                b.file("edge-image-blocker", b"a,file,where,an,image,directory,must,be\n"),
                b.ct("edge-blocked-image", 6, "blocked.mha"),
                b.file("edge-table", _csv([("a", "b"), (1, 2)])),
                b.ct("edge-ok-image", 7, "ok.mha"),
            ]
        ),
    )
    plain = Item(
        uid("item", "demo-edge-cases", 2), (b.value("results-json-file", {"plain": True}),)
    )
    return Archive(
        uid("archive", "demo-edge-cases"),
        "demo-edge-cases",
        "Demo edge cases",
        "Relative paths the real server would refuse; clients must survive them.",
        public=True,
        items=[hostile, plain],
    )


def _large(b: _Builder) -> Archive:
    item = Item(
        uid("item", "demo-large", 1),
        sort_civs(
            [
                b.value("results-json-file", {"note": "predictions.zip is 3 GiB"}),
                b.huge_file("predictions-zip-file", seed=20_240_601, size=HUGE_SIZE),
            ]
        ),
    )
    return Archive(
        uid("archive", "demo-large"),
        "demo-large",
        "Demo large files",
        "A 3 GiB file generated on the fly.",
        public=True,
        items=[item],
    )


def _private(b: _Builder) -> Archive:
    item = Item(
        uid("item", "demo-private", 1),
        sort_civs(
            [
                b.value("results-json-file", {"secret_study": True}),
                b.file("report", pdf_report("Confidential report")),
                b.ct("ct", 8, "private.mha"),
            ]
        ),
    )
    return Archive(
        uid("archive", "demo-private"),
        "demo-private",
        "Demo private archive",
        "Visible only with the demo token.",
        public=False,
        items=[item],
    )


def wide_socket(number: int) -> Socket:
    """One of many CSV sockets that share a directory (`wide/`), for wide item directories."""
    slug = f"wide-{number:04d}"
    return Socket(5000 + number, slug, slug.title(), "CSV file", "File", f"wide/{slug}.csv")


def scale_archive(
    b: _Builder, slug: str, size: int, *, wide: int = 0, public: bool = True
) -> Archive:
    """An archive of `size` items, each a Value, two Files and an Image (the shape the scale
    tests and benchmark walk); `wide` more File values per item make wide item directories.

    Stored bytes are shared (one small CSV, PDF and MetaImage for every item, under each
    item's own keys) so 100,000 items build in seconds and fit in memory.
    """
    report = pdf_report("Scale report")
    table = _csv([("case", "score"), (1, 0.5)])
    volume = mha_ct(9, (8, 8, 4))
    items = []
    for index in range(size):
        values = [
            b.value("results-json-file", {"case": index}),
            b.file("predictions-csv-file", table),
            b.file("report", report),
            b.image("ct", f"case-{index:06d}.mha", [("{pk}.mha", "MHD", volume)], _CT_META),
        ]
        values += [b.file(wide_socket(n), table) for n in range(wide)]
        items.append(Item(uid("item", slug, index), sort_civs(values)))
    return Archive(
        uid("archive", slug),
        slug,
        f"Scale test ({size:,} items)",
        "Generated for the scale tests and benchmark.",
        public=public,
        items=items,
    )


# --------------------------------------------------------------------------- the data set


def _normal_form(path: str, *, image: bool) -> bool:
    if path == "":
        return image
    if "\x00" in path or path.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:n]) for n in range(1, len(parts))]


def _image_file_name(image: Image, image_file: ImageFile) -> str | None:
    """product.md: `<image-pk>.<ext>`, DZI hidden, legacy MetaImage pairs keep stored names."""
    suffix = image_file.basename.rsplit(".", 1)[-1]
    if image_file.image_type == "DZI":
        return None
    if image_file.image_type == "MHD" and suffix in ("mhd", "zraw", "raw"):
        return image_file.basename
    return f"{image.pk}.{suffix}"


def _json_value(value: Any) -> bytes:
    return json.dumps(value, indent=2).encode()


def expected_item(item: Item) -> tuple[dict[str, Payload], set[str]]:
    """The files and directories of one item directory, following product.md's rules."""
    files: dict[str, Payload] = {}
    dirs: set[str] = set()
    image_dirs: set[str] = set()
    for civ in item.values:
        path, is_image = civ.socket.relative_path, civ.socket.super_kind == "Image"
        if not _normal_form(path, image=is_image):
            continue
        parents = _parents(path) if path else []
        if any(parent in files for parent in parents) or path in files or path in image_dirs:
            continue
        if civ.image is not None:
            prefix = f"{path}/" if path else ""
            if civ.image.image_set is not None:  # one file per distinct instance
                shown = {
                    f"{prefix}{instance.sop_instance_uid}.dcm": Payload.of(instance.data)
                    for instance in civ.image.image_set.instances()
                }
            else:
                shown = {
                    prefix + name: image_file.stored.payload
                    for image_file in civ.image.files
                    if (name := _image_file_name(civ.image, image_file)) is not None
                }
            if path:
                dirs.add(path)
                image_dirs.add(path)
            files.update(shown)
        elif path in dirs:
            continue
        elif civ.file is not None:
            files[path] = civ.file.payload
        else:
            files[path] = Payload.of(_json_value(civ.value))
        dirs.update(parents)
    return files, dirs


class SampleData:
    """All sample archives, looked up by the fake's routes; `add_item` may run concurrently.

    Archives are listed in creation order, as the server orders them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.version = 0  # moves whenever an archive or item is added
        self._builder = _Builder()
        b = self._builder
        self.archives: tuple[Archive, ...] = (
            _medical(b),
            _cohort(b),
            Archive(
                uid("archive", "demo-empty"),
                "demo-empty",
                "Demo empty archive",
                "No items yet.",
                public=True,
            ),
            _edge_cases(b),
            _large(b),
            _private(b),
            _dicom(b),
        )
        self.sockets = SOCKETS
        self._items: dict[str, tuple[Archive, Item]] = {}
        self._images: dict[str, tuple[Archive, Image]] = {}
        self._image_sets: dict[str, DicomImageSet] = {}
        self._objects: dict[str, Archive] = {}
        for archive in self.archives:
            for item in archive.items:
                self._index(archive, item)

    def _index(self, archive: Archive, item: Item) -> None:
        self._items[item.pk] = (archive, item)
        for civ in item.values:
            if civ.file is not None:
                self._objects[civ.file.key] = archive
            if civ.image is not None:
                self._images[civ.image.pk] = (archive, civ.image)
                if civ.image.image_set is not None:
                    self._image_sets[civ.image.image_set.image_set_id] = civ.image.image_set
                for image_file in civ.image.files:
                    self._objects[image_file.stored.key] = archive

    def archive(self, slug: str) -> Archive:
        return next(a for a in self.archives if a.slug == slug)

    def items(self, archive: Archive) -> list[Item]:
        """A snapshot of the archive's items, in stable (insertion) order."""
        with self._lock:
            return list(archive.items)

    def item(self, pk: str) -> tuple[Archive, Item] | None:
        with self._lock:
            return self._items.get(pk)

    def image(self, pk: str) -> tuple[Archive, Image] | None:
        with self._lock:
            return self._images.get(pk)

    def image_set(self, image_set_id: str) -> DicomImageSet | None:
        with self._lock:
            return self._image_sets.get(image_set_id)

    def stored(self, key: str) -> tuple[Archive, StoredObject] | None:
        """The object at a storage key and the archive whose permissions guard it."""
        with self._lock:
            archive = self._objects.get(key)
            objects = self._builder.objects
            return None if archive is None else (archive, objects[key])

    def add_archive(self, archive: Archive) -> None:
        """Serve one more archive (built with `self.builder`), e.g. a `scale_archive`."""
        with self._lock:
            self.version += 1
            self.archives = (*self.archives, archive)
            for item in archive.items:
                self._index(archive, item)

    @property
    def builder(self) -> _Builder:
        return self._builder

    def add_item(self, slug: str) -> str:
        """Append a new light item (like `demo-cohort`'s) to an archive; returns its pk."""
        archive = self.archive(slug)
        with self._lock:
            self.version += 1
            item = cohort_item(self._builder, f"{slug}/added", len(archive.items))
            archive.items.append(item)
            self._index(archive, item)
        return item.pk

    def expected_tree(self, slug: str) -> tuple[dict[str, Payload], set[str]]:
        """Files and directories under `grand-challenge/<slug>/`, paths relative to it."""
        files: dict[str, Payload] = {}
        dirs: set[str] = set()
        for item in self.items(self.archive(slug)):
            item_files, item_dirs = expected_item(item)
            dirs.add(item.pk)
            dirs.update(f"{item.pk}/{d}" for d in item_dirs)
            files.update({f"{item.pk}/{path}": payload for path, payload in item_files.items()})
        return files, dirs
