"""The fake AWS HealthImaging behind the fake Grand Challenge's `dicom/instances/`, over real
sockets: what issue 13 says of the real services, pinned independently of fsmount."""

from __future__ import annotations

import io

import httpx
import pydicom
import pytest
from test_fake_grand_challenge import api, gc

from fsmount.demo.grand_challenge import GrandChallengeFake
from fsmount.demo.healthimaging import SIGNATURE_LIFETIME

__all__ = ["api", "gc"]  # the fixtures (a fake of this module's own, an API client)


def dicom_images(gc: GrandChallengeFake) -> list:
    archive = gc.data.archive("demo-dicom")
    return [
        civ.image
        for item in gc.data.items(archive)
        for civ in item.values
        if civ.image is not None and civ.image.image_set is not None
    ]


def instances(api: httpx.Client, pk: str) -> dict:
    response = api.get(f"cases/images/{pk}/dicom/instances/")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()


def test_the_instances_endpoint_lists_every_frame_with_a_signed_request(gc, api) -> None:
    for image in dicom_images(gc):
        detail = api.get(f"cases/images/{image.pk}/").json()
        assert detail["dicom_image_set"] == {"image_set_id": image.image_set.image_set_id}
        assert detail["files"] == []
        answer = instances(api, image.pk)
        assert answer["image_set_id"] == image.image_set.image_set_id
        uids = [entry["sop_instance_uid"] for entry in answer["instances"]]
        assert uids == [i.sop_instance_uid for i in image.image_set.entries]
        for entry in answer["instances"]:
            uid = entry["sop_instance_uid"]
            assert 60 <= len(uid) <= 64 and set(uid) <= set("0123456789.")
            request = entry["get_instance"]
            assert request["method"] == "GET" and request["data"] is None
            assert set(request["headers"]) == {
                "Accept",
                "Authorization",
                "X-Amz-Date",
                "X-Amz-Security-Token",
            }
            assert request["headers"]["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=")
            with httpx.stream(**request) as response:  # as gcapi does
                assert response.status_code == 200
                data = response.read()
            assert pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID == uid
    assert any(len(set(i.image_set.entries)) < len(i.image_set.entries) for i in dicom_images(gc))


def test_the_instances_endpoint_needs_the_token_and_a_set(gc, api) -> None:
    image = dicom_images(gc)[0]
    anonymous = httpx.get(f"{gc.api_url}cases/images/{image.pk}/dicom/instances/", timeout=30)
    assert anonymous.status_code == 401
    medical = gc.data.archive("demo-medical")
    plain = next(civ.image for civ in medical.items[0].values if civ.image is not None)
    response = api.get(f"cases/images/{plain.pk}/dicom/instances/")
    assert response.status_code == 404
    assert response.json() == {"detail": "This image does not have a DICOM Image Set."}


def test_healthimaging_refuses_missing_tampered_expired_and_token_bearing_requests(gc, api) -> None:
    image = dicom_images(gc)[0]
    request = instances(api, image.pk)["instances"][0]["get_instance"]
    url, headers = request["url"], request["headers"]

    def status(**changed: str | None) -> int:
        sent = {k: v for k, v in {**headers, **changed}.items() if v is not None}
        return httpx.get(url, headers=sent, timeout=30).status_code

    assert status() == 200
    assert status(Authorization=None) == 403
    assert status(Accept="application/dicom; transfer-syntax=1.2.840.10008.1.2.4.202") == 403
    assert httpx.head(url, headers=headers, timeout=30).status_code == 403  # GET was signed
    assert status(**{"X-Extra": f"Bearer {gc.token}"}) == 400
    assert gc.healthimaging.token_seen == 1
    gc.healthimaging.advance_clock(SIGNATURE_LIFETIME + 1)
    expired = httpx.get(url, headers=headers, timeout=30)
    assert expired.status_code == 403 and "Signature expired" in expired.json()["message"]
    fresh = instances(api, image.pk)["instances"][0]["get_instance"]
    assert httpx.get(fresh["url"], headers=fresh["headers"], timeout=30).status_code == 200


@pytest.mark.parametrize("honour_range", [False, True])
@pytest.mark.parametrize("send_length", [False, True])
def test_range_and_length_are_knobs(gc, api, honour_range: bool, send_length: bool) -> None:
    gc.healthimaging.honour_range = honour_range
    gc.healthimaging.send_length = send_length
    image = max(dicom_images(gc), key=lambda i: len(i.image_set.entries[0].data))
    data = image.image_set.entries[0].data
    request = instances(api, image.pk)["instances"][0]["get_instance"]
    headers = {**request["headers"], "Range": "bytes=100-"}
    with httpx.stream("GET", request["url"], headers=headers, timeout=30) as response:
        body = response.read()
        assert ("content-length" in response.headers) == send_length
        if honour_range:
            assert response.status_code == 206
            assert response.headers["content-range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
            assert body == data[100:]
        else:
            assert response.status_code == 200 and body == data
