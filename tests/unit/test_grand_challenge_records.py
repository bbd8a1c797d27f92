"""Grand Challenge records cut down as their pages arrive: bad ones are skipped and said."""

from __future__ import annotations

import json
import logging

import pytest

from fsmount.sources.gc_files import indented
from fsmount.sources.gc_records import MediaUrls, Records

API = "https://gc.test/api/v1/"


def records() -> Records:
    return Records(MediaUrls(API))


def socket(slug: object, kind: str = "Value", path: object = "v.json") -> dict[str, object]:
    return {"slug": slug, "kind": "Anything", "super_kind": kind, "relative_path": path}


def test_a_bad_value_is_left_out_and_said_and_the_item_kept(caplog) -> None:
    caplog.set_level(logging.WARNING)
    good = {"pk": 1, "interface": socket("good"), "value": {"a": 1}}
    bad = [
        {"pk": 2, "interface": socket(["unhashable"])},  # a list where a slug should be
        {"pk": 3, "interface": socket("no-path", path=None)},
        {"pk": 4, "interface": "not a socket"},
        {"pk": 5, "interface": socket("file", kind="File"), "file": None},
        "not a value",
    ]
    kept = records().item({"pk": "item", "values": [good, *bad]})
    assert kept is not None
    pk, item = kept
    assert pk == "item" and [v.pk for v in item.values] == [1]
    assert caplog.text.count("skipping a malformed value") == len(bad)


@pytest.mark.parametrize("item", [{"values": []}, {"pk": "x", "values": 3}, "not an item"])
def test_a_bad_item_is_skipped_and_said(item, caplog) -> None:
    caplog.set_level(logging.WARNING)
    assert records().item(item) is None  # type: ignore[arg-type]
    assert "skipping a malformed archive item" in caplog.text


@pytest.mark.parametrize(
    "value",
    [None, 0, -0.0, 1e16, 0.1, 2**70, 'é\u2028"', [], {}, {"b": [1.5, {"a": None}], "a": True}],
)
def test_a_value_kept_compact_renders_as_json_dumps_indent_2(value) -> None:
    kept = records().item(
        {"pk": "i", "values": [{"pk": 1, "interface": socket("v"), "value": value}]}
    )
    assert kept is not None
    assert indented(kept[1].values[0].payload) == json.dumps(value, indent=2).encode()


def test_media_urls_are_kept_small_only_when_the_layout_gives_them_back() -> None:
    urls = MediaUrls(API)
    pk, image, file = 1793367, "d2856bc1-fe72-42d7-b8b7-1622527b8311", "0b7a8f5e"
    civ = f"https://gc.test/media/components/componentinterfacevalue/5d/57/{pk}/file.json"
    assert urls.pack_file(civ, pk, "file.json") is None
    assert urls.unpack_file(None, pk, "file.json") == civ
    other = "https://cdn.test/elsewhere/file.json"
    assert urls.unpack_file(urls.pack_file(other, pk, "file.json"), pk, "file.json") == other
    stored = f"https://gc.test/media/images/d2/85/{image}/{file}/{image}.mha"
    assert urls.pack_image_file(stored, image, file) == "mha"
    assert urls.unpack_image_file("mha", image, file) == stored
    legacy = f"https://gc.test/media/images/d2/85/{image}/{file}/scan.zraw"
    assert urls.unpack_image_file(urls.pack_image_file(legacy, image, file), image, file) == legacy
