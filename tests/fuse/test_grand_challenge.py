"""Grand Challenge through the kernel: the real CLI mounted against the fake service."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import SKIPPED_EDGE_CASES, Mount, Mounter, no_new_requests, wait_for

from fsmount.demo.content import pattern
from fsmount.demo.services import DemoServices

pytestmark = pytest.mark.fuse

SMALL_ARCHIVES = ("demo-medical", "demo-edge-cases", "demo-empty", "demo-private", "demo-dicom")
HUGE = "demo-large"
COHORT = "demo-cohort"
API_KINDS = ("archives", "archive", "items", "item", "images", "image", "interfaces", "gcapi")
LS_LR = ["ls", "-lR", "--time-style=+%s"]  # one field per time, whatever the locale
# demo-edge-cases' first item: the sockets left out (hostile path, or a path an earlier value
# holds) and those that must show, in the fake's value order (the first claim of a path wins).
EDGE_SKIPPED = {
    "edge-absolute": "/etc/passwd-copy.json",
    "edge-parent": "../escape.json",
    "edge-double-slash": "a//b.json",
    "edge-current-dir": "./x.json",
    "edge-nul": "nul\x00byte.json",
    "edge-empty-path": "",
    "edge-trailing-slash": "dir/",
    "edge-dup-file": "duplicate.json",  # after the value edge-dup-value
    "edge-notes-inner": "notes/inner.csv",  # the value edge-notes is the file "notes"
    "edge-blocked-image": "images/edge",  # the file edge-image-blocker is there first
}
EDGE_SHOWN = {
    "edge-summary": "summary.json",
    "edge-dup-value": "duplicate.json",
    "edge-notes": "notes",
    "edge-image-blocker": "images/edge",
    "edge-table": "edge-files/table.csv",
    "edge-ok-image": "images/edge-ok",
}


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


def ls_sizes(listing: str, root: Path) -> dict[str, int]:
    """Regular files (path relative to `root` -> size) in the output of `LS_LR root`."""
    sizes: dict[str, int] = {}
    current = "."
    for line in listing.splitlines():
        if line.endswith(":") and line.startswith(str(root)):
            current = os.path.relpath(line[:-1], root)
        elif line.startswith("-"):
            *_, size, _when, name = line.split(maxsplit=6)
            sizes[os.path.normpath(os.path.join(current, name))] = int(size)
    return sizes


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


def test_images_open_in_simpleitk(shared_mount: Mount, services) -> None:
    sitk = pytest.importorskip("SimpleITK")
    root = shared_mount.path / "grand-challenge" / "demo-medical"
    expected = services.gc.expected_archive("demo-medical")
    images = [p for p in expected if p.endswith((".mha", ".mhd"))]
    assert any(p.endswith(".mhd") for p in images)
    for rel in images:
        image = sitk.ReadImage(str(root / rel))  # .mhd finds its .zraw by the stored name
        assert image.GetSize() == (32, 32, 8), rel


# Maps each file named on the command line and writes `<length>\n<bytes>` for it, touching the
# pages last one first (random access, not a sequential read). It runs in a process of its own:
# the fakes serve from threads of the test process, and a page fault taken while the GIL is held
# (mmap slicing holds it) would stall them until the read times out and the mapping SIGBUSes.
MMAP_READER = """
import mmap, os, sys
out = sys.stdout.buffer
for path in sys.argv[1:]:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:  # an empty file cannot be mapped
            out.write(b"0\\n")
            continue
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            pages = [m[i : i + 4096] for i in reversed(range(0, len(m), 4096))]
    data = b"".join(reversed(pages))
    out.write(b"%d\\n" % len(data) + data)
"""


def mmap_read(paths: list[Path]) -> list[bytes]:
    done = subprocess.run(
        [sys.executable, "-c", MMAP_READER, *map(str, paths)],
        capture_output=True,
        timeout=240,
    )
    assert done.returncode == 0, (done.returncode, done.stderr.decode(errors="replace"))
    out, results = done.stdout, []
    while out:
        length, _, out = out.partition(b"\n")
        results.append(out[: int(length)])
        out = out[int(length) :]
    return results


def test_mmap_of_every_file_gives_the_expected_bytes(mounter: Mounter, services) -> None:
    # A mount of its own: no earlier test has put these files in the page cache.
    mount = mounter.start("--archive", "demo-medical", scenario=False)
    root = mount.path / "grand-challenge" / "demo-medical"
    expected = services.gc.expected_archive("demo-medical")
    rels = sorted(expected)
    assert len(rels) >= 20 and any(not expected[r].size for r in rels)
    mapped = mmap_read([root / rel for rel in rels])
    assert len(mapped) == len(rels)
    for rel, data in zip(rels, mapped, strict=True):
        assert data == expected[rel].bytes(), rel


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
    expected = gc.expected_archive(COHORT)
    gc.log.reset()
    listing = subprocess.run([*LS_LR, str(root)], capture_output=True, text=True, check=True)
    items = sum(1 for line in listing.stdout.splitlines() if line.startswith("d"))
    assert items == len(gc.data.items(gc.data.archive(COHORT)))
    assert ls_sizes(listing.stdout, root) == {path: p.size for path, p in expected.items()}
    du = subprocess.run(["du", "-sb", str(root)], capture_output=True, text=True, check=True)
    counts = gc.log.counts()
    assert counts.get("items", 0) <= 3, counts  # 1,050 items: two pages of 1,000
    assert counts.get("item", 0) == 0 and counts.get("image", 0) == 0, counts
    assert counts.get("storage", 0) <= len(expected), counts

    # A second look at the same mount makes no request at all.
    with no_new_requests(gc.log, *API_KINDS, "media", "storage"):
        subprocess.run([*LS_LR, str(root)], capture_output=True, check=True)
        subprocess.run(["du", "-sb", str(root)], capture_output=True, check=True)
        # du -b adds the directories' own apparent sizes to the files' (exactly, no rounding)
        dirs = [root, *(root / d for d in gc.expected_dirs(COHORT))]
        dir_bytes = sum(os.stat(d).st_size for d in dirs)
    assert int(du.stdout.split()[0]) == sum(p.size for p in expected.values()) + dir_bytes

    # After a remount on the same cache, sizes are remembered: only listing pages are asked.
    assert mount.stop() == 0
    mount = mounter.start("--archive", COHORT, scenario=False, cache_dir=cache)
    gc.log.reset()
    again = subprocess.run(
        [*LS_LR, str(mount.path / "grand-challenge" / COHORT)],
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


def align_unstable_pages(gc, archive_pk: str, total: int) -> None:
    """Make the next listing's second page of 1,000 overlap its first by 200 records.

    With `unstable_order`, the fake shifts list request n's window back by `(n % 3) * 100`
    rows (`_unstable_pick`): the page at offset 1,000 tells the current `n % 3` by its length,
    and a few more requests make the next listing's second request land on a shift of 2.
    """

    def second_page() -> int:
        response = httpx.get(
            gc.api_url + "archives/items/",
            params={"archive": archive_pk, "limit": 1000, "offset": 1000},
            headers={"Authorization": f"Bearer {gc.token}"},
            timeout=60,
        )
        response.raise_for_status()
        return len(response.json()["results"])

    shift, rest = divmod(second_page() - (total - 1000), 100)
    assert rest == 0 and shift in (0, 1, 2), shift
    for _ in range(-shift % 3):  # the listing's pages come next: n + 1 and n + 2
        second_page()


def test_size_probes_of_a_listing_run_in_parallel(mounter: Mounter, services) -> None:
    gc = services.gc
    slug = "demo-medical"
    expected = gc.expected_archive(slug)
    # The item whose own directory holds the most stored files (sizes the API does not give).
    candidates = {}
    for item in gc.data.items(gc.data.archive(slug)):
        values = {v.socket.relative_path for v in item.values if v.socket.super_kind == "Value"}
        candidates[item.pk] = {
            path.split("/", 1)[1]
            for path in expected
            if path.startswith(f"{item.pk}/") and path.count("/") == 1
        } - values
    pk = max(candidates, key=lambda k: len(candidates[k]))
    stored = candidates[pk]
    assert len(stored) >= 3, candidates
    mount = mounter.start("--archive", slug, scenario=False)
    item = mount.path / "grand-challenge" / slug / pk
    os.listdir(item.parent)  # the item list, before counting
    gc.log.reset()
    gc.storage_hold = 0.5  # one after the other, the probes would take 0.5 s each
    try:
        listing = subprocess.run(
            [*LS_LR, str(item)], capture_output=True, text=True, check=True, timeout=120
        )
    finally:
        gc.storage_hold = 0.0
    probes = [e for e in gc.log.entries("storage") if e.headers.get("range") == "bytes=0-0"]
    assert len(probes) >= len(stored), gc.log.counts()
    peak = gc.log.peak_in_flight("storage")
    assert peak > 1, f"{len(probes)} size probes, never more than {peak} in flight at once"
    wanted = {path: p.size for path, p in expected.items() if path.startswith(f"{pk}/")}
    assert ls_sizes(listing.stdout, item.parent) == wanted


def test_items_are_deduplicated_when_pages_move(mounter: Mounter, services) -> None:
    gc = services.gc
    archive = gc.data.archive(COHORT)
    expected = {item.pk for item in gc.data.items(archive)}
    gc.unstable_order = True
    try:
        align_unstable_pages(gc, archive.pk, len(expected))
        gc.log.reset()
        mount = mounter.start("--archive", COHORT, scenario=False)
        names = os.listdir(mount.path / "grand-challenge" / COHORT)
        served = gc.log.records("items")
    finally:
        gc.unstable_order = False
    assert sorted(names) == sorted(expected)
    # The overlap really reached the client: it was handed duplicates and showed each item once.
    assert served > len(expected), f"{served} item records served for {len(expected)} items"


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


def test_hostile_paths_stay_inside_their_item(shared_mount: Mount, services) -> None:
    gc = services.gc
    archive = shared_mount.path / "grand-challenge" / "demo-edge-cases"
    expected = gc.expected_archive("demo-edge-cases")
    pks = {item.pk for item in gc.data.items(gc.data.archive("demo-edge-cases"))}
    # Nothing landed beside the items, beside the archives or at the root (`..`, absolute).
    assert sorted(os.listdir(shared_mount.path)) == ["grand-challenge", "scenario"]
    assert set(os.listdir(archive.parent)) == set(gc.archive_slugs())
    assert set(os.listdir(archive)) == pks
    found: set[str] = set()
    for pk in pks:
        item = archive / pk
        for current, dirnames, filenames in os.walk(item):
            for name in dirnames + filenames:
                assert name not in ("..", ".", "") and "\0" not in name
                path = os.path.join(current, name)
                assert os.path.realpath(path).startswith(f"{item}/"), path
                assert not os.path.islink(path), path
            found.update(os.path.relpath(os.path.join(current, n), archive) for n in filenames)
    assert found == set(expected)  # every surviving value shows, and nothing else
    (hostile,) = (pk for pk in pks if any(p.startswith(f"{pk}/images/") for p in expected))
    for rel in EDGE_SHOWN.values():
        assert (archive / hostile / rel).exists(), rel
    assert not (archive / hostile / "notes").is_dir()  # the first claim (a file) won
    assert (archive / hostile / "images" / "edge").is_file()
    assert not any("passwd" in p or "escape" in p or "inner" in p for p in found)


def test_skipped_values_are_logged_and_the_rest_of_the_item_shows(mounter: Mounter, services):
    gc = services.gc
    mount = mounter.start("--archive", "demo-edge-cases", scenario=False)
    mount.expect_logs(SKIPPED_EDGE_CASES)
    root = mount.path / "grand-challenge" / "demo-edge-cases"
    expected = gc.expected_archive("demo-edge-cases")
    (hostile,) = (
        item for item in gc.data.items(gc.data.archive("demo-edge-cases")) if len(item.values) > 1
    )
    assert {v.socket.slug for v in hostile.values} == set(EDGE_SKIPPED) | set(EDGE_SHOWN)
    relative_paths = {v.socket.slug: v.socket.relative_path for v in hostile.values}
    assert relative_paths == {**EDGE_SKIPPED, **EDGE_SHOWN}

    files, dirs = walk(root)
    assert files == {path: payload.size for path, payload in expected.items()}
    assert dirs == gc.expected_dirs("demo-edge-cases")
    for path, payload in expected.items():
        assert (root / path).read_bytes() == payload.bytes(), path
    assert json.loads((root / hostile.pk / "duplicate.json").read_text()) == {"first": True}

    def skip_lines() -> list[str]:
        return [line for line in mount.logs().splitlines() if "skipping" in line]

    def names_every_skipped_socket() -> bool:
        lines = skip_lines()
        return all(any(f"'{slug}'" in line for line in lines) for slug in EDGE_SKIPPED)

    wait_for(names_every_skipped_socket, 30, f"a log line for each of {sorted(EDGE_SKIPPED)}")
    for line in skip_lines():
        assert not any(f"'{slug}'" in line for slug in EDGE_SHOWN), line
        assert hostile.pk in line, line
        assert gc.token not in line


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
    mount.expect_logs(r"TooSlowError from storage; giving up")
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
