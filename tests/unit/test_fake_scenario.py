"""The fake Scenario service: API behaviour, CDN behaviour, real file formats, and its oracle.

Everything goes through real sockets with httpx, as fsmount and the SDK talk to it. These tests
pin the fake to scenario-api.md, so that a test passing against the fake means something.
"""

from __future__ import annotations

import base64
import io
import json
import math
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from typing import Any

import httpx
import pillow_heif
import pytest
from PIL import Image

from fsmount.demo.scenario import DEFAULT_URL_EXPIRY, REQUEST_KINDS, ScenarioFake
from fsmount.demo.scenario_export import STATUSES
from fsmount.demo.scenario_samples import IMAGE_FORMATS, PILLOW_FORMAT, SampleAsset

pillow_heif.register_heif_opener()

REQUIRED_ASSET_FIELDS = {
    "id",
    "authorId",
    "collectionIds",
    "createdAt",
    "editCapabilities",
    "kind",
    "metadata",
    "mimeType",
    "ownerId",
    "privacy",
    "properties",
    "source",
    "status",
    "tags",
    "updatedAt",
    "url",
}
CONVERTED_MIME = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "webp": "image/webp",
    "avif": "image/avif",
    "tif": "image/tiff",
    "gif": "image/gif",
    "heif": "image/heif",
}
PILLOW_NAMES = PILLOW_FORMAT


@pytest.fixture(scope="module")
def fake() -> Iterator[ScenarioFake]:
    with ScenarioFake() as running:
        yield running


@pytest.fixture(autouse=True)
def fresh_knobs(fake: ScenarioFake) -> None:
    fake.url_expiry = DEFAULT_URL_EXPIRY
    fake.redirect_first_hit = False
    fake.reset_export()
    fake.reset_counters()


@pytest.fixture
def api(fake: ScenarioFake) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.api_url, auth=(fake.key, fake.secret), timeout=30) as client:
        yield client


@pytest.fixture
def cdn() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


def first(fake: ScenarioFake, *, kind: str, mime: str | None = None) -> SampleAsset:
    return next(
        a
        for a in fake.samples.assets
        if a.visible and a.kind == kind and (mime is None or a.mime_type == mime)
    )


def download_url(api: httpx.Client, asset_id: str, target: str | None = None) -> dict[str, Any]:
    body = {"targetFormat": target} if target else {}
    reply = api.post(f"/assets/{asset_id}/download", json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()


def list_all(api: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    assets: list[dict[str, Any]] = []
    token = None
    while True:
        page = api.get("/assets", params={**params, "paginationToken": token} if token else params)
        assert page.status_code == 200, page.text
        body = page.json()
        assets += body["assets"]
        token = body.get("nextPaginationToken")
        if not token:
            return assets


# --------------------------------------------------------------------------- authentication


def test_requests_without_the_right_key_and_secret_get_401_with_a_reason(
    fake: ScenarioFake,
) -> None:
    wrong = [
        None,
        (fake.key, "not-the-secret"),
        ("not-the-key", fake.secret),
    ]
    for auth in wrong:
        reply = httpx.get(f"{fake.api_url}/assets", auth=auth)
        assert reply.status_code == 401
        assert reply.json()["reason"] == "Unauthorized"
    bearer = httpx.get(f"{fake.api_url}/assets", headers={"Authorization": f"Bearer {fake.secret}"})
    assert bearer.status_code == 401
    for method, path in [("POST", "/models/get-bulk"), ("GET", "/collections")]:
        assert httpx.request(method, fake.api_url + path, json={}).status_code == 401
    assert httpx.get(f"{fake.api_url}/assets", auth=(fake.key, fake.secret)).status_code == 200


def test_a_foreign_project_id_is_forbidden(api: httpx.Client, fake: ScenarioFake) -> None:
    assert api.get("/assets", params={"projectId": fake.project_id}).status_code == 200
    refused = api.get("/assets", params={"projectId": "proj_someoneElse"})
    assert refused.status_code == 403
    assert "reason" in refused.json()


# --------------------------------------------------------------------------- pagination


def test_page_size_defaults_to_50_and_caps_at_100(api: httpx.Client) -> None:
    default = api.get("/assets").json()
    assert len(default["assets"]) == 50
    assert default["nextPaginationToken"]
    assert len(api.get("/assets", params={"pageSize": 100}).json()["assets"]) == 100
    for bad in (101, 0, "ten"):
        assert api.get("/assets", params={"pageSize": bad}).status_code == 400


def test_paging_visits_every_asset_once_and_the_last_page_has_no_token(
    api: httpx.Client, fake: ScenarioFake
) -> None:
    pages = []
    token = None
    while True:
        params: dict[str, Any] = {"pageSize": 50}
        if token:
            params["paginationToken"] = token
        body = api.get("/assets", params=params).json()
        pages.append(body)
        token = body.get("nextPaginationToken")
        if not token:
            break
    assert len(pages) == math.ceil(len(fake.samples.assets) / 50) >= 3
    assert "nextPaginationToken" not in pages[-1]
    ids = [a["id"] for page in pages for a in page["assets"]]
    assert len(ids) == len(set(ids)) == len(fake.samples.assets)
    assert len(fake.visible_asset_ids()) > 100  # several pages of what a client shows


def test_an_unknown_pagination_token_is_a_400(api: httpx.Client) -> None:
    forged = base64.b64encode(json.dumps({"lastKey": "asset_nope"}).encode()).decode()
    for token in ("garbage!", forged, ""):
        assert api.get("/assets", params={"paginationToken": token}).status_code == 400


def test_collections_page_by_10_and_end_with_a_null_token(
    api: httpx.Client, fake: ScenarioFake
) -> None:
    first_page = api.get("/collections").json()
    assert len(first_page["collections"]) == 10
    rest = api.get("/collections", params={"paginationToken": first_page["nextPaginationToken"]})
    last = rest.json()
    assert last["nextPaginationToken"] is None
    names = [c["name"] for c in first_page["collections"] + last["collections"]]
    assert sorted(names) == sorted(c.name for c in fake.samples.collections)
    assert names.count("Backgrounds") == 2
    assert "Props/2024" in names
    empty = next(c for c in first_page["collections"] if c["name"] == "Empty shelf")
    assert empty["assetCount"] == 0
    one = api.get("/collections", params={"pageSize": 100}).json()
    assert len(one["collections"]) == len(names)
    assert api.get("/collections", params={"pageSize": 101}).status_code == 400


# --------------------------------------------------------------------------- filters and order


def test_collection_and_model_filters_return_exactly_their_assets(
    api: httpx.Client, fake: ScenarioFake
) -> None:
    for collection in fake.samples.collections:
        got = {a["id"] for a in list_all(api, collectionId=collection.id, pageSize=100)}
        assert got == {a.id for a in fake.samples.assets if collection.id in a.collection_ids}
    empty = fake.samples.collection_ids["empty"]
    assert api.get("/assets", params={"collectionId": empty}).json() == {"assets": []}
    for model in fake.samples.models:
        got = {a["id"] for a in list_all(api, modelId=model.id)}
        assert got == {a.id for a in fake.samples.assets if a.model_id == model.id}
    sprites = fake.samples.collection_ids["sprites"]
    assert len(list_all(api, collectionId=sprites)) > 50  # a collection spanning two pages


def test_sort_order_follows_sort_by_and_direction(api: httpx.Client) -> None:
    newest_first = [a["createdAt"] for a in list_all(api, pageSize=100)]
    assert newest_first == sorted(newest_first, reverse=True)
    asc = list_all(api, pageSize=100, sortBy="updatedAt", sortDirection="asc")
    assert [a["updatedAt"] for a in asc] == sorted(a["updatedAt"] for a in asc)
    assert api.get("/assets", params={"sortBy": "name"}).status_code == 400
    assert api.get("/assets", params={"sortDirection": "up"}).status_code == 400


def test_invisible_assets_are_listed_and_marked(api: httpx.Client, fake: ScenarioFake) -> None:
    listed = {a["id"]: a for a in list_all(api, pageSize=100)}
    invisible = [a for a in fake.samples.assets if not a.visible]
    assert {a.status for a in invisible} >= {"pending", "error"}
    for asset in invisible:
        wire = listed[asset.id]
        assert wire["status"] != "success" or wire.get("isHidden") is True or "deletedAt" in wire, (
            wire
        )
    deleted = api.get("/assets", params={"deleted": "true"}).json()["assets"]
    assert deleted and all("deletedAt" in a for a in deleted)


# --------------------------------------------------------------------------- single assets


def test_get_asset_wraps_it_and_unknown_ids_are_404(api: httpx.Client, fake: ScenarioFake) -> None:
    asset = fake.samples.assets[0]
    body = api.get(f"/assets/{asset.id}").json()
    assert set(body) == {"asset"}
    assert body["asset"]["id"] == asset.id
    missing = api.get("/assets/asset_doesNotExist")
    assert missing.status_code == 404
    assert missing.json()["reason"] == "Asset not found"


def test_every_asset_has_the_schema_required_fields_and_its_exact_size(
    api: httpx.Client, cdn: httpx.Client, fake: ScenarioFake
) -> None:
    listed = list_all(api, pageSize=100)
    for wire in listed:
        assert set(wire) >= REQUIRED_ASSET_FIELDS, wire["id"]
        assert wire["metadata"]["kind"] == wire["kind"]
        assert wire["ownerId"] == fake.project_id
        assert wire["createdAt"].endswith("Z") and len(wire["createdAt"]) == 24
    for kind, mime in [
        ("image", "image/png"),
        ("image", "image/jpeg"),
        ("3d", None),
        ("video", None),
    ]:
        asset = first(fake, kind=kind, mime=mime)
        wire = next(w for w in listed if w["id"] == asset.id)
        body = cdn.get(download_url(api, asset.id)["url"]).content
        assert len(body) == wire["properties"]["size"]
        assert body == asset.original()


# --------------------------------------------------------------------------- downloads


def test_download_without_target_format_is_the_original_and_the_listing_url_is_not(
    api: httpx.Client, cdn: httpx.Client, fake: ScenarioFake
) -> None:
    asset = first(fake, kind="image", mime="image/png")
    link = download_url(api, asset.id)
    assert link["mimeType"] == "image/png"
    original = cdn.get(link["url"]).content
    assert original == asset.original()
    listing_url = api.get(f"/assets/{asset.id}").json()["asset"]["url"]
    transformed = cdn.get(listing_url)
    assert transformed.status_code == 200
    assert transformed.content != original  # re-encoded: a client must not take it as original
    raw_url = api.get(f"/assets/{asset.id}", params={"originalAssets": "true"}).json()["asset"]
    assert cdn.get(raw_url["url"]).content == original


@pytest.mark.parametrize(
    ("kind", "mime", "target"),
    [
        ("image", "image/png", "glb"),
        ("image", "image/jpeg", "svg"),
        ("image", "image/png", "mp4"),
        ("3d", None, "png"),
        ("3d", None, "jpeg"),
        ("video", None, "png"),
        ("video", None, "glb"),
        ("image", "image/png", "bmp"),
    ],
)
def test_a_format_the_kind_cannot_take_is_a_400(
    api: httpx.Client, fake: ScenarioFake, kind: str, mime: str | None, target: str
) -> None:
    asset = first(fake, kind=kind, mime=mime)
    reply = api.post(f"/assets/{asset.id}/download", json={"targetFormat": target})
    assert reply.status_code == 400
    assert target in reply.json()["reason"]


def test_video_accepts_only_its_stored_format_which_is_the_original(
    api: httpx.Client, cdn: httpx.Client, fake: ScenarioFake
) -> None:
    video = first(fake, kind="video")
    link = download_url(api, video.id, "mp4")
    assert link["mimeType"] == "video/mp4"
    assert cdn.get(link["url"]).content == video.original()


def test_pending_assets_cannot_be_downloaded(api: httpx.Client, fake: ScenarioFake) -> None:
    pending = next(a for a in fake.samples.assets if a.status == "pending")
    assert api.post(f"/assets/{pending.id}/download", json={}).status_code == 400


@pytest.mark.parametrize("mime", ["image/png", "image/jpeg"])
def test_every_image_conversion_is_a_real_file_of_that_format(
    api: httpx.Client, cdn: httpx.Client, fake: ScenarioFake, mime: str
) -> None:
    asset = first(fake, kind="image", mime=mime)
    for fmt in IMAGE_FORMATS:
        link = download_url(api, asset.id, fmt)
        assert link["mimeType"] == CONVERTED_MIME[fmt]
        body = cdn.get(link["url"]).content
        picture = Image.open(io.BytesIO(body))
        assert picture.format == PILLOW_NAMES[fmt], fmt
        assert picture.size == (64, 64)
        picture.load()
        assert body == asset.transformed(fmt) != asset.original()  # even the native format


def test_jpeg_and_tiff_are_aliases_of_jpg_and_tif(
    api: httpx.Client, cdn: httpx.Client, fake: ScenarioFake
) -> None:
    asset = first(fake, kind="image", mime="image/png")
    for alias, canonical, mime in [("jpeg", "jpg", "image/jpeg"), ("tiff", "tif", "image/tiff")]:
        by_alias, by_name = (
            download_url(api, asset.id, alias),
            download_url(api, asset.id, canonical),
        )
        assert by_alias["mimeType"] == by_name["mimeType"] == mime
        assert cdn.get(by_alias["url"]).content == cdn.get(by_name["url"]).content


# --------------------------------------------------------------------------- 3D and video files


def parse_glb(data: bytes) -> tuple[dict[str, Any], bytes]:
    """Check a GLB's container strictly (header, both chunks, lengths); return JSON and BIN."""
    magic, version, total = struct.unpack_from("<4sII", data, 0)
    assert (magic, version, total) == (b"glTF", 2, len(data))
    json_length, json_type = struct.unpack_from("<I4s", data, 12)
    assert json_type == b"JSON" and json_length % 4 == 0
    document = json.loads(data[20 : 20 + json_length])
    bin_length, bin_type = struct.unpack_from("<I4s", data, 20 + json_length)
    assert bin_type == b"BIN\0" and bin_length % 4 == 0
    assert 28 + json_length + bin_length == len(data)
    return document, data[28 + json_length :]


def glb_mesh(data: bytes) -> tuple[list[tuple[float, ...]], list[int]]:
    document, binary = parse_glb(data)
    assert document["asset"]["version"] == "2.0"
    assert document["buffers"][0]["byteLength"] == len(binary)
    primitive = document["meshes"][0]["primitives"][0]
    positions = document["accessors"][primitive["attributes"]["POSITION"]]
    indices = document["accessors"][primitive["indices"]]
    views = document["bufferViews"]
    start = views[positions["bufferView"]]["byteOffset"]
    points = list(struct.iter_unpack("<3f", binary[start : start + 12 * positions["count"]]))
    start = views[indices["bufferView"]]["byteOffset"]
    index_list = list(struct.unpack_from(f"<{indices['count']}H", binary, start))
    assert max(index_list) < len(points)
    assert [min(p[i] for p in points) for i in range(3)] == positions["min"]
    return points, index_list


def test_3d_assets_are_valid_glb_and_their_obj_and_fbx_hold_the_same_mesh(
    api: httpx.Client, cdn: httpx.Client, fake: ScenarioFake
) -> None:
    meshes = [a for a in fake.samples.assets if a.kind == "3d"]
    assert len(meshes) >= 3
    for asset in meshes:
        native = cdn.get(download_url(api, asset.id)["url"])
        assert native.headers["content-type"] == "application/octet-stream"
        points, indices = glb_mesh(native.content)
        converted = download_url(api, asset.id, "glb")
        assert converted["mimeType"] == "model/gltf-binary"
        assert glb_mesh(cdn.get(converted["url"]).content) == (points, indices)

        obj = cdn.get(download_url(api, asset.id, "obj")["url"]).text.splitlines()
        vertices = [tuple(float(v) for v in line.split()[1:]) for line in obj if line[:2] == "v "]
        faces = [int(i) - 1 for line in obj if line[:2] == "f " for i in line.split()[1:]]
        assert vertices == points and faces == indices

        fbx = cdn.get(download_url(api, asset.id, "fbx")["url"]).text
        assert fbx.startswith("; FBX 7.4.0 project file")
        assert "FBXVersion: 7400" in fbx
        assert f"Vertices: *{3 * len(points)} {{" in fbx
        polygon = fbx.split("PolygonVertexIndex:")[1].split("a: ")[1].split("\n")[0]
        stored = [int(i) for i in polygon.split(",")]
        assert [i if i >= 0 else -i - 1 for i in stored] == indices
        assert all(i < 0 for i in stored[2::3])  # FBX marks each polygon's last index


def boxes(data: bytes, start: int = 0, end: int | None = None) -> dict[bytes, bytes]:
    """Top-level ISO-BMFF boxes of `data[start:end]` by type; sizes must tile the range exactly."""
    end = len(data) if end is None else end
    found: dict[bytes, bytes] = {}
    while start < end:
        size, kind = struct.unpack_from(">I4s", data, start)
        assert size >= 8 and start + size <= end
        found[kind] = data[start + 8 : start + size]
        start += size
    assert start == end
    return found


def test_videos_are_mp4_with_decodable_jpeg_frames(
    api: httpx.Client, cdn: httpx.Client, fake: ScenarioFake
) -> None:
    for asset in (a for a in fake.samples.assets if a.kind == "video"):
        data = cdn.get(download_url(api, asset.id)["url"]).content
        top = boxes(data)
        assert list(top) == [b"ftyp", b"moov", b"mdat"]
        assert top[b"ftyp"][:4] == b"isom"
        moov = boxes(top[b"moov"])
        trak = boxes(moov[b"trak"])
        stbl = boxes(boxes(boxes(trak[b"mdia"])[b"minf"])[b"stbl"])
        assert stbl[b"stsd"][8 + 4 : 8 + 8] == b"mp4v"
        count = struct.unpack_from(">I", stbl[b"stsz"], 8)[0]
        sizes = struct.unpack_from(f">{count}I", stbl[b"stsz"], 12)
        (offset,) = struct.unpack_from(">I", stbl[b"stco"], 8)
        assert sum(sizes) == len(top[b"mdat"])
        assert data[offset - 8 : offset] == struct.pack(">I4s", 8 + sum(sizes), b"mdat")
        for size in sizes:
            frame = Image.open(io.BytesIO(data[offset : offset + size]))
            assert frame.format == "JPEG"
            offset += size


# --------------------------------------------------------------------------- CDN


def test_the_cdn_is_another_origin_and_refuses_the_api_authorization(
    api: httpx.Client, cdn: httpx.Client, fake: ScenarioFake
) -> None:
    assert httpx.URL(fake.cdn_url).port != httpx.URL(fake.api_url).port
    url = download_url(api, first(fake, kind="image").id)["url"]
    assert url.startswith(fake.cdn_url + "/")
    assert cdn.get(url).status_code == 200
    refused = cdn.get(url, auth=(fake.key, fake.secret))
    assert refused.status_code == 400
    assert b"<Error>" in refused.content


def test_an_expired_url_is_a_403_access_denied(
    api: httpx.Client, cdn: httpx.Client, fake: ScenarioFake
) -> None:
    asset = first(fake, kind="image")
    fake.url_expiry = 1.5
    url = download_url(api, asset.id)["url"]
    assert cdn.get(url).status_code == 200
    deadline = time.monotonic() + 5
    while (reply := cdn.get(url)).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert reply.status_code == 403
    assert b"<Code>AccessDenied</Code>" in reply.content
    fake.url_expiry = 0  # already expired when handed out
    assert cdn.get(download_url(api, asset.id, "webp")["url"]).status_code == 403


def test_a_tampered_url_is_a_403(api: httpx.Client, cdn: httpx.Client, fake: ScenarioFake) -> None:
    asset, other = [a for a in fake.samples.assets if a.kind == "image"][:2]
    url = download_url(api, asset.id, "webp")["url"]
    signature = url.split("Signature=")[1][:4]
    flipped = signature[:3] + ("A" if signature[3] != "A" else "B")
    tampered = [
        url.replace("format=webp", "format=png"),
        url.replace(asset.id, other.id),
        url.replace(f"Signature={signature}", f"Signature={flipped}"),
        url.split("&Policy=")[0],
        url.replace("Key-Pair-Id=", "Key-Pair-Id=X"),
    ]
    for bad in tampered:
        reply = cdn.get(bad)
        assert reply.status_code == 403, bad
        assert b"AccessDenied" in reply.content
    assert cdn.get(url + "&width=256").status_code == 200  # the policy's wildcard allows this


def test_redirect_first_hit_sends_each_new_url_elsewhere_once(
    api: httpx.Client, cdn: httpx.Client, fake: ScenarioFake
) -> None:
    asset = first(fake, kind="3d")
    fake.redirect_first_hit = True
    url = download_url(api, asset.id)["url"]
    hop = cdn.get(url)
    assert hop.status_code == 302
    location = hop.headers["location"]
    assert location.startswith(fake.cdn_url + "/") and location != url
    assert "Signature=" in location and "Policy=" in location
    assert cdn.get(location).content == asset.original()
    assert cdn.get(url).status_code == 200  # only the first hit is redirected
    followed = cdn.get(download_url(api, asset.id, "obj")["url"], follow_redirects=True)
    assert len(followed.history) == 1 and followed.content == asset.transformed("obj")
    fake.redirect_first_hit = False
    assert cdn.get(download_url(api, asset.id)["url"]).status_code == 200


def test_ranges_are_honoured(api: httpx.Client, cdn: httpx.Client, fake: ScenarioFake) -> None:
    poster = max(
        (a for a in fake.samples.assets if a.kind == "image"), key=lambda a: len(a.original())
    )
    data = poster.original()
    assert len(data) > 100_000
    url = download_url(api, poster.id)["url"]
    part = cdn.get(url, headers={"Range": "bytes=1000-1999"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 1000-1999/{len(data)}"
    assert part.content == data[1000:2000]
    probe = cdn.get(url, headers={"Range": "bytes=0-0"})
    assert probe.headers["content-range"] == f"bytes 0-0/{len(data)}"
    assert cdn.get(url, headers={"Range": "bytes=-10"}).content == data[-10:]
    assert cdn.get(url, headers={"Range": f"bytes={len(data)}-"}).status_code == 416
    head = cdn.head(url)
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(data)


# --------------------------------------------------------------------------- batch export


def export_body(asset_ids: list[str], template: str = "<id>", **options: Any) -> dict[str, Any]:
    return {
        "options": {"fileNameTemplate": template, **options},
        "query": {"assetIds": asset_ids, "inferenceIds": [], "modelIds": []},
    }


def finished_job(api: httpx.Client, body: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Start a job and poll it until it ends: the statuses seen, and the last answer."""
    reply = api.post("/assets/download", json=body)
    assert reply.status_code == 200, reply.text
    job_id = reply.json()["jobId"]
    seen: list[str] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        answer = api.get(f"/assets/download/{job_id}").json()
        assert answer["jobId"] == job_id
        if not seen or seen[-1] != answer["jobStatus"]:
            seen.append(answer["jobStatus"])
        if answer["jobStatus"] in ("success", "failure", "canceled"):
            return seen, answer
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} never ended: {seen}")


def visible(fake: ScenarioFake, count: int) -> list[SampleAsset]:
    return [a for a in fake.samples.assets if a.visible][:count]


def test_a_dry_run_answers_269_with_the_cost_and_starts_nothing(
    api: httpx.Client, fake: ScenarioFake
) -> None:
    ids = [a.id for a in visible(fake, 5)]
    for mode in ("true", "api"):
        reply = api.post("/assets/download", params={"dryRun": mode}, json=export_body(ids))
        assert reply.status_code == 269
        assert reply.json() == {"creativeUnitsCost": 3}  # half a unit per asset, rounded up
    fake.export_unit_cost = 0
    free = api.post("/assets/download", params={"dryRun": "true"}, json=export_body(ids))
    assert free.json() == {"creativeUnitsCost": 0}
    bad = api.post("/assets/download", params={"dryRun": "yes"}, json=export_body(ids))
    assert bad.status_code == 400


def test_export_requests_are_checked_and_limited_to_1000_assets(
    api: httpx.Client, fake: ScenarioFake
) -> None:
    ids = [a.id for a in visible(fake, 3)]
    hidden = next(a for a in fake.samples.assets if a.status == "pending")
    refused = {
        "no template": {"options": {}, "query": export_body(ids)["query"]},
        "no query lists": {"options": {"fileNameTemplate": "<id>"}, "query": {"assetIds": ids}},
        "unknown asset": export_body([*ids, "asset_doesNotExist"]),
        "pending asset": export_body([hidden.id]),
        "nothing": export_body([]),
        "1001 assets": export_body([f"asset_{n}" for n in range(1001)]),
    }
    for what, body in refused.items():
        reply = api.post("/assets/download", json=body)
        assert reply.status_code == 400, what
        assert "reason" in reply.json(), what
    assert "limited to 1000" in api.post("/assets/download", json=refused["1001 assets"]).text
    fake.export_limit = 2
    assert api.post("/assets/download", json=export_body(ids)).status_code == 400
    assert api.get("/assets/download/job_doesNotExist").status_code == 404


def test_a_job_moves_through_the_statuses_then_links_a_zip_of_the_originals(
    api: httpx.Client, cdn: httpx.Client, fake: ScenarioFake
) -> None:
    assets = visible(fake, 6)
    seen, answer = finished_job(api, export_body([a.id for a in assets], flat=True))
    assert seen[-1] == "success" and set(seen[:-1]) <= set(STATUSES)
    assert len(seen) >= 3, seen  # it takes a while, one status after another
    assert [STATUSES.index(s) for s in seen[:-1]] == sorted(STATUSES.index(s) for s in seen[:-1])
    url = answer["downloadUrl"]
    assert url.startswith(fake.cdn_url + "/exports/") and "Signature=" in url
    reply = cdn.get(url)
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(reply.content)) as archive:
        members = archive.infolist()
        assert [m.filename for m in members] == [f"{a.id}.{a.native_ext}" for a in assets]
        for member, asset in zip(members, assets, strict=True):
            assert member.flag_bits & 0x8  # sizes after the data, as a streaming writer puts them
            assert member.compress_type == zipfile.ZIP_DEFLATED
            assert archive.read(member) == asset.original()
    tail = cdn.get(url, headers={"Range": "bytes=-100"})
    assert tail.status_code == 206 and tail.content == reply.content[-100:]
    assert fake.log.count("export-zip") == 2


def test_templates_make_folders_drop_repeated_tokens_and_flat_keeps_names_only(
    api: httpx.Client, cdn: httpx.Client, fake: ScenarioFake
) -> None:
    asset = next(a for a in fake.samples.assets if a.visible and a.prompt == "mossy boulder")
    body = export_body([asset.id], "<prompt>/<id>-<prompt>_<id>")
    _, answer = finished_job(api, body)
    with zipfile.ZipFile(io.BytesIO(cdn.get(answer["downloadUrl"]).content)) as archive:
        assert archive.namelist() == [f"mossy_boulder/{asset.id}.{asset.native_ext}"]
    _, answer = finished_job(api, export_body([asset.id], "<prompt>/<id>", flat=True))
    with zipfile.ZipFile(io.BytesIO(cdn.get(answer["downloadUrl"]).content)) as archive:
        assert archive.namelist() == [f"{asset.id}.{asset.native_ext}"]


def test_injected_export_failures(api: httpx.Client, cdn: httpx.Client, fake: ScenarioFake) -> None:
    ids = [a.id for a in visible(fake, 4)]
    for outcome in ("failure", "canceled"):
        fake.export_outcome = outcome
        seen, answer = finished_job(api, export_body(ids))
        assert seen[-1] == outcome and "downloadUrl" not in answer
    fake.reset_export()
    fake.export_hook = lambda entries: [*entries[1:], ("stray.txt", b"stray")]
    _, answer = finished_job(api, export_body(ids))
    data = cdn.get(answer["downloadUrl"]).content
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.namelist()[-1] == "stray.txt" and len(archive.namelist()) == 4
    fake.export_cut_at = 0.5
    with pytest.raises(httpx.RemoteProtocolError):
        cdn.get(answer["downloadUrl"])
    with cdn.stream("GET", answer["downloadUrl"], headers={"Range": "bytes=10-"}) as cut:
        got = bytearray()
        with pytest.raises(httpx.RemoteProtocolError):
            for chunk in cut.iter_raw():
                got += chunk
    assert bytes(got) == data[10 : len(data) // 2]
    fake.url_expiry = -1  # links handed out already expired
    _, answer = finished_job(api, export_body(ids))
    assert cdn.get(answer["downloadUrl"]).status_code == 403


# --------------------------------------------------------------------------- models


def test_models_listing_and_bulk_lookup(api: httpx.Client, fake: ScenarioFake) -> None:
    private = api.get("/models").json()
    assert {m["privacy"] for m in private["models"]} == {"private"}
    assert "nextPaginationToken" not in private
    public = api.get("/models", params={"privacy": "public"}).json()["models"]
    assert "model_openai-gpt-image-2" in {m["id"] for m in public}
    nameless = fake.samples.model_ids["nameless"]
    asked = [nameless, "model_openai-gpt-image-2", "model_unknown"]
    reply = api.post("/models/get-bulk", json={"modelIds": asked, "minimal": True}).json()
    assert reply["models"] == [
        {"id": nameless, "type": "flux.1-lora"},
        {"id": "model_openai-gpt-image-2", "name": "GPT Image 2", "type": "custom"},
    ]
    full = api.post("/models/get-bulk", json={"modelIds": [nameless]}).json()["models"][0]
    assert "name" not in full and full["status"] == "trained"
    assert api.post("/models/get-bulk", json={"modelIds": "x"}).status_code == 400
    assert api.post("/models/get-bulk", content=b"{not json").status_code == 400


# --------------------------------------------------------------------------- request log


def test_every_request_is_counted_by_kind_with_its_headers(
    api: httpx.Client, cdn: httpx.Client, fake: ScenarioFake
) -> None:
    asset = first(fake, kind="image")
    api.get("/assets", params={"pageSize": 1})
    api.get(f"/assets/{asset.id}")
    url = download_url(api, asset.id)["url"]
    api.get("/collections")
    api.get("/models")
    api.post("/models/get-bulk", json={"modelIds": []})
    cdn.get(url)
    fake.export_step = 0
    job = api.post("/assets/download", json=export_body([asset.id])).json()["jobId"]
    cdn.get(api.get(f"/assets/download/{job}").json()["downloadUrl"])
    assert fake.log.counts() == {kind: 1 for kind in REQUEST_KINDS}
    assert fake.log.entries("download")[0].method == "POST"
    assert fake.log.entries("assets")[0].headers["authorization"].startswith("Basic ")
    assert "authorization" not in fake.log.entries("cdn")[0].headers
    fake.reset_counters()
    assert fake.log.counts() == {}


# --------------------------------------------------------------------------- the oracle


def test_the_oracle_follows_the_product_contract(fake: ScenarioFake) -> None:
    tree, dirs = fake.expected_tree(), fake.expected_dirs()
    ids = fake.samples.collection_ids
    collections = {d.split("/", 1)[1] for d in dirs if d.startswith("collections/")}
    assert f"Backgrounds ({ids['bg-a']})" in collections
    assert f"Backgrounds ({ids['bg-b']})" in collections
    assert "Backgrounds" not in collections
    assert {"Props_2024", "_dotfiles", "Nightshots", "Empty shelf", "Hidden only"} <= collections
    assert "Cafe\u0301 (NFD)" in collections  # kept byte for byte, not normalised to "Café"
    assert len(collections) == len(fake.samples.collections)
    for empty in ("collections/Empty shelf", "collections/Hidden only"):
        assert not any(path.startswith(empty + "/") for path in tree)

    models = {d.split("/", 1)[1] for d in dirs if d.startswith("models/")}
    model_ids = fake.samples.model_ids
    assert {"GPT Image 2", "Hunyuan 3D 2.1", "Kling 2.1", "Stone Golem v2", "Ink_Wash"} <= models
    assert model_ids["nameless"] in models
    assert {f"Pixel Art ({model_ids['pixel-a']})", f"Pixel Art ({model_ids['pixel-b']})"} <= models
    assert not {"Drafts Only", "Unused Style", "Pixel Art"} & models
    assert {"assets", "collections", "models"} <= dirs

    visible = fake.visible_asset_ids()
    per_asset: dict[str, set[str]] = {}
    for path, expected in tree.items():
        assert expected.asset_id in visible
        if path.startswith("assets/"):
            per_asset.setdefault(expected.asset_id, set()).add(path.rsplit(".", 1)[1])
    assert set(per_asset) == visible
    for asset in fake.samples.assets:
        if asset.visible:
            wanted = {"image": set(IMAGE_FORMATS), "3d": {"glb", "fbx", "obj"}}
            assert per_asset[asset.id] == wanted.get(asset.kind, {asset.native_ext})
    native = first(fake, kind="image", mime="image/jpeg")
    assert tree[f"assets/{native.id}.jpg"].data == native.original()
    assert tree[f"assets/{native.id}.jpg"].target_format is None
    assert tree[f"assets/{native.id}.jpg"].mtime == native.updated_ms / 1000


FINGERPRINT = """
import hashlib, json
from fsmount.demo.scenario_samples import ScenarioSamples
samples = ScenarioSamples()
chosen = {samples.assets[3].id, *(a.id for a in samples.assets if a.kind in ("3d", "video"))}
tree = samples.expected_tree().items()
print(json.dumps({p: hashlib.sha256(f.data).hexdigest() for p, f in tree if f.asset_id in chosen}))
"""


def test_samples_are_identical_in_every_process() -> None:
    """Ids, times and every encoder's output must not depend on the run: caches outlive it."""
    runs = [
        json.loads(subprocess.check_output([sys.executable, "-c", FINGERPRINT], text=True))
        for _ in range(2)
    ]
    assert len(runs[0]) > 7 + 3 + 1
    assert runs[0] == runs[1]
