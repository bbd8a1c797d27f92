"""The fake Grand Challenge, over real sockets: every rule of grand-challenge-api.md it promises.

fsmount's own tests trust this fake, so each behaviour it imitates is pinned here against the
reference, independently of fsmount.
"""

from __future__ import annotations

import io
import json
import ssl
import time
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
import SimpleITK
from PIL import Image as PILImage

from fsmount.demo.content import pattern
from fsmount.demo.gc_samples import COHORT_SIZE, HUGE_SIZE
from fsmount.demo.grand_challenge import GrandChallengeFake
from fsmount.demo.httpcommon import make_tls

CIV_FIELDS = {"socket", "interface", "value", "file", "image", "pk"}
SOCKET_FIELDS = {
    "title",
    "description",
    "slug",
    "kind",
    "pk",
    "default_value",
    "super_kind",
    "relative_path",
    "overlay_segments",
    "look_up_table",
}
ITEM_FIELDS = {
    "pk",
    "title",
    "archive",
    "values",
    "hanging_protocol",
    "optional_hanging_protocols",
    "view_content",
}
IMAGE_FIELDS = {
    "pk",
    "name",
    "files",
    "dicom_image_set",
    "width",
    "height",
    "depth",
    "color_space",
    "modality",
    "eye_choice",
    "stereoscopic_choice",
    "field_of_view",
    "shape_without_color",
    "shape",
    "voxel_width_mm",
    "voxel_height_mm",
    "voxel_depth_mm",
    "api_url",
    "window_center",
    "window_width",
    "segments",
}


@pytest.fixture(scope="module")
def gc() -> Iterator[GrandChallengeFake]:
    with GrandChallengeFake() as fake:
        yield fake


@pytest.fixture
def api(gc: GrandChallengeFake) -> Iterator[httpx.Client]:
    """An authenticated API client that, like gcapi, sends the keyword upper-case."""
    headers = {"Authorization": f"BEARER {gc.token}", "Accept": "application/json"}
    with httpx.Client(base_url=gc.api_url, headers=headers, timeout=30) as client:
        yield client
    gc.url_expiry = 300.0  # tests turn the knobs; the module's fake is shared
    gc.unstable_order = False
    gc.reset_faults()


@pytest.fixture
def anonymous(gc: GrandChallengeFake) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gc.api_url, timeout=30) as client:
        yield client


@pytest.fixture
def storage() -> Iterator[httpx.Client]:
    """A client for signed URLs: no Authorization, as every careful client does."""
    with httpx.Client(timeout=30) as client:
        yield client


def archive_pk(api: httpx.Client, slug: str) -> str:
    results = api.get("archives/", params={"slug": slug}).json()["results"]
    assert len(results) == 1
    return results[0]["pk"]


def items_of(api: httpx.Client, slug: str) -> list[dict]:
    page = api.get("archives/items/", params={"archive": archive_pk(api, slug), "limit": 1000})
    return page.json()["results"]


def value_at(api: httpx.Client, slug: str, relative_path: str) -> dict:
    """The first value with that relative_path in the archive's first items."""
    for item in items_of(api, slug):
        for value in item["values"]:
            if value["interface"]["relative_path"] == relative_path:
                return value
    raise AssertionError(relative_path)


def signed_url(api: httpx.Client, media_url: str) -> str:
    response = api.get(media_url)
    assert response.status_code == 302
    return response.headers["location"]


def image_file_url(api: httpx.Client, value: dict, suffix: str) -> str:
    image = api.get(value["image"]).json()
    (file,) = [f for f in image["files"] if f["file"].endswith(suffix)]
    return signed_url(api, file["file"])


# --------------------------------------------------------------------------- JSON API


def test_json_responses_are_application_json_without_charset(api: httpx.Client) -> None:
    for path in ("gcapi/", "archives/", "archives/items/?limit=1", "archives/nope/"):
        assert api.get(path).headers["content-type"] == "application/json", path


def test_gcapi_version_endpoint_needs_no_authentication(anonymous: httpx.Client) -> None:
    response = anonymous.get("gcapi/", headers={"Authorization": "Bearer wrong"})
    assert response.json() == {"latest_version": "0.16.1", "lowest_supported_version": "0.13.0"}


def test_pagination_defaults_to_100_with_absolute_sorted_links(api: httpx.Client) -> None:
    pk = archive_pk(api, "demo-cohort")
    page = api.get("archives/items/", params={"zeta": "1", "archive": pk}).json()
    assert page["count"] == COHORT_SIZE
    assert len(page["results"]) == 100
    assert page["previous"] is None
    assert page["next"] == f"{api.base_url}archives/items/?archive={pk}&limit=100&offset=100&zeta=1"


def test_pagination_clamps_and_falls_back_like_drf(api: httpx.Client) -> None:
    pk = archive_pk(api, "demo-cohort")

    def page(**params: object) -> dict:
        return api.get("archives/items/", params={"archive": pk, **params}).json()

    assert len(page(limit=5000)["results"]) == 1000
    assert len(page(limit=0)["results"]) == 100
    assert len(page(limit=-3)["results"]) == 100
    assert len(page(limit="many")["results"]) == 100
    assert page(offset="x", limit=2)["results"] == page(offset=0, limit=2)["results"]
    assert page(offset=-5, limit=2)["previous"] is None
    assert page(offset=COHORT_SIZE + 1)["results"] == []


def test_pagination_links_at_the_edges(api: httpx.Client) -> None:
    pk = archive_pk(api, "demo-cohort")
    base = f"{api.base_url}archives/items/?archive={pk}"
    last = api.get("archives/items/", params={"archive": pk, "limit": 100, "offset": 1000}).json()
    assert last["next"] is None
    assert len(last["results"]) == 50
    assert last["previous"] == f"{base}&limit=100&offset=900"
    second = api.get("archives/items/", params={"archive": pk, "limit": 100, "offset": 60}).json()
    assert second["previous"] == f"{base}&limit=100"  # offset - limit <= 0 drops offset
    assert second["next"] == f"{base}&limit=100&offset=160"


def test_pages_walk_every_item_exactly_once(api: httpx.Client) -> None:
    pk = archive_pk(api, "demo-cohort")
    seen: list[str] = []
    url: str | None = f"archives/items/?archive={pk}&limit=300"
    while url is not None:
        page = api.get(url).json()
        seen += [item["pk"] for item in page["results"]]
        url = page["next"]
    assert len(seen) == len(set(seen)) == COHORT_SIZE


def test_unstable_order_repeats_items_across_pages_but_keeps_count(
    api: httpx.Client, gc: GrandChallengeFake
) -> None:
    pk = archive_pk(api, "demo-cohort")
    gc.unstable_order = True
    seen: list[str] = []
    for offset in range(0, COHORT_SIZE, 100):
        page = api.get("archives/items/", params={"archive": pk, "offset": offset}).json()
        assert page["count"] == COHORT_SIZE
        seen += [item["pk"] for item in page["results"]]
    assert len(seen) > len(set(seen)), "pages never overlapped"
    for _ in range(6):  # listing again eventually shows everything
        for offset in range(0, COHORT_SIZE, 100):
            page = api.get("archives/items/", params={"archive": pk, "offset": offset}).json()
            seen += [item["pk"] for item in page["results"]]
    assert len(set(seen)) == COHORT_SIZE


def test_archives_by_slug_and_pk(api: httpx.Client) -> None:
    archive = api.get("archives/", params={"slug": "demo-medical"}).json()["results"][0]
    assert set(archive) == {"pk", "title", "logo", "description", "api_url", "url"}
    assert urlsplit(archive["url"]).path == "/archives/demo-medical/"  # no slug field
    assert api.get(archive["api_url"]).json() == archive
    assert api.get("archives/", params={"slug": "nope"}).json()["count"] == 0


def test_items_filter_rejects_unknown_and_malformed_archives(api: httpx.Client) -> None:
    choice = "Select a valid choice. That choice is not one of the available choices."
    for value in ("not-a-uuid", "00000000-0000-0000-0000-000000000000"):
        response = api.get("archives/items/", params={"archive": value})
        assert response.status_code == 400
        assert response.json() == {"archive": [choice]}


def test_values_carry_socket_interface_and_every_declared_field(api: httpx.Client) -> None:
    pk = archive_pk(api, "demo-medical")
    items = api.get("archives/items/", params={"archive": pk}).json()["results"]
    assert any(item["values"] == [] for item in items)
    for item in items:
        assert set(item) == ITEM_FIELDS
        assert item["archive"].endswith(f"/api/v1/archives/{pk}/")
        assert api.get(f"archives/items/{item['pk']}/").json() == item
        for value in item["values"]:
            assert set(value) == CIV_FIELDS
            assert value["socket"] == value["interface"]
            assert set(value["socket"]) == SOCKET_FIELDS
            assert isinstance(value["pk"], int)
            kind = value["socket"]["super_kind"]
            assert (value["file"] is not None) == (kind == "File")
            assert (value["image"] is not None) == (kind == "Image")


def test_image_detail_lists_its_files_on_the_api_host(api: httpx.Client) -> None:
    value = value_at(api, "demo-medical", "images/pathology-slide")
    image = api.get(value["image"]).json()
    assert set(image) == IMAGE_FIELDS
    assert [f["image_type"] for f in image["files"]] == ["TIFF", "DZI"]
    for file in image["files"]:
        assert file["image"] == image["pk"]
        assert file["file"].startswith(f"{api.base_url.scheme}://{api.base_url.netloc.decode()}/")
        assert f"/media/images/{image['pk'][:2]}/{image['pk'][2:4]}/{image['pk']}/" in file["file"]


def test_interfaces_by_slug_need_a_token(api: httpx.Client, anonymous: httpx.Client) -> None:
    page = api.get("components/interfaces/", params={"slug": "ct"}).json()
    assert page["count"] == 1
    assert page["results"][0]["relative_path"] == "images/ct"
    assert anonymous.get("components/interfaces/").status_code == 401


def test_missing_trailing_slash_redirects_permanently(api: httpx.Client) -> None:
    response = api.get("archives/items?limit=3")
    assert response.status_code == 301
    assert response.headers["location"] == "/api/v1/archives/items/?limit=3"
    assert api.get("no-such-endpoint/").status_code == 404


def test_unknown_objects_are_404_with_drf_details(api: httpx.Client) -> None:
    unknown = "00000000-0000-0000-0000-000000000000"
    response = api.get(f"archives/items/{unknown}/")
    assert response.status_code == 404
    assert response.json() == {"detail": "No ArchiveItem matches the given query."}
    assert api.get("cases/images/oops/").json() == {"detail": "Not found."}


# --------------------------------------------------------------------------- authentication


@pytest.mark.parametrize(
    ("header", "detail"),
    [
        ("Bearer 0123456789abcdef", "Invalid token."),
        ("bearer", "Invalid token header. No credentials provided."),
        ("Bearer a b", "Invalid token header. Token string should not contain spaces."),
    ],
)
def test_bad_bearer_credentials_get_401_with_exact_body(
    anonymous: httpx.Client, header: str, detail: str
) -> None:
    response = anonymous.get("archives/", headers={"Authorization": header})
    assert response.status_code == 401
    assert response.content == json.dumps({"detail": detail}, separators=(",", ":")).encode()
    assert response.headers["www-authenticate"] == "Bearer"


def test_bearer_keyword_is_case_insensitive(gc: GrandChallengeFake) -> None:
    for keyword in ("Bearer", "bearer", "BEARER", "bEaReR"):
        headers = {"Authorization": f"{keyword} {gc.token}"}
        response = httpx.get(gc.api_url + "archives/", headers=headers)
        assert response.json()["count"] == len(gc.archive_slugs()), keyword


def test_anonymous_requests_see_only_public_objects(
    api: httpx.Client, anonymous: httpx.Client, gc: GrandChallengeFake
) -> None:
    private = api.get("archives/", params={"slug": "demo-private"}).json()["results"][0]
    (item,) = items_of(api, "demo-private")
    image = next(v["image"] for v in item["values"] if v["image"])
    file = next(v["file"] for v in item["values"] if v["file"])
    other_scheme = httpx.Client(headers={"Authorization": f"Token {gc.token}"})
    for client in (anonymous, other_scheme):
        listed = client.get(gc.api_url + "archives/").json()["results"]
        assert "/archives/demo-private/" not in {urlsplit(a["url"]).path for a in listed}
        listed = client.get(gc.api_url + "archives/items/", params={"archive": private["pk"]})
        assert listed.status_code == 200
        assert listed.json()["count"] == 0
        assert client.get(private["api_url"]).status_code == 404
        assert client.get(f"{gc.api_url}archives/items/{item['pk']}/").status_code == 404
        assert client.get(image).status_code == 404
        assert client.get(file).status_code == 404  # a CIV file: 404
        image_file = api.get(image).json()["files"][0]["file"]
        assert client.get(image_file).status_code == 403  # an image file: PermissionDenied
    other_scheme.close()
    assert anonymous.get("archives/", params={"slug": "demo-medical"}).json()["count"] == 1


# --------------------------------------------------------------------------- media and storage


def test_media_redirects_to_a_signed_url_on_another_origin(
    api: httpx.Client, gc: GrandChallengeFake
) -> None:
    value = value_at(api, "demo-medical", "files/report.pdf")
    assert value["file"].startswith(gc.api_url.removesuffix("/api/v1/") + "/media/")
    assert value["file"].endswith("/scan_report_final.pdf")  # basename != relative_path's
    before = time.time()
    location = signed_url(api, value["file"])
    assert location.startswith(gc.storage_url + "/components/componentinterfacevalue/")
    assert urlsplit(location).netloc != urlsplit(gc.api_url).netloc
    params = dict(parse_qsl(urlsplit(location).query))
    assert set(params) == {"Expires", "Signature", "Key-Pair-Id"}
    assert before + 299 <= int(params["Expires"]) <= time.time() + 301


def test_storage_serves_bytes_with_object_metadata(api: httpx.Client, storage: httpx.Client):
    expected_types = {
        "files/report.pdf": "application/pdf",
        "detections.json": "application/json",
        "predictions.csv": "text/csv",
    }
    for path, content_type in expected_types.items():
        response = storage.get(signed_url(api, value_at(api, "demo-medical", path)["file"]))
        assert response.status_code == 200
        assert response.headers["content-type"] == content_type
        assert int(response.headers["content-length"]) == len(response.content)
        assert response.headers["etag"].startswith('"')
        assert response.headers["last-modified"].endswith(" GMT")
    json_file = value_at(api, "demo-medical", "detections.json")["file"]
    assert storage.get(signed_url(api, json_file)).content == b'{"detections":[1,2,3]}'
    mha = image_file_url(api, value_at(api, "demo-medical", "images/ct"), ".mha")
    assert storage.get(mha).headers["content-type"] == "application/octet-stream"


def test_storage_refuses_requests_carrying_authorization(
    api: httpx.Client, storage: httpx.Client, gc: GrandChallengeFake
) -> None:
    url = signed_url(api, value_at(api, "demo-medical", "files/report.pdf")["file"])
    response = storage.get(url, headers={"Authorization": f"Bearer {gc.token}"})
    assert response.status_code in (400, 403)


def test_expired_or_tampered_signatures_are_403(
    api: httpx.Client, storage: httpx.Client, gc: GrandChallengeFake
) -> None:
    media = value_at(api, "demo-medical", "files/report.pdf")["file"]
    url = signed_url(api, media)
    assert storage.get(url).status_code == 200
    expires = dict(parse_qsl(urlsplit(url).query))["Expires"]
    assert storage.get(url.replace(expires, str(int(expires) + 60))).status_code == 403
    assert storage.get(url.replace("report", "reporT")).status_code == 403
    assert storage.get(url.split("?")[0]).status_code == 403
    gc.url_expiry = 0  # settable at runtime: URLs now expire as they are made
    assert storage.get(signed_url(api, media)).status_code == 403
    gc.url_expiry = 300
    assert storage.get(signed_url(api, media)).status_code == 200


def test_ranges_if_range_and_416(api: httpx.Client, storage: httpx.Client) -> None:
    url = signed_url(api, value_at(api, "demo-medical", "files/report.pdf")["file"])
    whole = storage.get(url)
    size, etag = len(whole.content), whole.headers["etag"]

    def get(**headers: str) -> httpx.Response:
        return storage.get(url, headers=headers)

    first = get(Range="bytes=0-0")
    assert (first.status_code, first.content) == (206, whole.content[:1])
    assert first.headers["content-range"] == f"bytes 0-0/{size}"
    assert first.headers["content-length"] == "1"
    assert get(Range="bytes=10-19").content == whole.content[10:20]
    assert get(Range="bytes=-5").content == whole.content[-5:]
    assert get(Range=f"bytes={size - 3}-").content == whole.content[-3:]
    assert get(Range=f"bytes={size - 3}-{size + 50}").headers["content-range"] == (
        f"bytes {size - 3}-{size - 1}/{size}"
    )
    beyond = get(Range=f"bytes={size}-")
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{size}"
    assert get(Range="bytes=0-9", **{"If-Range": etag}).status_code == 206
    changed = get(Range="bytes=0-9", **{"If-Range": '"something-else"'})
    assert (changed.status_code, changed.content) == (200, whole.content)
    by_date = get(Range="bytes=0-9", **{"If-Range": whole.headers["last-modified"]})
    assert by_date.status_code == 206
    stale = formatdate(time.time() - 10**6, usegmt=True)
    assert get(Range="bytes=0-9", **{"If-Range": stale}).status_code == 200


def test_empty_stored_file_answers_416_to_a_range(api: httpx.Client, storage: httpx.Client):
    item = next(i for i in items_of(api, "demo-medical") if i["title"] == "case-002")
    csv = next(v for v in item["values"] if v["interface"]["relative_path"] == "predictions.csv")
    url = signed_url(api, csv["file"])
    probe = storage.get(url, headers={"Range": "bytes=0-0"})
    assert probe.status_code == 416
    assert probe.headers["content-range"] == "bytes */0"
    plain = storage.get(url)
    assert (plain.status_code, plain.content, plain.headers["content-length"]) == (200, b"", "0")


def test_huge_file_is_generated_and_read_in_cheap_ranges(
    api: httpx.Client, storage: httpx.Client
) -> None:
    url = signed_url(api, value_at(api, "demo-large", "predictions.zip")["file"])
    probe = storage.get(url, headers={"Range": "bytes=0-0"})
    assert probe.headers["content-range"] == f"bytes 0-0/{HUGE_SIZE}"
    start = time.monotonic()
    tail = storage.get(url, headers={"Range": f"bytes={HUGE_SIZE - 100_000}-"})
    head = storage.head(url)
    assert time.monotonic() - start < 5
    assert tail.status_code == 206
    assert len(tail.content) == 100_000
    assert tail.content == pattern(20_240_601, HUGE_SIZE - 100_000, 100_000)
    assert (head.status_code, head.headers["content-length"]) == (200, str(HUGE_SIZE))


# --------------------------------------------------------------------------- sample files


def test_mha_images_are_readable_by_simpleitk(
    api: httpx.Client, storage: httpx.Client, tmp_path: Path
) -> None:
    for path, pixel in (("images/ct", "16-bit signed"), ("images/lung-segmentation", "8-bit")):
        url = image_file_url(api, value_at(api, "demo-medical", path), ".mha")
        target = tmp_path / f"{path.rsplit('/', 1)[-1]}.mha"
        target.write_bytes(storage.get(url).content)
        image = SimpleITK.ReadImage(str(target))
        assert image.GetSize() == (32, 32, 8)
        assert image.GetPixelIDTypeAsString().startswith(pixel)
        assert image.GetSpacing() == pytest.approx((0.68, 0.68, 1.25))


def test_legacy_mhd_reads_its_zraw_under_the_stored_names(
    api: httpx.Client, storage: httpx.Client, tmp_path: Path
) -> None:
    value = value_at(api, "demo-medical", "images/legacy-ct")
    image = api.get(value["image"]).json()
    assert [f["image_type"] for f in image["files"]] == ["MHD", "MHD"]
    for file in image["files"]:
        name = file["file"].rsplit("/", 1)[-1]
        (tmp_path / name).write_bytes(storage.get(signed_url(api, file["file"])).content)
    header = (tmp_path / "chest_ct_2009.mhd").read_text()
    assert "CompressedData = True" in header
    assert "ElementDataFile = chest_ct_2009.zraw" in header
    legacy = SimpleITK.ReadImage(str(tmp_path / "chest_ct_2009.mhd"))
    url = image_file_url(api, value_at(api, "demo-medical", "images/ct"), ".mha")
    (tmp_path / "ct.mha").write_bytes(storage.get(url).content)
    assert legacy.GetSize() == (32, 32, 8)
    same_phantom_family = SimpleITK.ReadImage(str(tmp_path / "ct.mha"))
    assert legacy.GetPixelID() == same_phantom_family.GetPixelID()


def test_tiff_dzi_and_pdf_are_valid(api: httpx.Client, storage: httpx.Client) -> None:
    slide = value_at(api, "demo-medical", "images/pathology-slide")
    tiff = storage.get(image_file_url(api, slide, ".tif")).content
    with PILImage.open(io.BytesIO(tiff)) as opened:
        assert (opened.format, opened.size) == ("TIFF", (64, 48))
    dzi = storage.get(image_file_url(api, slide, ".dzi")).content
    assert b'<Size Height="48" Width="64"/>' in dzi
    pdf = storage.get(signed_url(api, value_at(api, "demo-medical", "files/report.pdf")["file"]))
    assert pdf.content.startswith(b"%PDF-1.4") and pdf.content.rstrip().endswith(b"%%EOF")
    xref = int(pdf.content.rsplit(b"startxref", 1)[1].split()[0])
    assert pdf.content[xref : xref + 4] == b"xref"


def test_json_values_cover_every_json_type(api: httpx.Client) -> None:
    values = {
        v["interface"]["relative_path"]: v["value"]
        for v in items_of(api, "demo-medical")[0]["values"]
        if v["interface"]["super_kind"] == "Value"
    }
    kinds = {type(value) for value in values.values()}
    assert {dict, list, str, int, float, bool, type(None)} <= kinds
    assert any(isinstance(v, int) and v > 2**53 for v in values.values())
    assert any(isinstance(v, str) and not v.isascii() for v in values.values())


# --------------------------------------------------------------------------- the oracle


def test_expected_tree_follows_the_product_contract(gc: GrandChallengeFake) -> None:
    files = gc.expected_archive("demo-medical")
    first = gc.data.archive("demo-medical").items[0].pk
    assert files[f"{first}/accession-number.json"].bytes() == b"18446744073709563961"
    comment = files[f"{first}/clinical-comment.json"].bytes()
    assert comment.isascii() and json.loads(comment).startswith("Patiënt")
    assert files[f"{first}/lesion-diameters.json"].bytes() == b"[\n  12.5,\n  7,\n  3.25\n]"
    assert files[f"{first}/reviewer-notes.json"].bytes() == b"null"
    assert files[f"{first}/detections.json"].bytes() == b'{"detections":[1,2,3]}'
    names = {path.removeprefix(f"{first}/") for path in files if path.startswith(first)}
    assert {"images/legacy-ct/chest_ct_2009.mhd", "images/legacy-ct/chest_ct_2009.zraw"} <= names
    assert not any(name.endswith(".dzi") for name in names)
    assert sum(1 for name in names if "/" not in name and name.endswith(".mha")) == 1
    empty = gc.data.archive("demo-medical").items[3].pk
    assert empty in gc.expected_dirs("demo-medical")
    assert gc.expected_archive("demo-empty") == {}
    assert gc.expected_dirs("demo-empty") == set()


def test_expected_tree_leaves_hostile_and_colliding_paths_out(gc: GrandChallengeFake) -> None:
    hostile = gc.data.archive("demo-edge-cases").items[0]
    files = gc.expected_archive("demo-edge-cases")
    shown = {path.removeprefix(f"{hostile.pk}/") for path in files if path.startswith(hostile.pk)}
    ok_image = next(v.image.pk for v in hostile.values if v.socket.slug == "edge-ok-image")
    assert shown == {
        "summary.json",
        "duplicate.json",
        "notes",
        "images/edge",
        "edge-files/table.csv",
        f"images/edge-ok/{ok_image}.mha",
    }
    assert files[f"{hostile.pk}/duplicate.json"].bytes() == b'{\n  "first": true\n}'
    assert files[f"{hostile.pk}/images/edge"].bytes().startswith(b"a,file,where")


def test_items_added_at_runtime_are_listed_and_expected() -> None:
    with GrandChallengeFake() as fake, httpx.Client(base_url=fake.api_url) as client:
        before = items_of(client, "demo-empty")
        pk = fake.add_item("demo-empty")
        after = items_of(client, "demo-empty")
        assert (len(before), [item["pk"] for item in after]) == (0, [pk])
        assert {path.split("/")[0] for path in fake.expected_archive("demo-empty")} == {pk}
        assert fake.expected_dirs("demo-empty") == {pk}


# --------------------------------------------------------------------------- bookkeeping


def test_requests_are_counted_per_kind_with_headers_recorded(
    api: httpx.Client, storage: httpx.Client, gc: GrandChallengeFake
) -> None:
    gc.reset_counters()
    value = value_at(api, "demo-medical", "images/ct")
    storage.get(image_file_url(api, value, ".mha"))
    api.get("gcapi/")
    api.get("components/interfaces/?slug=ct")
    assert gc.log.counts() == {
        "archives": 1,
        "items": 1,
        "image": 1,
        "media": 1,
        "storage": 1,
        "gcapi": 1,
        "interfaces": 1,
    }
    (media,) = gc.log.entries("media")
    assert media.method == "GET"
    assert media.url.startswith("/media/images/")
    assert media.headers["authorization"] == f"BEARER {gc.token}"
    assert "authorization" not in gc.log.entries("storage")[0].headers
    gc.reset_counters()
    assert gc.log.counts() == {}
    assert gc.log.entries() == []


def test_https_with_the_throwaway_ca(tmp_path: Path) -> None:
    with GrandChallengeFake(tls=make_tls(tmp_path)) as fake:
        assert fake.api_url.startswith("https://127.0.0.1:")
        assert fake.ca_file is not None
        with httpx.Client(verify=ssl.create_default_context(cafile=fake.ca_file)) as client:
            archives = client.get(fake.api_url + "archives/").json()["results"]
            assert archives[0]["api_url"].startswith(fake.api_url)
            with pytest.raises(httpx.ConnectError):
                httpx.get(fake.api_url + "gcapi/")  # the system store does not trust it


# --------------------------------------------------------------------------- fault injection


def test_fail_next_answers_exact_errors_with_retry_after(
    api: httpx.Client, gc: GrandChallengeFake
) -> None:
    gc.api_faults.configure(fail_next=2, error_statuses=(429,), retry_after=7)
    statuses = [api.get("archives/") for _ in range(3)]
    assert [r.status_code for r in statuses] == [429, 429, 200]
    assert statuses[0].headers["retry-after"] == "7"
    assert statuses[0].headers["content-type"] == "application/json"
    assert gc.api_faults.injected["error"] == 2
    assert gc.log.count("archives") >= 1


def test_error_rates_are_seeded_and_repeatable(api: httpx.Client, gc: GrandChallengeFake) -> None:
    def run() -> list[int]:
        gc.reset_faults()
        gc.api_faults.configure(error_rate=0.5, error_statuses=(429, 500, 502, 503))
        return [api.get("gcapi/").status_code for _ in range(24)]

    first = run()
    assert first == run()
    assert 200 in first
    assert len(set(first)) > 2


def test_faults_apply_only_where_the_path_pattern_matches(
    api: httpx.Client, storage: httpx.Client, gc: GrandChallengeFake
) -> None:
    gc.storage_faults.configure(outage=True, path_pattern=r"\.pdf$")
    report = signed_url(api, value_at(api, "demo-medical", "files/report.pdf")["file"])
    table = signed_url(api, value_at(api, "demo-medical", "predictions.csv")["file"])
    down = storage.get(report)
    assert (down.status_code, "retry-after" in down.headers) == (503, False)
    assert storage.get(table).status_code == 200
    gc.storage_faults.configure(outage=False)
    assert storage.get(report).status_code == 200


def test_cut_bodies_drop_the_connection_half_way(
    api: httpx.Client, storage: httpx.Client, gc: GrandChallengeFake
) -> None:
    url = signed_url(api, value_at(api, "demo-large", "predictions.zip")["file"])
    gc.storage_faults.configure(cut_rate=1.0)
    received = b""
    with (
        pytest.raises(httpx.RemoteProtocolError),
        storage.stream("GET", url, headers={"Range": "bytes=0-4194303"}) as response,
    ):
        for chunk in response.iter_bytes():
            received += chunk
    assert received == pattern(20_240_601, 0, 2 * 1024 * 1024)
    assert gc.storage_faults.injected["cut"] == 1


def test_stalls_and_latency_delay_the_answer(
    api: httpx.Client, storage: httpx.Client, gc: GrandChallengeFake
) -> None:
    url = signed_url(api, value_at(api, "demo-medical", "files/report.pdf")["file"])
    gc.storage_faults.configure(stall_rate=1.0, stall_seconds=2.0)
    with pytest.raises(httpx.ReadTimeout):
        storage.get(url, timeout=0.3)
    gc.storage_faults.configure(stall_rate=0.0, latency=0.3)
    start = time.monotonic()
    assert storage.get(url).status_code == 200
    assert time.monotonic() - start >= 0.3


def test_etag_generation_makes_objects_look_replaced(
    api: httpx.Client, storage: httpx.Client, gc: GrandChallengeFake
) -> None:
    url = signed_url(api, value_at(api, "demo-medical", "files/report.pdf")["file"])
    old = storage.get(url, headers={"Range": "bytes=0-0"})
    gc.storage_faults.configure(etag_generation=1)
    new = storage.get(url, headers={"Range": "bytes=0-0"})
    assert new.headers["etag"] == old.headers["etag"][:-1] + '-g1"'
    assert new.headers["last-modified"] != old.headers["last-modified"]
    assert new.content == old.content  # only the validators change

    def status(if_range: str) -> int:
        return storage.get(url, headers={"Range": "bytes=0-9", "If-Range": if_range}).status_code

    assert status(old.headers["etag"]) == 200
    assert status(old.headers["last-modified"]) == 200
    assert status(new.headers["etag"]) == 206
    assert status(new.headers["last-modified"]) == 206
