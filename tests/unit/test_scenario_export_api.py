"""The Scenario source's batch export calls, in process against a mock API: a dry run must be
one (HTTP 269), a job's status and link are read as the SDK types them, and only native files
are exportable."""

from __future__ import annotations

import json

import httpx
import pytest
import trio

from fsmount.blob import InlineBlob, RemoteBlob
from fsmount.errors import FetchError
from fsmount.sources.scenario import Scenario, native_asset
from fsmount.transfer import ApiClient, Credentials, HttpPolicy, TransferStats
from fsmount.tree import TreeContext

FAST = HttpPolicy(deadline=2.0, base_delay=0.01, max_delay=0.05)


def scenario(handler) -> Scenario:
    api = ApiClient(
        "https://api.test/v1/",
        Credentials(lambda: {"Authorization": "Basic a2V5OnNlY3JldA=="}),
        FAST,
        TransferStats(),
        name="scenario",
        transport=httpx.MockTransport(handler),
    )
    return Scenario(api, TreeContext(lambda paths: dict.fromkeys(paths, 0.0)), project="proj_1")


def test_a_dry_run_is_sent_as_one_and_must_answer_269_with_a_cost() -> None:
    seen: list[httpx.Request] = []
    status = 269

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if status == 269:
            return httpx.Response(269, json={"creativeUnitsCost": 12})
        return httpx.Response(200, json={"jobId": "job_started_by_mistake"})

    source = scenario(handler)
    assert trio.run(source.export_cost, ["asset_a", "asset_b"]) == 12
    request = seen[0]
    assert request.method == "POST" and request.url.path == "/v1/assets/download"
    assert dict(request.url.params) == {"dryRun": "true", "projectId": "proj_1"}
    assert json.loads(request.content) == {
        "options": {"fileNameTemplate": "<id>", "flat": True, "preferOriginal": False},
        "query": {"assetIds": ["asset_a", "asset_b"], "inferenceIds": [], "modelIds": []},
    }
    status = 200  # an API that ignored dryRun started a job: that must not pass for a cost
    with pytest.raises(FetchError, match="dry run answered HTTP 200"):
        trio.run(source.export_cost, ["asset_a"])


def test_status_and_the_zip_link_are_asked_again_only_when_needed() -> None:
    statuses = iter(
        [
            {"jobId": "job_1", "jobStatus": "in-progress"},
            {
                "jobId": "job_1",
                "jobStatus": "success",
                "downloadUrl": "https://cdn.test/x.zip?Expires=2000000000&Signature=s",
            },
        ]
    )
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        return httpx.Response(200, json=next(statuses))

    source = scenario(handler)
    assert trio.run(source.export_status, "job_1") == ("in-progress", None)
    blob = source.export_blob("job_1", "https://cdn.test/x.zip?Expires=1&Signature=old")
    first = trio.run(blob.resolve)
    assert first.url.endswith("Signature=old") and asked == ["/v1/assets/download/job_1"]
    again = trio.run(blob.resolve)
    assert again.url.endswith("Signature=s") and again.expires_at == 2_000_000_000
    assert asked == ["/v1/assets/download/job_1"] * 2


def test_only_native_files_of_scenario_assets_are_exportable() -> None:
    async def never() -> None:
        raise AssertionError

    def blob(key: str) -> RemoteBlob:
        return RemoteBlob(key=key, resolve=never, description=key)  # type: ignore[arg-type]

    assert native_asset(blob("scenario:asset_a:native")) == "asset_a"
    assert native_asset(blob("scenario:asset_a:webp")) is None
    assert native_asset(blob("grand-challenge:scenario:asset_a:native")) is None
    assert native_asset(InlineBlob(b"{}")) is None
    assert native_asset(None) is None
