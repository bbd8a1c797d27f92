"""Sample library of the fake Scenario service, the files it serves, and the tree fsmount must show.

Everything is deterministic (ids, times, pixels, meshes, encodings), so a test can compare a mounted
tree with `ScenarioSamples.expected_tree()` byte for byte and a demo looks the same on every run.
The set is built to trip a careless client: more visible assets than two pages of 50, assets that
must stay invisible (pending, failed, hidden, deleted), colliding and unsafe names, an empty
collection, a nameless model, a model whose only assets are invisible, and a model nothing used.

The expected tree is computed here from the sample records alone, following product.md, so it is
an oracle independent of fsmount's own code.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import random
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pillow_heif
from PIL import Image, PngImagePlugin

pillow_heif.register_heif_opener()  # gives Pillow the HEIF codec, for encoding and for readers

# --------------------------------------------------------------------------- formats

IMAGE_FORMATS = ("png", "jpg", "webp", "avif", "tif", "gif", "heif")
MESH_FORMATS = ("glb", "fbx", "obj")
# Every `targetFormat` the SDK 2.4.0 type accepts; anything else is refused before the kind check.
TARGET_FORMATS = frozenset(
    {"gif", "heif", "jpeg", "jpg", "png", "svg", "webp", "avif", "tif", "tiff"}
    | {"glb", "fbx", "obj", "mp3", "mp4"}
)
FORMAT_ALIASES = {"jpeg": "jpg", "tiff": "tif"}
FORMAT_MIME = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "webp": "image/webp",
    "avif": "image/avif",
    "tif": "image/tiff",
    "gif": "image/gif",
    "heif": "image/heif",
    "glb": "model/gltf-binary",
    "fbx": "model/x-fbx",
    "obj": "model/obj",
    "mp4": "video/mp4",
}
NATIVE_EXT = {mime: ext for ext, mime in FORMAT_MIME.items()}
PILLOW_FORMAT = {
    "png": "PNG",
    "jpg": "JPEG",
    "webp": "WEBP",
    "avif": "AVIF",
    "tif": "TIFF",
    "gif": "GIF",
    "heif": "HEIF",
}
# Encoder settings of the CDN's transform. `max_threads=1` keeps AVIF bit-identical across runs.
_TRANSFORM_OPTIONS: dict[str, dict[str, object]] = {
    "png": {},
    "jpg": {"quality": 85},
    "webp": {"quality": 80, "method": 4},
    "avif": {"quality": 60, "speed": 6, "max_threads": 1},
    "tif": {"compression": "tiff_lzw"},
    "gif": {},
    "heif": {"quality": 60},
}
NATIVE_GENERATOR = "Scenario 3D generation (fsmount sample)"
TRANSFORM_GENERATOR = "Scenario asset transform (fsmount fake)"


def accepted_formats(kind: str, native_ext: str) -> tuple[str, ...]:
    """Canonical target formats the service converts an asset of `kind` to.

    Audio and video "only accept their stored format" (SDK docstring); kinds without a converter
    (text, json, image-hdr, ...) accept none.
    """
    if kind == "image":
        return IMAGE_FORMATS
    if kind == "3d":
        return MESH_FORMATS
    if kind in ("video", "audio"):
        return (native_ext,)
    return ()


def listed_formats(kind: str) -> tuple[str, ...]:
    """The extra files product.md shows per asset kind (the native one is always shown)."""
    return {"image": IMAGE_FORMATS, "3d": MESH_FORMATS}.get(kind, ())


# --------------------------------------------------------------------------- ids and times

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_EPOCH_MS = int(datetime(2026, 1, 5, 9, 0, tzinfo=UTC).timestamp() * 1000)


def fake_id(prefix: str, label: str, length: int = 24) -> str:
    """A stable Scenario-looking id (`asset_` + base58) derived from a human label."""
    number = int.from_bytes(hashlib.sha256(f"{prefix}:{label}".encode()).digest(), "big")
    chars = []
    for _ in range(length):
        number, digit = divmod(number, 58)
        chars.append(_B58[digit])
    return f"{prefix}_{''.join(chars)}"


def iso_ms(epoch_ms: int) -> str:
    """Scenario's timestamp style: ISO-8601 UTC with milliseconds, `2023-02-03T11:19:41.579Z`."""
    moment = datetime.fromtimestamp(epoch_ms // 1000, UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{epoch_ms % 1000:03d}Z"


# --------------------------------------------------------------------------- content recipes


@dataclass(frozen=True)
class Raster:
    """A generated picture: a colour gradient blended with deterministic noise.

    The noise keeps files a few KiB (so ranged reads are meaningful) and makes every re-encoding
    differ from the original, so a client that fetches a converted copy instead of the original
    gets caught.
    """

    seed: int
    width: int
    height: int

    def image(self) -> Image.Image:
        rnd = random.Random(self.seed)
        size = (self.width, self.height)
        ramp = Image.linear_gradient("L").resize(size)
        red = ramp.rotate(rnd.choice((0, 90, 180, 270)))
        green = ramp.rotate(rnd.choice((0, 90, 180, 270))).point(lambda v: 255 - v)
        blue = Image.new("L", size, rnd.randrange(256))
        base = Image.merge("RGB", (red, green, blue))
        noise = Image.frombytes("RGB", size, rnd.randbytes(self.width * self.height * 3))
        return Image.blend(base, noise, 0.12)


@dataclass(frozen=True)
class Mesh:
    """A triangle mesh, exported by the fake as GLB, OBJ and ASCII FBX (the same geometry)."""

    name: str
    positions: tuple[tuple[float, float, float], ...]
    triangles: tuple[tuple[int, int, int], ...]  # counter-clockwise seen from outside


@dataclass(frozen=True)
class Clip:
    """A short Motion-JPEG video in an MP4 container, frames drawn like `Raster`."""

    seed: int
    width: int
    height: int
    frames: int
    fps: int


def cube(name: str, half: float) -> Mesh:
    corners = tuple((x, y, z) for z in (-half, half) for y in (-half, half) for x in (-half, half))
    # corner index = x + 2y + 4z (bits: + side); two triangles per face
    faces = ((0, 2, 3, 1), (4, 5, 7, 6), (0, 1, 5, 4), (2, 6, 7, 3), (0, 4, 6, 2), (1, 3, 7, 5))
    triangles = tuple(t for a, b, c, d in faces for t in ((a, b, c), (a, c, d)))
    return Mesh(name, corners, triangles)


def pyramid(name: str, half: float, height: float) -> Mesh:
    base = ((-half, 0.0, -half), (half, 0.0, -half), (half, 0.0, half), (-half, 0.0, half))
    triangles = ((0, 1, 2), (0, 2, 3), (0, 4, 1), (1, 4, 2), (2, 4, 3), (3, 4, 0))
    return Mesh(name, (*base, (0.0, height, 0.0)), triangles)


def octahedron(name: str, radius: float) -> Mesh:
    r = radius
    points = ((r, 0.0, 0.0), (-r, 0.0, 0.0), (0.0, r, 0.0), (0.0, -r, 0.0), (0.0, 0.0, r))
    triangles = ((0, 2, 4), (2, 1, 4), (1, 3, 4), (3, 0, 4))
    triangles += ((2, 0, 5), (1, 2, 5), (3, 1, 5), (0, 3, 5))
    return Mesh(name, (*points, (0.0, 0.0, -r)), triangles)


# --------------------------------------------------------------------------- encoders


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=PILLOW_FORMAT[fmt], **options)
    return out.getvalue()


def encode_original(raster: Raster, fmt: str) -> bytes:
    """The stored file of an image asset: settings unlike the transform's, as a real upload."""
    image = raster.image()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text("Software", "fsmount sample generator")
        return _save(image, "png", compress_level=9, pnginfo=info)
    return _save(image, "jpg", quality=93, subsampling=0)


def convert_image(data: bytes, fmt: str) -> bytes:
    """Re-encode image bytes to canonical format `fmt` the way the fake CDN transform does."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if fmt == "gif":
        image = image.quantize(colors=256)
    return _save(image, fmt, **_TRANSFORM_OPTIONS[fmt])


def mesh_glb(mesh: Mesh, generator: str) -> bytes:
    """A glTF 2.0 binary: 12-byte header, a JSON chunk (space padded), a BIN chunk (zero padded)."""
    positions = b"".join(struct.pack("<3f", *p) for p in mesh.positions)
    indices = b"".join(struct.pack("<3H", *t) for t in mesh.triangles)
    binary = positions + indices + b"\0" * (-len(indices) % 4)
    axes = list(zip(*mesh.positions, strict=True))
    document = {
        "asset": {"version": "2.0", "generator": generator},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0, "name": mesh.name}],
        "meshes": [
            {
                "name": mesh.name,
                "primitives": [{"attributes": {"POSITION": 0}, "indices": 1, "mode": 4}],
            }
        ],
        "buffers": [{"byteLength": len(binary)}],
        "bufferViews": [
            {"buffer": 0, "byteOffset": 0, "byteLength": len(positions), "target": 34962},
            {
                "buffer": 0,
                "byteOffset": len(positions),
                "byteLength": len(indices),
                "target": 34963,
            },
        ],
        "accessors": [
            {
                "bufferView": 0,
                "componentType": 5126,
                "count": len(mesh.positions),
                "type": "VEC3",
                "min": [min(axis) for axis in axes],
                "max": [max(axis) for axis in axes],
            },
            {
                "bufferView": 1,
                "componentType": 5123,
                "count": 3 * len(mesh.triangles),
                "type": "SCALAR",
            },
        ],
    }
    text = json.dumps(document, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 4)
    total = 12 + 8 + len(text) + 8 + len(binary)
    return b"".join(
        (
            struct.pack("<4sII", b"glTF", 2, total),
            struct.pack("<I4s", len(text), b"JSON"),
            text,
            struct.pack("<I4s", len(binary), b"BIN\0"),
            binary,
        )
    )


def _number(value: float) -> str:
    return f"{value:g}"


def mesh_obj(mesh: Mesh) -> bytes:
    """A Wavefront OBJ of the mesh (1-based face indices)."""
    lines = [f"# {TRANSFORM_GENERATOR}", f"o {mesh.name}"]
    lines += ["v " + " ".join(_number(c) for c in p) for p in mesh.positions]
    lines += ["f " + " ".join(str(i + 1) for i in t) for t in mesh.triangles]
    return ("\n".join(lines) + "\n").encode()


def mesh_fbx(mesh: Mesh) -> bytes:
    """An ASCII FBX 7.4 document holding the mesh as one Geometry connected to one Model.

    Polygon ends are marked FBX's way: the last index of each polygon is stored as `-(i + 1)`.
    """
    vertices = ",".join(_number(c) for p in mesh.positions for c in p)
    polygons = ",".join(f"{a},{b},{-(c + 1)}" for a, b, c in mesh.triangles)
    return f"""; FBX 7.4.0 project file
; Created by {TRANSFORM_GENERATOR}
; ----------------------------------------------------

FBXHeaderExtension:  {{
\tFBXHeaderVersion: 1003
\tFBXVersion: 7400
\tCreator: "{TRANSFORM_GENERATOR}"
}}
GlobalSettings:  {{
\tVersion: 1000
\tProperties70:  {{
\t\tP: "UpAxis", "int", "Integer", "",1
\t\tP: "UpAxisSign", "int", "Integer", "",1
\t\tP: "FrontAxis", "int", "Integer", "",2
\t\tP: "FrontAxisSign", "int", "Integer", "",1
\t\tP: "CoordAxis", "int", "Integer", "",0
\t\tP: "CoordAxisSign", "int", "Integer", "",1
\t\tP: "UnitScaleFactor", "double", "Number", "",1
\t}}
}}
Definitions:  {{
\tVersion: 100
\tCount: 3
\tObjectType: "GlobalSettings" {{
\t\tCount: 1
\t}}
\tObjectType: "Model" {{
\t\tCount: 1
\t}}
\tObjectType: "Geometry" {{
\t\tCount: 1
\t}}
}}
Objects:  {{
\tGeometry: 1000, "Geometry::{mesh.name}", "Mesh" {{
\t\tVertices: *{3 * len(mesh.positions)} {{
\t\t\ta: {vertices}
\t\t}}
\t\tPolygonVertexIndex: *{3 * len(mesh.triangles)} {{
\t\t\ta: {polygons}
\t\t}}
\t\tGeometryVersion: 124
\t}}
\tModel: 2000, "Model::{mesh.name}", "Mesh" {{
\t\tVersion: 232
\t\tShading: T
\t\tCulling: "CullingOff"
\t}}
}}
Connections:  {{
\tC: "OO",1000,2000
\tC: "OO",2000,0
}}
""".encode()


def _box(kind: bytes, *parts: bytes) -> bytes:
    payload = b"".join(parts)
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def _full_box(kind: bytes, version: int, flags: int, *parts: bytes) -> bytes:
    return _box(kind, struct.pack(">I", version << 24 | flags), *parts)


_UNITY_MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)


def clip_mp4(clip: Clip) -> bytes:
    """An ISO-BMFF file (ftyp, moov, mdat) with one Motion-JPEG video track.

    The track uses an `mp4v` sample entry whose `esds` names JPEG (objectTypeIndication 0x6C),
    so ordinary players decode it; samples are one chunk of Pillow-encoded JPEG frames.
    """
    frames = [
        _save(Raster(clip.seed * 1000 + i, clip.width, clip.height).image(), "jpg", quality=80)
        for i in range(clip.frames)
    ]
    timescale, delta = 12_800, 12_800 // clip.fps
    duration_ms = clip.frames * 1000 // clip.fps
    ftyp = _box(b"ftyp", b"isom", struct.pack(">I", 0x200), b"isomiso2mp41")
    decoder_config = bytes((0x04, 13, 0x6C, 0x11)) + struct.pack(">3sII", b"\0\1\0", 0, 0)
    es_descriptor = bytes((0x03, 21)) + struct.pack(">HB", 1, 0) + decoder_config
    esds = _full_box(b"esds", 0, 0, es_descriptor + bytes((0x06, 1, 0x02)))
    compressor = b"\x0aMotion JPEG".ljust(32, b"\0")
    mp4v = _box(
        b"mp4v",
        bytes(6),
        struct.pack(">HHH12x", 1, 0, 0),
        struct.pack(">HHII4xH", clip.width, clip.height, 0x480000, 0x480000, 1),
        compressor,
        struct.pack(">Hh", 0x18, -1),
        esds,
    )

    def moov(chunk_offset: int) -> bytes:
        stbl = _box(
            b"stbl",
            _full_box(b"stsd", 0, 0, struct.pack(">I", 1), mp4v),
            _full_box(b"stts", 0, 0, struct.pack(">III", 1, clip.frames, delta)),
            _full_box(b"stsc", 0, 0, struct.pack(">IIII", 1, 1, clip.frames, 1)),
            _full_box(
                b"stsz",
                0,
                0,
                struct.pack(">II", 0, clip.frames),
                *(struct.pack(">I", len(f)) for f in frames),
            ),
            _full_box(b"stco", 0, 0, struct.pack(">II", 1, chunk_offset)),
        )
        dinf = _box(
            b"dinf", _full_box(b"dref", 0, 0, struct.pack(">I", 1), _full_box(b"url ", 0, 1))
        )
        minf = _box(b"minf", _full_box(b"vmhd", 0, 1, bytes(8)), dinf, stbl)
        mdia = _box(
            b"mdia",
            _full_box(
                b"mdhd",
                0,
                0,
                struct.pack(">IIIIHH", 0, 0, timescale, clip.frames * delta, 0x55C4, 0),
            ),
            _full_box(b"hdlr", 0, 0, struct.pack(">I4s12x", 0, b"vide"), b"VideoHandler\0"),
            minf,
        )
        tkhd = _full_box(
            b"tkhd",
            0,
            3,  # enabled, in movie
            struct.pack(">IIIII8xhhhH", 0, 0, 1, 0, duration_ms, 0, 0, 0, 0),
            _UNITY_MATRIX,
            struct.pack(">II", clip.width << 16, clip.height << 16),
        )
        mvhd = _full_box(
            b"mvhd",
            0,
            0,
            struct.pack(">IIIIIH10x", 0, 0, 1000, duration_ms, 0x10000, 0x100),
            _UNITY_MATRIX,
            bytes(24),
            struct.pack(">I", 2),
        )
        return _box(b"moov", mvhd, _box(b"trak", tkhd, mdia))

    header_size = len(ftyp) + len(moov(0)) + 8  # the offset's value does not change moov's size
    return ftyp + moov(header_size) + _box(b"mdat", *frames)


# --------------------------------------------------------------------------- file bytes


@functools.cache
def original_bytes(content: Raster | Mesh | Clip, ext: str) -> bytes:
    """The stored file of an asset made from `content`: what a plain download serves.

    Cached per recipe at module level: the samples are the same in every fake a process starts,
    so a test session encodes each file once.
    """
    if isinstance(content, Raster):
        return encode_original(content, ext)
    if isinstance(content, Mesh):
        return mesh_glb(content, NATIVE_GENERATOR)
    return clip_mp4(content)


@functools.cache
def transformed_bytes(content: Raster | Mesh | Clip, ext: str, fmt: str) -> bytes:
    """What the CDN's transform serves for canonical format `fmt`: re-encoded, never the original.

    Video (and audio) has no transform: its stored format is served as stored.
    """
    if isinstance(content, Raster):
        return convert_image(original_bytes(content, ext), fmt)
    if isinstance(content, Mesh):
        return (
            mesh_glb(content, TRANSFORM_GENERATOR)
            if fmt == "glb"
            else _MESH_EXPORTERS[fmt](content)
        )
    return original_bytes(content, ext)


_MESH_EXPORTERS: dict[str, Callable[[Mesh], bytes]] = {"obj": mesh_obj, "fbx": mesh_fbx}


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class SampleModel:
    id: str
    name: str | None
    privacy: str
    type: str
    capabilities: tuple[str, ...]
    created_ms: int
    short_description: str | None = None


@dataclass(frozen=True)
class SampleCollection:
    id: str
    name: str
    created_ms: int


@dataclass(frozen=True)
class SampleAsset:
    id: str
    kind: str
    mime_type: str
    content: Raster | Mesh | Clip
    origin: str  # both `source` and `metadata.type` on the wire
    created_ms: int
    updated_ms: int
    model_id: str | None = None
    inference_id: str | None = None
    prompt: str | None = None
    file_name: str | None = None  # `metadata.name`, which uploads carry
    collection_ids: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    status: str = "success"
    hidden: bool = False
    deleted_ms: int | None = None

    @property
    def visible(self) -> bool:
        """What product.md lets a mount show: success, not hidden, not deleted."""
        return self.status == "success" and not self.hidden and self.deleted_ms is None

    @property
    def native_ext(self) -> str:
        return NATIVE_EXT[self.mime_type]

    @property
    def mtime(self) -> float:
        return self.updated_ms / 1000

    def original(self) -> bytes:
        return original_bytes(self.content, self.native_ext)

    def transformed(self, fmt: str) -> bytes:
        return transformed_bytes(self.content, self.native_ext, fmt)


@dataclass(frozen=True)
class ExpectedFile:
    """One file the mount must show: its asset, format (None: the native file) and bytes."""

    asset_id: str
    target_format: str | None
    mtime: float
    read: Callable[[], bytes] = field(repr=False, compare=False)

    @property
    def data(self) -> bytes:
        return self.read()

    @property
    def size(self) -> int:
        return len(self.read())


def safe_name(name: str) -> str:
    """product.md's rule: `/` becomes `_`, NUL is dropped, a leading `.` becomes `_`."""
    cleaned = name.replace("/", "_").replace("\0", "")
    return "_" + cleaned[1:] if cleaned.startswith(".") else cleaned


def directory_names(entries: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Map `(id, name)` pairs of one parent to directory names, `<name> (<id>)` on collision."""
    pairs = [(ident, safe_name(name)) for ident, name in entries]
    uses = Counter(name for _, name in pairs)
    return {ident: f"{name} ({ident})" if uses[name] > 1 else name for ident, name in pairs}


# --------------------------------------------------------------------------- the library

_PROMPTS = (
    "mossy boulder",
    "neon alley at night",
    "isometric cottage",
    "stormy sea, oil painting",
    "crystal cave",
    "desert ruins at dawn",
    "floating islands",
    "cyberpunk market",
)
_IMAGE_CAPABILITIES = ("REMOVE_BACKGROUND", "UPSCALE", "PIXELATE", "PROMPT_EDITING")
_MINUTE_MS = 60_000
_DAY_MS = 24 * 60 * _MINUTE_MS
VISIBLE_IMAGES = 121  # plus one large poster: with 4 meshes and 2 videos, 128 visible assets

# label → (name, privacy, type, capabilities, short description); the labels are stable keys.
_MODELS: dict[str, tuple[str | None, str, str, tuple[str, ...], str | None]] = {
    "gpt": ("GPT Image 2", "public", "custom", ("txt2img", "img2img"), "GPT Image 2 by OpenAI"),
    "hunyuan": ("Hunyuan 3D 2.1", "public", "custom", ("img23d",), "Image to 3D"),
    "kling": ("Kling 2.1", "public", "custom", ("img2video",), None),
    "golem": ("Stone Golem v2", "private", "flux.1-lora", ("txt2img", "img2img"), None),
    "nameless": (None, "private", "flux.1-lora", ("txt2img",), None),
    "pixel-a": ("Pixel Art", "private", "flux.1-lora", ("txt2img",), None),
    "pixel-b": ("Pixel Art", "private", "flux.1-lora", ("txt2img",), None),
    "ink": ("Ink/Wash", "private", "flux.1-lora", ("txt2img",), None),
    "drafts": ("Drafts Only", "private", "flux.1-lora", ("txt2img",), None),  # invisible assets
    "unused": ("Unused Style", "private", "flux.1-lora", ("txt2img",), None),  # no asset at all
}
_PUBLIC_MODEL_IDS = {
    "gpt": "model_openai-gpt-image-2",
    "hunyuan": "model_hunyuan-3d-v2-1",
    "kling": "model_kling-v2-1",
}
# label → name; 14 collections, so the default page of 10 does not hold them all.
_COLLECTIONS = {
    "hero": "Hero props",
    "bg-a": "Backgrounds",
    "bg-b": "Backgrounds",
    "props": "Props/2024",
    "empty": "Empty shelf",
    "dot": ".dotfiles",
    "nfd": "Cafe\u0301 (NFD)",
    "nul": "Night\0shots",
    "3d": "3D models",
    "videos": "Videos",
    "hidden": "Hidden only",
    "mixed": "Mixed formats",
    "sprites": "Sprites",
    "tiles": "Tiles",
}
# collection label → which regular images (by number) it holds
_IMAGE_SPANS = {
    "hero": range(0, 10),
    "bg-a": range(10, 15),
    "bg-b": (0, *range(15, 20)),  # image 0 is in both "Backgrounds"
    "props": range(20, 21),
    "dot": range(21, 23),
    "nfd": range(23, 24),
    "nul": range(24, 25),
    "mixed": range(25, 35),
    "sprites": range(35, 100),  # more than a default page of the asset listing
    "tiles": range(100, 105),
}
# image number i is generated by _GENERATORS[i % 7]; None is an upload
_GENERATORS = ("gpt", "golem", "nameless", "pixel-a", "pixel-b", "ink", None)


class ScenarioSamples:
    """The project the fake serves: its models, collections and assets, and their files.

    Files are encoded on first use (and cached), so starting a fake costs little while every
    later read, and the oracle, return identical bytes.
    """

    def __init__(self) -> None:
        self.project_id = fake_id("proj", "demo project")
        self.author_id = fake_id("apiu", "demo author")
        start = _EPOCH_MS - 30 * _DAY_MS
        self.model_ids = {
            label: _PUBLIC_MODEL_IDS.get(label) or fake_id("model", label) for label in _MODELS
        }
        self.models = [
            SampleModel(self.model_ids[label], name, privacy, kind, caps, start + n * _DAY_MS, doc)
            for n, (label, (name, privacy, kind, caps, doc)) in enumerate(_MODELS.items())
        ]
        self.collection_ids = {label: fake_id("coll", label) for label in _COLLECTIONS}
        self.collections = [
            SampleCollection(self.collection_ids[label], name, start + n * 3_600_000)
            for n, (label, name) in enumerate(_COLLECTIONS.items())
        ]
        self._clock = iter(range(_EPOCH_MS, _EPOCH_MS + 10_000 * _MINUTE_MS, 7 * _MINUTE_MS + 123))
        self.assets: list[SampleAsset] = []
        self._add_images()
        self._add_meshes_and_videos()
        self._add_invisible()
        self._assets_by_id = {a.id: a for a in self.assets}
        self._models_by_id = {m.id: m for m in self.models}

    # ----------------------------------------------------------------- construction

    def _add(self, label: str, **fields: Any) -> None:
        """Append an asset with a stable id and the next creation time."""
        created = next(self._clock)
        updated = created + 95_000 + 17 * len(self.assets)
        self.assets.append(
            SampleAsset(fake_id("asset", label), **fields, created_ms=created, updated_ms=updated)
        )

    def _in(self, *labels: str) -> tuple[str, ...]:
        return tuple(self.collection_ids[label] for label in labels)

    def _add_images(self) -> None:
        for i in range(VISIBLE_IMAGES):
            ext = "png" if i % 2 == 0 else "jpg"
            generator = _GENERATORS[i % len(_GENERATORS)]
            model = self.model_ids[generator] if generator else None
            self._add(
                f"image {i}",
                kind="image",
                mime_type=FORMAT_MIME[ext],
                content=Raster(i, 64, 64),
                origin="txt2img" if model else "uploaded",
                model_id=model,
                inference_id=fake_id("inf", f"{generator}:{i // 4}") if model else None,
                prompt=_PROMPTS[i % len(_PROMPTS)] if model else None,
                file_name=None if model else f"upload-{i:03d}.{ext}",
                collection_ids=self._in(*(c for c, span in _IMAGE_SPANS.items() if i in span)),
                tags=("hero",) if i % 10 == 0 else (),
            )
            if i == 60:  # a bigger file, so that ranged and partial reads span several blocks
                self._add(
                    "poster",
                    kind="image",
                    mime_type="image/png",
                    content=Raster(4242, 512, 512),
                    origin="uploaded",
                    file_name="poster.png",
                    collection_ids=self._in("mixed"),
                )

    def _add_meshes_and_videos(self) -> None:
        meshes = (
            (cube("cube", 0.5), "hunyuan", ("hero", "props", "3d", "mixed")),
            (pyramid("pyramid", 0.5, 1.0), "hunyuan", ("props", "3d")),
            (octahedron("octahedron", 0.75), "hunyuan", ("3d",)),
            (cube("crate", 1.0), None, ("props", "3d")),
        )
        for mesh, generator, collections in meshes:
            self._add(
                f"mesh {mesh.name}",
                kind="3d",
                mime_type="model/gltf-binary",
                content=mesh,
                origin="img23d" if generator else "uploaded-3d",
                model_id=self.model_ids[generator] if generator else None,
                inference_id=fake_id("inf", f"3d:{mesh.name}") if generator else None,
                file_name=None if generator else f"{mesh.name}.glb",
                collection_ids=self._in(*collections),
            )
        self._add(
            "video kling",
            kind="video",
            mime_type="video/mp4",
            content=Clip(7, 64, 48, 8, 8),
            origin="img2video",
            model_id=self.model_ids["kling"],
            inference_id=fake_id("inf", "video"),
            prompt="waves rolling in",
            collection_ids=self._in("videos", "mixed"),
        )
        self._add(
            "video upload",
            kind="video",
            mime_type="video/mp4",
            content=Clip(8, 32, 32, 4, 4),
            origin="uploaded-video",
            file_name="clip.mp4",
            collection_ids=self._in("videos"),
        )

    def _add_invisible(self) -> None:
        """Assets a correct client never shows, in collections and models it does show."""
        drafts, gpt = self.model_ids["drafts"], self.model_ids["gpt"]
        invisible: dict[str, dict[str, Any]] = {
            "pending": {"status": "pending", "model_id": drafts},
            "failed": {"status": "error", "model_id": drafts},
            "hidden": {"hidden": True, "model_id": drafts},
            "deleted": {"deleted_ms": _EPOCH_MS + 9_000 * _MINUTE_MS, "model_id": drafts},
            "hidden gpt": {"hidden": True, "model_id": gpt},
        }
        for n, (label, extra) in enumerate(invisible.items()):
            self._add(
                f"invisible {label}",
                kind="image",
                mime_type="image/png",
                content=Raster(900 + n, 64, 64),
                origin="txt2img",
                prompt=f"{label} draft",
                collection_ids=self._in("hidden", "hero"),
                **extra,
            )

    # ----------------------------------------------------------------- lookups

    def asset(self, asset_id: str) -> SampleAsset | None:
        return self._assets_by_id.get(asset_id)

    def model(self, model_id: str) -> SampleModel | None:
        return self._models_by_id.get(model_id)

    # ----------------------------------------------------------------- wire shapes

    def asset_json(self, asset: SampleAsset, url: str) -> dict[str, Any]:
        """The asset as the API returns it, every schema-required field included; `url` signed."""
        size = len(asset.original())
        metadata: dict[str, Any] = {"kind": asset.kind, "type": asset.origin}
        properties: dict[str, Any] = {"size": size}
        content = asset.content
        if isinstance(content, Raster | Clip):
            dims = {"width": content.width, "height": content.height}
            metadata |= dims
            properties |= dims
        if isinstance(content, Clip):
            properties |= {
                "duration": content.frames / content.fps,
                "frameRate": content.fps,
                "nbFrames": content.frames,
                "codecName": "mjpeg",
            }
        if isinstance(content, Mesh):
            axes = list(zip(*content.positions, strict=True))
            properties |= {
                "format": "glb",
                "vertexCount": len(content.positions),
                "faceCount": len(content.triangles),
                "hasUVs": False,
                "hasNormals": False,
                "hasSkeleton": False,
                "hasAnimations": False,
                "dimensions": [max(a) - min(a) for a in axes],
            }
        if asset.model_id:
            metadata |= {"modelId": asset.model_id, "seed": str(asset.created_ms % 100_000)}
        if asset.inference_id:
            metadata["inferenceId"] = asset.inference_id
        if asset.prompt:
            metadata["prompt"] = asset.prompt
        if asset.file_name:
            metadata |= {"name": asset.file_name, "size": size}
        wire: dict[str, Any] = {
            "id": asset.id,
            "url": url,
            "mimeType": asset.mime_type,
            "kind": asset.kind,
            "source": asset.origin,
            "status": asset.status,
            "privacy": "private",
            "ownerId": self.project_id,
            "authorId": self.author_id,
            "createdAt": iso_ms(asset.created_ms),
            "updatedAt": iso_ms(asset.updated_ms),
            "tags": list(asset.tags),
            "collectionIds": list(asset.collection_ids),
            "editCapabilities": list(_IMAGE_CAPABILITIES) if asset.kind == "image" else [],
            "metadata": metadata,
            "properties": properties,
        }
        if asset.hidden:
            wire["isHidden"] = True
        if asset.deleted_ms is not None:
            wire["deletedAt"] = iso_ms(asset.deleted_ms)
        return wire

    def collection_json(self, collection: SampleCollection) -> dict[str, Any]:
        count = sum(collection.id in a.collection_ids for a in self.assets)
        return {
            "id": collection.id,
            "name": collection.name,
            "assetCount": count,
            "modelCount": 0,
            "itemCount": count,
            "ownerId": self.project_id,
            "createdAt": iso_ms(collection.created_ms),
            "updatedAt": iso_ms(collection.created_ms + 3_600_000),
        }

    def model_json(self, model: SampleModel, *, minimal: bool = False) -> dict[str, Any]:
        """A model record; `minimal` is get-bulk's "only id, name, type" (name when it has one)."""
        named = {"name": model.name} if model.name is not None else {}
        if minimal:
            return {"id": model.id, **named, "type": model.type}
        public = model.privacy == "public"
        wire: dict[str, Any] = {
            "id": model.id,
            **named,
            "type": model.type,
            "privacy": model.privacy,
            "status": "trained",
            "source": "other" if public else "scenario",
            "custom": model.type == "custom",
            "capabilities": list(model.capabilities),
            "tags": [],
            "collectionIds": [],
            "exampleAssetIds": [a.id for a in self.assets if a.model_id == model.id][:3],
            "trainingImagesNumber": 0 if public else 12,
            "ownerId": self.project_id,
            "authorId": self.author_id,
            "createdAt": iso_ms(model.created_ms),
            "updatedAt": iso_ms(model.created_ms + 3_600_000),
        }
        if model.short_description:
            wire["shortDescription"] = model.short_description
        return wire

    # ----------------------------------------------------------------- the oracle

    @staticmethod
    def _files_of(asset: SampleAsset) -> Iterable[tuple[str, ExpectedFile]]:
        yield (
            f"{asset.id}.{asset.native_ext}",
            ExpectedFile(asset.id, None, asset.mtime, asset.original),
        )
        for fmt in listed_formats(asset.kind):
            if fmt != asset.native_ext:
                read = functools.partial(asset.transformed, fmt)
                yield f"{asset.id}.{fmt}", ExpectedFile(asset.id, fmt, asset.mtime, read)

    def _directories(self) -> dict[str, list[SampleAsset]]:
        """Every directory under `scenario/` with the visible assets it lists."""
        visible = [a for a in self.assets if a.visible]
        dirs: dict[str, list[SampleAsset]] = {"assets": visible, "collections": [], "models": []}
        names = directory_names((c.id, c.name) for c in self.collections)
        for collection in self.collections:
            members = [a for a in visible if collection.id in a.collection_ids]
            dirs[f"collections/{names[collection.id]}"] = members
        used = [self._models_by_id[m] for m in dict.fromkeys(a.model_id for a in visible) if m]
        names = directory_names((m.id, m.name if m.name is not None else m.id) for m in used)
        for model in used:
            dirs[f"models/{names[model.id]}"] = [a for a in visible if a.model_id == model.id]
        return dirs

    def expected_dirs(self) -> set[str]:
        """Every directory the mount shows under `scenario/`, as paths relative to it."""
        return set(self._directories())

    def expected_tree(self) -> dict[str, ExpectedFile]:
        """Every file the mount shows under `scenario/` (relative path → expected file)."""
        return {
            f"{directory}/{name}": expected
            for directory, assets in self._directories().items()
            for asset in assets
            for name, expected in self._files_of(asset)
        }
