"""Grand Challenge through the kernel: the real CLI mounted against the fake service."""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Mount, Mounter, no_new_requests, wait_for

from fsmount.demo.content import pattern
from fsmount.demo.services import DemoServices

pytestmark = pytest.mark.fuse

SMALL_ARCHIVES = ("demo-medical", "demo-edge-cases", "demo-empty", "demo-private")
HUGE = "demo-large"
COHORT = "demo-cohort"
API_KINDS = ("archives", "archive", "items", "item", "images", "interfaces", "gcapi")


def walk(root: Path) -> tuple[dict[str, int], set[str]]:
    """Files (relative path -> st_size) and directories below `root`, as the kernel shows them."""
    files: dict[str, int] = {}
    dirs: set[str] = set()
    for current, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(current, root)
        for name in dirnames:
            dirs.add(os.path.normpath(os.path.join(rel, name)))
        for name in filenames:
            path = os.path.join(current, name)
            files[os.path.normpath(os.path.join(rel, name))] = os.stat(path).st_size
    return files, dirs


def huge_file(mount: Mount, services: DemoServices) -> tuple[Path, int]:
    expected = services.gc.expected_archive(HUGE)
    rel, payload = max(expected.items(), key=lambda kv: kv[1].size)
    return mount.path / "grand-challenge" / HUGE / rel, payload.size


def test_archives_shown_are_those_the_token_sees(shared_mount: Mount, services) -> None:
    shown = set(os.listdir(shared_mount.path / "grand-challenge"))
    assert shown == set(services.gc.archive_slugs())
    assert set(os.listdir(shared_mount.path)) == {"grand-challenge", "scenario"}


@pytest.mark.parametrize("slug", SMALL_ARCHIVES)
def test_tree_sizes_and_bytes_equal_the_contract(shared_mount: Mount, services, slug) -> None:
    root = shared_mount.path / "grand-challenge" / slug
    expected = services.gc.expected_archive(slug)
    files, dirs = walk(root)
    assert files == {path: payload.size for path, payload in expected.items()}
    assert dirs == services.gc.expected_dirs(slug)
    for path, payload in expected.items():
        assert (root / path).read_bytes() == payload.bytes(), path


def test_cp_r_and_cmp_give_the_stored_bytes(shared_mount: Mount, services, tmp_path) -> None:
    source = shared_mount.path / "grand-challenge" / "demo-medical"
    subprocess.run(["cp", "-r", str(source), str(tmp_path / "copy")], check=True)
    for path, payload in services.gc.expected_archive("demo-medical").items():
        reference = tmp_path / "reference"
        reference.write_bytes(payload.bytes())
        subprocess.run(["cmp", str(reference), str(tmp_path / "copy" / path)], check=True)
        subprocess.run(["cmp", str(reference), str(source / path)], check=True)


def test_images_open_in_simpleitk_and_mmap_works(shared_mount: Mount, services) -> None:
    sitk = pytest.importorskip("SimpleITK")
    root = shared_mount.path / "grand-challenge" / "demo-medical"
    expected = services.gc.expected_archive("demo-medical")
    images = [p for p in expected if p.endswith((".mha", ".mhd"))]
    assert any(p.endswith(".mhd") for p in images)
    for rel in images:
        image = sitk.ReadImage(str(root / rel))  # .mhd finds its .zraw by the stored name
        assert image.GetSize() == (32, 32, 8), rel
        with open(root / rel, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            assert m[:] == expected[rel].bytes()


def test_values_are_json_dumps_indent_2_without_newline(shared_mount: Mount, services) -> None:
    root = shared_mount.path / "grand-challenge" / "demo-medical"
    texts = {
        rel: (root / rel).read_text()
        for rel in services.gc.expected_archive("demo-medical")
        if rel.endswith(".json")
    }
    assert any(t == "null" for t in texts.values())
    assert any("\\u00eb" in t for t in texts.values())  # ASCII escapes, as json.dumps does
    assert not any(t.endswith("\n") for t in texts.values())


def test_first_mib_of_a_3_gib_file_streams_without_fetching_the_rest(
    mounter: Mounter, services
) -> None:
    mount = mounter.start("--archive", HUGE, scenario=False)
    path, size = huge_file(mount, services)
    assert os.stat(path).st_size == size  # exact before the first byte is read
    services.gc.log.reset()
    with open(path, "rb") as f:
        assert f.read(1 << 20) == pattern(20_240_601, 0, 1 << 20)
        f.seek(size // 2 + 12_345)
        assert f.read(4096) == pattern(20_240_601, size // 2 + 12_345, 4096)
    served = 0
    for entry in services.gc.log.entries("storage"):
        first, _, last = (
            entry.headers.get("range", "bytes=0-").removeprefix("bytes=").partition("-")
        )
        served += (int(last) if last else size - 1) - int(first) + 1
    assert served < 80 << 20, f"storage served {served} bytes for 1 MiB + 4 KiB of reads"


def test_ls_lr_and_du_of_1050_items_cost_pages_not_requests_per_file(
    mounter: Mounter, services, tmp_path
) -> None:
    gc = services.gc
    cache = tmp_path / "cohort-cache"
    mount = mounter.start("--archive", COHORT, scenario=False, cache_dir=cache)
    root = mount.path / "grand-challenge" / COHORT
    gc.log.reset()
    listing = subprocess.run(["ls", "-lR", str(root)], capture_output=True, text=True, check=True)
    items = sum(1 for line in listing.stdout.splitlines() if line.startswith("d"))
    assert items == len(gc.data.items(gc.data.archive(COHORT)))
    du = subprocess.run(["du", "-sb", str(root)], capture_output=True, text=True, check=True)
    expected_bytes = sum(p.size for p in gc.expected_archive(COHORT).values())
    assert int(du.stdout.split()[0]) >= expected_bytes
    counts = gc.log.counts()
    assert counts.get("items", 0) <= 3, counts  # 1,050 items: two pages of 1,000
    assert counts.get("item", 0) == 0 and counts.get("images", 0) == 0, counts
    assert counts.get("storage", 0) <= len(gc.expected_archive(COHORT)), counts

    # A second look at the same mount makes no request at all.
    with no_new_requests(gc.log, *API_KINDS, "media", "storage"):
        subprocess.run(["ls", "-lR", str(root)], capture_output=True, check=True)
        subprocess.run(["du", "-sb", str(root)], capture_output=True, check=True)

    # After a remount on the same cache, sizes are remembered: only listing pages are asked.
    assert mount.stop() == 0
    mount = mounter.start("--archive", COHORT, scenario=False, cache_dir=cache)
    gc.log.reset()
    again = subprocess.run(
        ["ls", "-lR", str(mount.path / "grand-challenge" / COHORT)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert again.stdout.replace(str(mount.path), "") == listing.stdout.replace(
        str(root.parent.parent), ""
    )
    counts = gc.log.counts()
    assert counts.get("media", 0) == 0 and counts.get("storage", 0) == 0, counts
    assert counts.get("items", 0) <= 3, counts


def test_items_are_deduplicated_when_pages_move(mounter: Mounter, services) -> None:
    gc = services.gc
    gc.unstable_order = True
    try:
        mount = mounter.start("--archive", COHORT, scenario=False)
        names = os.listdir(mount.path / "grand-challenge" / COHORT)
    finally:
        gc.unstable_order = False
    expected = {item.pk for item in gc.data.items(gc.data.archive(COHORT))}
    assert sorted(names) == sorted(expected)


def test_everything_is_read_only(shared_mount: Mount) -> None:
    root = shared_mount.path
    item = next((root / "grand-challenge" / "demo-medical").iterdir())
    some_file = item / "results.json"
    attempts = [
        lambda: os.open(some_file, os.O_WRONLY),
        lambda: os.open(some_file, os.O_RDWR | os.O_APPEND),
        lambda: os.open(item / "new.txt", os.O_WRONLY | os.O_CREAT),
        lambda: os.mkdir(item / "newdir"),
        lambda: os.unlink(some_file),
        lambda: os.rmdir(item / "files"),
        lambda: os.rename(some_file, item / "moved.json"),
        lambda: os.chmod(some_file, 0o644),
        lambda: os.utime(some_file, (0, 0)),
        lambda: os.symlink("x", item / "link"),
        lambda: os.truncate(some_file, 0),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as err:
            attempt()
        assert err.value.errno == errno.EROFS, attempt
    for path in (root, item, item / "files"):
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o555 and st.st_uid == os.getuid()
    st = os.stat(some_file)
    assert stat.S_IMODE(st.st_mode) == 0o444 and st.st_uid == os.getuid()


def test_hostile_paths_stay_inside_their_item(shared_mount: Mount) -> None:
    archive = shared_mount.path / "grand-challenge" / "demo-edge-cases"
    for current, dirnames, filenames in os.walk(archive):
        for name in dirnames + filenames:
            real = os.path.realpath(os.path.join(current, name))
            assert real.startswith(str(archive) + "/")
            assert name not in ("..", ".", "") and "\0" not in name
    assert not list(shared_mount.path.rglob("passwd*"))
    assert not list(shared_mount.path.rglob("escape*"))


def test_storage_never_sees_the_api_token(shared_mount: Mount, services) -> None:
    subprocess.run(["cat", *map(str, shared_mount.path.rglob("*.pdf"))], capture_output=True)
    entries = services.gc.log.entries("storage")
    assert entries
    for entry in entries:
        assert "authorization" not in entry.headers
        assert services.gc.token not in repr(entry)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_unmount_cleanly_with_exit_code_0(mounter: Mounter, sig) -> None:
    mount = mounter.start(scenario=False)
    os.listdir(mount.path / "grand-challenge")
    assert mount.stop(sig) == 0
    assert not os.path.ismount(mount.path)


def fsmount(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fsmount", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def test_daemon_mode_returns_once_mounted_and_unmount_works(mounter: Mounter, tmp_path) -> None:
    mnt = tmp_path / "daemon"
    mnt.mkdir()
    args = ["mount", str(mnt), "--cache-dir", str(tmp_path / "c"), *mounter.args(scenario=False)]
    result = fsmount(*args, env=mounter.env())
    try:
        assert result.returncode == 0, result.stderr
        assert os.path.ismount(mnt)
        assert "demo-medical" in os.listdir(mnt / "grand-challenge")
        done = fsmount("unmount", str(mnt), env=mounter.env())
        assert done.returncode == 0, done.stderr
        assert not os.path.ismount(mnt)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def one_line_failure(mounter: Mounter, tmp_path: Path, *extra: str, token: str | None = None):
    mnt = tmp_path / "fails"
    mnt.mkdir(exist_ok=True)
    args = ["mount", str(mnt), "--cache-dir", str(tmp_path / "c"), *mounter.args(scenario=False)]
    if token is not None:
        (mounter.base / "gc-token").write_text(token)
    started = time.monotonic()
    result = fsmount(*args, *extra, env=mounter.env())
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert not os.path.ismount(mnt)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0], elapsed


def test_a_bad_token_fails_before_mounting_with_one_clear_line(mounter, services, tmp_path):
    wrong = "f" * 64
    line, elapsed = one_line_failure(mounter, tmp_path, token=wrong)
    assert "401" in line and "Invalid token" in line
    assert wrong not in line and services.gc.token not in line
    assert elapsed < 30


def test_an_unknown_archive_fails_before_mounting(mounter, tmp_path):
    line, _ = one_line_failure(mounter, tmp_path, "--archive", "no-such-archive")
    assert "no-such-archive" in line


def test_an_unreachable_api_fails_within_seconds(mounter, tmp_path):
    line, elapsed = one_line_failure(
        mounter, tmp_path, "--grand-challenge-url", "http://127.0.0.1:9/api/v1/"
    )
    assert "Grand Challenge" in line
    assert elapsed < 30


def test_archive_filter_shows_only_the_named_archives(mounter: Mounter) -> None:
    mount = mounter.start("--archive", "demo-medical", "--archive", "demo-empty", scenario=False)
    assert sorted(os.listdir(mount.path / "grand-challenge")) == ["demo-empty", "demo-medical"]
    assert os.listdir(mount.path / "grand-challenge" / "demo-empty") == []


def test_a_stalled_storage_fails_the_read_within_the_timeout_and_the_mount_lives(
    mounter: Mounter, services
) -> None:
    gc = services.gc
    mount = mounter.start("--timeout", "3", "--archive", "demo-medical", scenario=False)
    root = mount.path / "grand-challenge" / "demo-medical"
    files, _ = walk(root)  # sizes learned while storage is healthy
    pdf = next(p for p in files if p.endswith(".pdf"))
    gc.storage_faults.configure(stall_rate=1.0, stall_seconds=60)
    try:
        started = time.monotonic()
        with pytest.raises(OSError) as err:
            (root / pdf).read_bytes()
        assert err.value.errno in (errno.EIO, errno.ETIMEDOUT)
        assert time.monotonic() - started < 30
    finally:
        gc.reset_faults()
    wait_for(lambda: (root / pdf).read_bytes() is not None, 30, "reads to work again")
    assert (root / pdf).read_bytes() == services.gc.expected_archive("demo-medical")[pdf].bytes()


def test_copying_a_tree_with_shutil_matches(shared_mount: Mount, services, tmp_path) -> None:
    shutil.copytree(shared_mount.path / "grand-challenge" / "demo-private", tmp_path / "p")
    for path, payload in services.gc.expected_archive("demo-private").items():
        assert (tmp_path / "p" / path).read_bytes() == payload.bytes()
