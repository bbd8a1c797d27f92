"""Times from services are UTC whatever the local zone: tested in Amsterdam in summer (CEST),
where most Grand Challenge users are."""

from __future__ import annotations

import calendar
import time
from collections.abc import Iterator

import httpx
import pytest
import trio

from fsmount.blob import RemoteBlob, SignedUrl
from fsmount.sources import scenario
from fsmount.transfer import HttpPolicy, Storage, TransferStats, url_expiry

SUMMER_NOON = calendar.timegm((2024, 7, 15, 12, 0, 0))  # 14:00 in Amsterdam


@pytest.fixture(autouse=True)
def amsterdam(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "Europe/Amsterdam")
    time.tzset()
    assert time.localtime(SUMMER_NOON).tm_isdst == 1
    yield
    monkeypatch.undo()
    time.tzset()


async def resolve() -> SignedUrl:
    return SignedUrl("https://s3.test/b/k", time.time() + 300)


def test_s3_style_expiry_is_utc_in_summer_time() -> None:
    url = "https://s3.test/b/k?X-Amz-Date=20240715T120000Z&X-Amz-Expires=3600&X-Amz-Signature=a"
    assert url_expiry(url, now=SUMMER_NOON) == SUMMER_NOON + 3600


def test_last_modified_in_every_http_date_form_is_gmt_in_summer_time() -> None:
    forms = (
        "Mon, 15 Jul 2024 12:00:00 GMT",  # IMF-fixdate
        "Monday, 15-Jul-24 12:00:00 GMT",  # RFC 850
        "Mon Jul 15 12:00:00 2024",  # asctime: no zone written, GMT meant
        "Mon, 15 Jul 2024 14:00:00 +0200",
    )
    policy = HttpPolicy(deadline=5.0)
    for form in forms:

        def handler(request: httpx.Request, form: str = form) -> httpx.Response:
            headers = {"Content-Range": "bytes 0-0/10", "Last-Modified": form}
            return httpx.Response(206, headers=headers, content=b"x")

        storage = Storage(policy, TransferStats(), transport=httpx.MockTransport(handler))
        blob = RemoteBlob(key="k", resolve=resolve, description="test object")
        assert trio.run(storage.probe, blob).mtime == SUMMER_NOON, form


def test_scenario_times_without_a_zone_are_utc() -> None:
    for text in ("2024-07-15T12:00:00Z", "2024-07-15T12:00:00.000Z", "2024-07-15T12:00:00"):
        assert scenario._timestamp(text) == SUMMER_NOON, text
