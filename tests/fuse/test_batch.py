"""`fsmount cache prefetch --batch` through the kernel: Scenario batch export jobs fill the mount's
cache, after their cost is shown and accepted, and every later read of a native file is served
with no request. Each test counts the fake's requests by kind and checks every byte read.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mounter, no_new_requests
from test_cache import block_files, cache_cli, error_lines, read_direct

from fsmount.demo.scenario import DEFAULT_URL_EXPIRY, REQUEST_KINDS, ScenarioFake
from fsmount.demo.scenario_export import Entries
from fsmount.demo.services import DemoServices

pytestmark = pytest.mark.fuse

SPRITES = "collections/Sprites"  # 65 images: png and jpg natives, 6 converted formats each


@pytest.fixture
def fake(services: DemoServices) -> Iterator[ScenarioFake]:
    """The shared fake Scenario, its export knobs and faults as a test left them put back."""
    scenario = services.scenario
    assert scenario is not None
    try:
        yield scenario
    finally:
        scenario.reset_export()
        scenario.reset_faults()
        scenario.url_expiry = DEFAULT_URL_EXPIRY


def natives(fake: ScenarioFake, directory: str) -> dict[str, bytes]:
    """The native files `directory` (below scenario/) shows: path below scenario/ -> bytes."""
    return {
        path: expected.data
        for path, expected in fake.expected_tree().items()
        if path.rpartition("/")[0] == directory and expected.target_format is None
    }


def batch(mounter: Mounter, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return cache_cli(mounter, "prefetch", "--batch", *map(str, args))


def export_requests(fake: ScenarioFake) -> tuple[int, int]:
    """(dry runs, jobs started) since the log was reset."""
    entries = fake.log.entries("export")
    dry = sum("dryRun=" in entry.url for entry in entries)
    return dry, len(entries) - dry


def zip_reads(fake: ScenarioFake) -> tuple[int, int]:
    """(reads of a zip's tail, where its directory is; downloads of its entries)."""
    ranges = [entry.headers.get("range", "") for entry in fake.log.entries("export-zip")]
    tails = sum(r.startswith("bytes=-") for r in ranges)
    return tails, len(ranges) - tails


def check_natives(root: Path, files: dict[str, bytes]) -> None:
    for path, data in files.items():
        assert read_direct(root / "scenario" / path) == data, path


def test_batch_of_a_collection_is_one_dry_run_one_job_one_zip_then_reads_cost_nothing(
    mounter: Mounter, fake: ScenarioFake
) -> None:
    mount = mounter.start(gc=False)
    sprites = mount.path / "scenario" / SPRITES
    files = natives(fake, SPRITES)
    assert len(files) == 65
    os.listdir(sprites)  # listed now, so that what follows counts the export's requests only
    fake.reset_counters()
    result = batch(mounter, "--yes", sprites)
    assert result.returncode == 0, result.stderr
    assert error_lines(result) == []
    assert export_requests(fake) == (1, 1)
    assert zip_reads(fake) == (1, 1)
    assert fake.log.count("download") == fake.log.count("cdn") == 0
    assert fake.log.count("export-status") >= 1
    out = result.stdout
    assert "export cost: 33 creative units for 65 files in 1 job\n" in out
    assert "exported 65 of 65 native files in 1 job: " in out
    assert "left 390 converted files to the per-file path" in out
    with no_new_requests(fake.log, *REQUEST_KINDS):
        check_natives(mount.path, files)

    again = batch(mounter, "--yes", sprites)  # everything is cached: no job, no cost
    assert again.returncode == 0, again.stderr
    assert "exported 0 of 0 native files in 0 jobs" in again.stdout
    assert "65 were cached already" in again.stdout
    assert export_requests(fake) == (1, 1) and zip_reads(fake) == (1, 1)


def test_batch_splits_the_assets_into_jobs_of_batch_size_and_a_free_export_needs_no_yes(
    mounter: Mounter, fake: ScenarioFake
) -> None:
    fake.export_limit = 50  # the service refuses bigger jobs: the client must split
    fake.export_unit_cost = 0
    mount = mounter.start(gc=False)
    files = natives(fake, "assets")
    assert len(files) == 128
    fake.reset_counters()
    result = batch(mounter, "--batch-size", "50", mount.path / "scenario" / "assets")
    assert result.returncode == 0, result.stderr
    assert "export cost: 0 creative units for 128 files in 3 jobs\n" in result.stdout
    assert "exported 128 of 128 native files in 3 jobs: " in result.stdout
    assert export_requests(fake) == (3, 3)  # every dry run comes before the first job
    kinds = [entry.kind for entry in fake.log.entries() if entry.kind != "export-status"]
    assert kinds[:4] == ["assets", "assets", "export", "export"]  # the listing, then dry runs
    assert zip_reads(fake)[1] == 3
    with no_new_requests(fake.log, *REQUEST_KINDS):
        check_natives(mount.path, files)


def test_a_cost_is_refused_without_yes_and_only_scenario_paths_are_exported(
    mounter: Mounter, fake: ScenarioFake, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    mount = mounter.start(cache_dir=cache)
    sprites = mount.path / "scenario" / SPRITES
    fake.reset_counters()
    refused = batch(mounter, sprites)
    assert refused.returncode == 1
    assert error_lines(refused) == [
        "fsmount: exporting 65 files costs 33 creative units: run again with --yes to accept"
    ]
    assert export_requests(fake) == (1, 0)
    assert fake.log.count("export-zip") == fake.log.count("export-status") == 0
    assert block_files(cache) == []

    archive = mount.path / "grand-challenge" / "demo-medical"
    elsewhere = batch(mounter, "--yes", archive)
    assert elsewhere.returncode == 2
    assert error_lines(elsewhere) == [
        f"fsmount: {archive} is not under {mount.path / 'scenario'}:"
        " --batch exports Scenario files only"
    ]
    assert export_requests(fake) == (1, 0)


@pytest.mark.parametrize("failure", ["failure", "canceled", "expired link"])
def test_a_failed_job_or_a_dead_link_is_one_line_and_leaves_the_cache_empty(
    mounter: Mounter, fake: ScenarioFake, tmp_path: Path, failure: str
) -> None:
    cache = tmp_path / "cache"
    mount = mounter.start(gc=False, cache_dir=cache)
    if failure == "expired link":
        fake.url_expiry = -60  # every link the status hands out has expired already
    else:
        fake.export_outcome = failure
    fake.reset_counters()
    result = batch(mounter, "--yes", mount.path / "scenario" / SPRITES)
    assert result.returncode == 1
    [line] = error_lines(result)
    job = fake.log.entries("export-status")[0].url.split("/")[-1].partition("?")[0]
    if failure == "expired link":
        assert line.startswith(f"fsmount: cannot download the zip of export {job}: "), line
        assert "HTTP 403" in line
        assert zip_reads(fake) == (2, 0)  # the link, then a new one asked for: both refused
    else:
        assert line == f"fsmount: scenario export {job} ended in {failure}; nothing came of it"
        assert fake.log.count("export-zip") == 0
    assert block_files(cache) == []


def test_a_zip_cut_half_way_is_one_line_and_leaves_only_right_bytes(
    mounter: Mounter, fake: ScenarioFake
) -> None:
    mount = mounter.start("--timeout", "3", gc=False)
    files = natives(fake, "assets")
    fake.export_cut_at = 0.5  # every transfer of the zip that reaches its middle drops there
    fake.reset_counters()
    result = batch(mounter, "--yes", mount.path / "scenario" / "assets")
    assert result.returncode == 1
    [line] = error_lines(result)
    assert line.startswith("fsmount: cannot download the zip of export job_"), line
    assert "RemoteProtocolError" in line
    tails, downloads = zip_reads(fake)
    assert tails == 1 and downloads > 1  # the download was resumed, and cut each time
    fake.reset_counters()
    check_natives(mount.path, files)  # cached files and fetched ones: all right
    fetched = fake.log.count("download")
    assert 0 < fetched < len(files) * 0.75, fetched  # the first half was kept


def test_an_entry_of_no_asset_or_of_the_wrong_size_is_skipped_and_fetched_on_its_own(
    mounter: Mounter, fake: ScenarioFake
) -> None:
    mount = mounter.start(
        gc=False, expect_logs=["skipped .*: .* bytes, but the asset has", "no asset asked for"]
    )
    files = natives(fake, SPRITES)
    victim = sorted(files)[0].rpartition("/")[2]

    def tamper(entries: Entries) -> Entries:
        shorter = [(name, data[:-1] if name == victim else data) for name, data in entries]
        return [*shorter, ("asset_notAskedFor.png", b"stray")]

    fake.export_hook = tamper
    fake.reset_counters()
    result = batch(mounter, "--yes", mount.path / "scenario" / SPRITES)
    assert result.returncode == 0, result.stderr
    size = len(files[sorted(files)[0]])
    warnings = [line.split(": ", 3)[3] for line in error_lines(result)]
    assert warnings == [
        f"skipped {victim}: {size - 1:,} bytes, but the asset has {size:,}",
        "skipped asset_notAskedFor.png: no asset asked for",
    ]
    assert all(line.startswith("fsmount: warning: export job_") for line in error_lines(result))
    assert "exported 64 of 65 native files in 1 job" in result.stdout
    assert "reading 1 native file one by one" in result.stdout
    assert "prefetched 1 of 1 files" in result.stdout
    assert fake.log.count("download") == 1  # the victim's own signed URL
    with no_new_requests(fake.log, *REQUEST_KINDS):
        check_natives(mount.path, files)
