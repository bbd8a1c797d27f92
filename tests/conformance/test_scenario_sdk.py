"""The official `scenario-sdk` against the fake Scenario service, under trio.

If the SDK pages, parses and downloads through the fake and gets exactly what the fake's oracle
promises, then the fake is faithful to the real API as its official client understands it, and
tests of fsmount against the fake mean something.

`sdk_snapshot` and `compare_with_mount` are meant for reuse: a FUSE test takes a snapshot with
the SDK and checks a mounted `scenario/` tree against it, so the mount is compared with what the
official client downloads rather than with fsmount's own idea of it.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from scenario_sdk import AsyncScenario, AuthenticationError, BadRequestError, NotFoundError

from fsmount.demo.scenario import ScenarioFake

pytestmark = pytest.mark.conformance

# product.md's table, restated here on purpose: the snapshot must not borrow the fake's own
# tables, or a mistake in them would be checked against itself.
NATIVE_EXT = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "model/gltf-binary": "glb",
    "video/mp4": "mp4",
}
KIND_FORMATS = {
    "image": ("png", "jpg", "webp", "avif", "tif", "gif", "heif"),
    "3d": ("glb", "fbx", "obj"),
}


@dataclass
class SdkSnapshot:
    """What the official SDK sees of a Scenario project, named as product.md names files."""

    visible_ids: set[str]  # status success, not hidden, not deleted
    native_sizes: dict[str, int]  # `<id>.<native-ext>` → `properties.size`, for every visible asset
    mtimes: dict[str, str]  # asset id → `updatedAt`
    files: dict[str, bytes] = field(default_factory=dict)  # `<id>.<ext>` → bytes, fetched assets


async def _fetch(cdn: httpx.AsyncClient, url: str) -> bytes:
    reply = await cdn.get(url)
    reply.raise_for_status()
    return reply.content


async def sdk_snapshot(
    api_url: str,
    key: str,
    secret: str,
    *,
    project_id: str | None = None,
    fetch: Callable[[Any], bool] = lambda asset: True,
    page_size: int | None = 100,
) -> SdkSnapshot:
    """List every asset with the SDK and download every file of the assets `fetch` selects.

    Each selected asset gets its native file (download without `targetFormat`) and one file per
    other format of its kind, fetched from the signed URLs the way a client must: following
    redirects and without the API's credentials. Run it under `trio.run`.
    """
    scope = {"project_id": project_id} if project_id else {}
    paging = {"page_size": page_size} if page_size else {}
    async with (
        AsyncScenario(api_key=key, api_secret=secret, base_url=api_url) as client,
        httpx.AsyncClient(follow_redirects=True, timeout=60) as cdn,
    ):
        visible = [
            asset
            async for asset in client.assets.list(**scope, **paging)
            if asset.status == "success" and not asset.is_hidden and asset.deleted_at is None
        ]
        snapshot = SdkSnapshot(
            {a.id for a in visible},
            {f"{a.id}.{NATIVE_EXT[a.mime_type]}": int(a.properties.size) for a in visible},
            {a.id: a.updated_at for a in visible},
        )
        for asset in filter(fetch, visible):
            native = NATIVE_EXT[asset.mime_type]
            link = await client.assets.download.request(asset.id, **scope)
            assert link.mime_type == asset.mime_type
            snapshot.files[f"{asset.id}.{native}"] = await _fetch(cdn, link.url)
            for fmt in KIND_FORMATS.get(asset.kind, ()):
                if fmt != native:
                    link = await client.assets.download.request(
                        asset.id, target_format=fmt, **scope
                    )
                    snapshot.files[f"{asset.id}.{fmt}"] = await _fetch(cdn, link.url)
    return snapshot


def snapshot_mismatches(
    snapshot: SdkSnapshot, names: Iterable[str], read: Callable[[str], bytes]
) -> list[str]:
    """How an `assets/` directory (its file names, and a reader) differs from the snapshot."""
    names = set(names)
    problems = []
    ids = {name.rsplit(".", 1)[0] for name in names}
    if ids != snapshot.visible_ids:
        problems.append(
            f"asset ids: missing {snapshot.visible_ids - ids}, extra {ids - snapshot.visible_ids}"
        )
    fetched_ids = {name.rsplit(".", 1)[0] for name in snapshot.files}
    for asset_id in sorted(fetched_ids):
        shown = {n for n in names if n.rsplit(".", 1)[0] == asset_id}
        wanted = {n for n in snapshot.files if n.rsplit(".", 1)[0] == asset_id}
        if shown != wanted:
            problems.append(f"{asset_id}: files {sorted(shown)}, SDK got {sorted(wanted)}")
    for name, data in sorted(snapshot.files.items()):
        if name in names and read(name) != data:
            problems.append(f"{name}: bytes differ from the SDK's download")
    return problems


def compare_with_mount(snapshot: SdkSnapshot, scenario_dir: Path) -> list[str]:
    """Differences between a mounted `scenario/` tree and the snapshot ([] when they agree).

    Checks the asset ids under `assets/`, the file names of every fetched asset, their bytes, and
    `st_size` of every native file against `properties.size` (read from stat, without reading).
    """
    assets = scenario_dir / "assets"
    names = os.listdir(assets)
    problems = snapshot_mismatches(snapshot, names, lambda name: (assets / name).read_bytes())
    for name, size in sorted(snapshot.native_sizes.items()):
        if name in names and (assets / name).stat().st_size != size:
            problems.append(f"{name}: st_size {(assets / name).stat().st_size}, API says {size}")
    return problems


# --------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def fake() -> Iterator[ScenarioFake]:
    with ScenarioFake() as running:
        yield running


def showcase(fake: ScenarioFake) -> Callable[[Any], bool]:
    """One PNG and one JPEG image, the largest image, every mesh and every video."""
    visible = [a for a in fake.samples.assets if a.visible]
    chosen = {
        next(a.id for a in visible if a.mime_type == "image/png"),
        next(a.id for a in visible if a.mime_type == "image/jpeg"),
        max((a for a in visible if a.kind == "image"), key=lambda a: len(a.original())).id,
        *(a.id for a in visible if a.kind in ("3d", "video")),
    }
    return lambda asset: asset.id in chosen


def test_sdk_pages_through_every_asset_and_sees_the_visible_set(fake: ScenarioFake) -> None:
    fake.reset_counters()
    snapshot = trio.run(
        lambda: sdk_snapshot(
            fake.api_url, fake.key, fake.secret, fetch=lambda a: False, page_size=None
        )
    )
    assert snapshot.visible_ids == fake.visible_asset_ids()
    assert fake.log.count("assets") == -(-len(fake.samples.assets) // 50)  # default pages of 50
    tree = fake.expected_tree()
    for name, size in snapshot.native_sizes.items():
        assert tree[f"assets/{name}"].size == size
    assert not any(e.headers.get("x-stainless-async") != "async:trio" for e in fake.log.entries())


def test_sdk_downloads_are_what_the_oracle_expects(fake: ScenarioFake) -> None:
    fake.redirect_first_hit = True  # every signed URL bounces once; the SDK flow must not care
    try:
        snapshot = trio.run(
            lambda: sdk_snapshot(
                fake.api_url,
                fake.key,
                fake.secret,
                project_id=fake.project_id,
                fetch=showcase(fake),
            )
        )
    finally:
        fake.redirect_first_hit = False
    assert len(snapshot.files) >= 2 * 7 + 4 * 3 + 2
    tree = fake.expected_tree()
    names = [path.removeprefix("assets/") for path in tree if path.startswith("assets/")]
    assert snapshot_mismatches(snapshot, names, lambda name: tree[f"assets/{name}"].data) == []
    cdn_requests = fake.log.entries("cdn")
    assert cdn_requests and not any("authorization" in e.headers for e in cdn_requests)


def test_sdk_reads_collections_and_models(fake: ScenarioFake) -> None:
    async def main() -> tuple[list[Any], list[Any]]:
        async with AsyncScenario(
            api_key=fake.key, api_secret=fake.secret, base_url=fake.api_url
        ) as client:
            collections = [c async for c in client.collections.list()]
            ids = list(fake.samples.model_ids.values())
            bulk = await client.models.get_bulk(model_ids=ids, minimal=True)
            return collections, bulk.models

    collections, models = trio.run(main)
    assert [(c.id, c.name) for c in collections] == [
        (c.id, c.name) for c in fake.samples.collections
    ]
    assert {m.id: m.name for m in models} == {m.id: m.name for m in fake.samples.models}


def test_sdk_maps_the_fakes_errors_to_its_exceptions(fake: ScenarioFake) -> None:
    image = next(a for a in fake.samples.assets if a.visible and a.kind == "image")

    async def main() -> None:
        async with AsyncScenario(
            api_key=fake.key, api_secret=fake.secret, base_url=fake.api_url, max_retries=0
        ) as client:
            with pytest.raises(NotFoundError):
                await client.assets.retrieve("asset_doesNotExist")
            with pytest.raises(BadRequestError):
                await client.assets.download.request(image.id, target_format="glb")
            retrieved = await client.assets.retrieve(image.id)
            assert retrieved.asset.id == image.id
        async with AsyncScenario(
            api_key=fake.key, api_secret="wrong", base_url=fake.api_url, max_retries=0
        ) as client:
            with pytest.raises(AuthenticationError):
                await client.assets.retrieve(image.id)

    trio.run(main)


JOB_STATUSES = ("pending", "queued", "warming-up", "in-progress", "finalizing")
JOB_ENDS = ("success", "failure", "canceled")


async def finished(client: AsyncScenario, job_id: str) -> tuple[list[str], Any]:
    """Poll a batch download job with the SDK until it ends: the statuses seen, the last."""
    seen: list[str] = []
    with trio.fail_after(10):
        while True:
            status = await client.assets.download.get_status(job_id)
            assert status.job_id == job_id
            if not seen or seen[-1] != status.job_status:
                seen.append(status.job_status)
            if status.job_status in JOB_ENDS:
                return seen, status
            await trio.sleep(0.01)


def test_sdk_batch_download_dry_run_job_status_and_zip(fake: ScenarioFake) -> None:
    chosen = [a for a in fake.samples.assets if a.visible][:5]
    gpt = fake.samples.model_ids["gpt"]
    by_gpt = [a for a in fake.samples.assets if a.visible and a.model_id == gpt]

    async def zip_at(cdn: httpx.AsyncClient, url: str) -> dict[str, bytes]:
        with zipfile.ZipFile(io.BytesIO(await _fetch(cdn, url))) as archive:
            return {name: archive.read(name) for name in archive.namelist()}

    async def main() -> None:
        async with (
            AsyncScenario(
                api_key=fake.key, api_secret=fake.secret, base_url=fake.api_url, max_retries=0
            ) as client,
            httpx.AsyncClient(follow_redirects=True, timeout=60) as cdn,
        ):
            download = client.assets.download
            options: Any = {"file_name_template": "<id>", "flat": True, "prefer_original": False}
            query: Any = {"asset_ids": [a.id for a in chosen], "inference_ids": [], "model_ids": []}
            raw = await download.with_raw_response.request_batch(
                options=options, query=query, dry_run="true", project_id=fake.project_id
            )
            assert raw.status_code == 269
            estimate = await raw.parse()  # 269 is a success to the SDK: a job-less answer
            assert estimate.job_id is None
            assert estimate.model_extra == {"creativeUnitsCost": 3}
            assert fake.log.count("export-status") == 0

            job = await download.request_batch(options=options, query=query)
            assert job.job_id.startswith("job_")
            seen, status = await finished(client, job.job_id)
            assert seen[-1] == "success" and len(seen) >= 2
            assert [JOB_STATUSES.index(s) for s in seen[:-1]] == sorted(
                JOB_STATUSES.index(s) for s in seen[:-1]
            )
            assert await zip_at(cdn, status.download_url) == {
                f"{a.id}.{NATIVE_EXT[a.mime_type]}": a.original() for a in chosen
            }

            model_job = await download.request_batch(
                options={"file_name_template": "<generator>/<id>"},
                query={"asset_ids": [], "inference_ids": [], "model_ids": [gpt]},
            )
            _, status = await finished(client, model_job.job_id)
            assert await zip_at(cdn, status.download_url) == {
                f"GPT Image 2/{a.id}.{NATIVE_EXT[a.mime_type]}": a.original() for a in by_gpt
            }

            with pytest.raises(BadRequestError, match="limited to 1000"):
                await download.request_batch(
                    options=options,
                    query={**query, "asset_ids": [f"asset_{n}" for n in range(1001)]},
                )
            with pytest.raises(NotFoundError):
                await download.get_status("job_doesNotExist")

    fake.reset_export()
    fake.reset_counters()
    trio.run(main)
