"""Lazy metadata through the kernel: walking names costs listing pages, sizes come when asked.

A fake Grand Challenge of its own (module scope) serves generated archives: one of 2,500
items to walk, a small one whose every byte is checked, and one item with 2,000 files in one
directory. Each item holds a Value, two Files and an Image, as issue 11 measured.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Mount, Mounter, no_new_requests, wait_for
from test_grand_challenge import LS_LR, ls_sizes, mmap_read

from fsmount.demo.gc_samples import scale_archive
from fsmount.demo.services import DemoServices, start_demo_services

pytestmark = pytest.mark.fuse

WALKED, SMALL, WIDE, GROWING = "scale-walked", "scale-small", "scale-wide", "scale-growing"
WALKED_ITEMS, SMALL_ITEMS, WIDE_FILES = 2_500, 40, 2_000
NO_FILE_REQUESTS = ("item", "image", "media", "storage")


@pytest.fixture(scope="module")
def scaled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoServices]:
    workdir = tmp_path_factory.mktemp("scaled-services")
    with start_demo_services(scenario=False, workdir=workdir) as running:
        assert running.gc is not None
        data = running.gc.data
        data.add_archive(scale_archive(data.builder, WALKED, WALKED_ITEMS))
        data.add_archive(scale_archive(data.builder, SMALL, SMALL_ITEMS))
        data.add_archive(scale_archive(data.builder, WIDE, 1, wide=WIDE_FILES))
        data.add_archive(scale_archive(data.builder, GROWING, 5))
        yield running


@pytest.fixture
def scale_mounter(tmp_path: Path, scaled: DemoServices) -> Iterator[Mounter]:
    mounter = Mounter(tmp_path, scaled)
    try:
        yield mounter
    finally:
        mounter.cleanup()


def archive_path(mount: Mount, slug: str) -> Path:
    return mount.path / "grand-challenge" / slug


def wide_dir(mount: Mount, services: DemoServices) -> tuple[Path, dict[str, int]]:
    """The directory of 2,000 files, and their sizes by name."""
    assert services.gc is not None
    expected = services.gc.expected_archive(WIDE)
    (item,) = {path.split("/")[0] for path in expected}
    sizes = {
        path.rsplit("/", 1)[1]: payload.size
        for path, payload in expected.items()
        if path.startswith(f"{item}/wide/")
    }
    assert len(sizes) == WIDE_FILES
    return archive_path(mount, WIDE) / item / "wide", sizes


def stays(condition: Callable[[], bool], seconds: float, what: str) -> None:
    """`condition` holds now and for `seconds`: nothing started late behind our back."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert condition(), what
        time.sleep(0.05)


def fuse_stats(mount: Mount) -> dict[str, int]:
    status = subprocess.run(
        [sys.executable, "-m", "fsmount", "status", "--json", str(mount.path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return json.loads(status.stdout)["fuse"]


# --------------------------------------------------------------------------- walks


def test_walking_names_costs_listing_pages_and_no_request_per_file(scale_mounter: Mounter):
    gc = scale_mounter.services.gc
    mount = scale_mounter.start("--archive", WALKED, scenario=False)
    root = archive_path(mount, WALKED)
    expected = set(gc.expected_archive(WALKED))
    gc.log.reset()
    found = subprocess.run(
        ["find", str(root), "-type", "f"], capture_output=True, text=True, check=True, timeout=300
    )
    assert {os.path.relpath(p, root) for p in found.stdout.splitlines()} == expected
    counts = gc.log.counts()
    pages = -(-WALKED_ITEMS // 1000)  # items and images: 1,000 records a page
    assert counts.get("items", 0) == pages and counts.get("images", 0) == pages, counts
    assert sum(counts.values()) <= 2 * pages + 2, counts  # + the list of archives
    assert not any(counts.get(kind) for kind in NO_FILE_REQUESTS), counts

    # Every other way of walking names: no request at all now that the listings are in.
    with no_new_requests(gc.log, "archives", "items", "images", *NO_FILE_REQUESTS):
        walked = {
            os.path.relpath(os.path.join(top, name), root)
            for top, _, files in os.walk(root)
            for name in files
        }
        assert walked == expected
        scans = glob.glob(str(root / "*" / "images" / "ct" / "*.mha"))
        assert len(scans) == WALKED_ITEMS
        named = subprocess.run(
            ["find", str(root), "-name", "*.mha"], capture_output=True, check=True, timeout=300
        )
        assert len(named.stdout.splitlines()) == WALKED_ITEMS
        plain = subprocess.run(
            ["ls", "-R", str(root)], capture_output=True, text=True, check=True, timeout=300
        )
        assert sum(1 for line in plain.stdout.splitlines() if line.endswith(".mha")) == len(scans)
        with os.scandir(root) as entries:
            assert sum(1 for e in entries if e.is_dir()) == WALKED_ITEMS


def test_after_a_walk_every_size_and_byte_is_exact(scale_mounter: Mounter, tmp_path: Path):
    gc = scale_mounter.services.gc
    mount = scale_mounter.start("--archive", SMALL, scenario=False)
    root = archive_path(mount, SMALL)
    expected = gc.expected_archive(SMALL)
    gc.log.reset()
    subprocess.run(["find", str(root)], capture_output=True, check=True, timeout=120)
    assert gc.log.count("storage") == 0

    assert {p: os.stat(root / p).st_size for p in expected} == {
        p: payload.size for p, payload in expected.items()
    }
    listing = subprocess.run(
        [*LS_LR, str(root)], capture_output=True, text=True, check=True, timeout=120
    )
    assert ls_sizes(listing.stdout, root) == {p: payload.size for p, payload in expected.items()}
    du = subprocess.run(["du", "-sb", str(root)], capture_output=True, text=True, check=True)
    assert int(du.stdout.split()[0]) == sum(p.size for p in expected.values())  # dirs: 0 bytes
    subprocess.run(["cp", "-r", str(root), str(tmp_path / "copy")], check=True, timeout=120)
    for path, payload in expected.items():
        (tmp_path / "reference").write_bytes(payload.bytes())
        for copy in (tmp_path / "copy" / path, root / path):
            subprocess.run(["cmp", str(tmp_path / "reference"), str(copy)], check=True)


def test_a_listed_file_never_stated_reads_right_through_fstat_mmap_and_read(
    scale_mounter: Mounter,
):
    gc = scale_mounter.services.gc
    mount = scale_mounter.start("--archive", SMALL, scenario=False)
    root = archive_path(mount, SMALL)
    expected = gc.expected_archive(SMALL)
    stored = [p for p in expected if p.endswith((".csv", ".pdf", ".mha"))]
    gc.log.reset()
    for directory in {os.path.dirname(p) for p in stored}:
        os.listdir(root / directory)  # listed: the kernel holds entries of unknown size
    assert gc.log.count("storage") == 0, "a listing probed a size"
    by_fstat, by_mmap, by_read = stored[0], stored[1], stored[2]

    fd = os.open(root / by_fstat, os.O_RDONLY)
    try:
        assert os.fstat(fd).st_size == expected[by_fstat].size
        assert os.read(fd, 1 << 20) == expected[by_fstat].bytes()
    finally:
        os.close(fd)
    assert mmap_read([root / by_mmap]) == [expected[by_mmap].bytes()]  # fstat, then pages
    with open(root / by_read, "rb") as file:
        assert file.read() == expected[by_read].bytes()


# --------------------------------------------------------------------------- sizes when asked


def test_one_stat_in_a_directory_of_unknown_sizes_costs_that_files_probe(scale_mounter):
    gc = scale_mounter.services.gc
    mount = scale_mounter.start("--archive", WIDE, scenario=False)
    directory, sizes = wide_dir(mount, scale_mounter.services)
    assert sorted(os.listdir(directory)) == sorted(sizes)
    gc.log.reset()
    name = sorted(sizes)[len(sizes) // 2]
    assert os.stat(directory / name).st_size == sizes[name]
    stays(
        lambda: gc.log.count("storage") == 1 and gc.log.count("media") == 1,
        1.5,
        f"one stat made more than its own probe: {gc.log.counts()}",
    )


def test_ls_l_of_2000_unknown_sizes_probes_ahead_in_parallel(scale_mounter: Mounter):
    gc = scale_mounter.services.gc
    mount = scale_mounter.start("--archive", WIDE, scenario=False)
    directory, sizes = wide_dir(mount, scale_mounter.services)
    os.listdir(directory.parent)
    gc.log.reset()
    gc.storage_hold = 0.02  # one probe after the other: 2,000 x 20 ms and more
    try:
        started = time.monotonic()
        listing = subprocess.run(
            ["ls", "-l", str(directory)], capture_output=True, text=True, check=True, timeout=120
        )
        took = time.monotonic() - started
    finally:
        gc.storage_hold = 0.0
    shown = {line.split()[-1]: int(line.split()[4]) for line in listing.stdout.splitlines()[1:]}
    assert shown == sizes
    assert gc.log.count("storage") == len(sizes), gc.log.counts()  # each probed once
    assert gc.log.peak_in_flight("storage") > 1
    assert took < 10, f"ls -l took {took:.1f} s"


def test_du_of_300_item_folders_probes_ahead_across_folders(scale_mounter: Mounter):
    """Each item folder holds one or two stored files, so guesses must run ahead across
    folders; the kernel takes the sizes they found from the listing of the next folder."""
    gc = scale_mounter.services.gc
    mount = scale_mounter.start("--archive", WALKED, scenario=False)
    root = archive_path(mount, WALKED)
    names = sorted(os.listdir(root))[:300]
    expected = gc.expected_archive(WALKED)
    wanted = {p: payload.size for p, payload in expected.items() if p.split("/")[0] in names}
    stored = sum(1 for p in wanted if not p.endswith(".json"))
    gc.log.reset()
    gc.api_hold = gc.storage_hold = 0.02  # one probe after the other: 900 x 40 ms and more
    try:
        started = time.monotonic()
        du = subprocess.run(
            ["du", "-sb", *(str(root / n) for n in names)],
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        )
        took = time.monotonic() - started
    finally:
        gc.api_hold = gc.storage_hold = 0.0
    assert sum(int(line.split()[0]) for line in du.stdout.splitlines()) == sum(wanted.values())
    # Each asked-for size probed once; past the last folder, at most a window of guesses.
    assert stored <= gc.log.count("storage") <= stored + 128, (stored, gc.log.counts())
    assert took < 15, f"du -sb of 300 item folders took {took:.1f} s"


def test_ls_l_asks_for_no_extended_attribute_of_each_file(scale_mounter: Mounter):
    gc = scale_mounter.services.gc
    mount = scale_mounter.start("--archive", WIDE, scenario=False)
    directory, sizes = wide_dir(mount, scale_mounter.services)
    gc.log.reset()
    subprocess.run(["du", "-sb", str(directory)], capture_output=True, check=True, timeout=120)
    before = fuse_stats(mount)["xattr_requests"]
    subprocess.run(["ls", "-l", str(directory)], capture_output=True, check=True, timeout=120)
    asked = fuse_stats(mount)["xattr_requests"] - before
    assert asked <= 4, f"ls -l of {len(sizes)} files asked for {asked} extended attributes"
    some = directory / sorted(sizes)[0]
    assert os.getxattr(some, "user.fsmount.archive") == WIDE.encode()
    assert "user.fsmount.item" in os.listxattr(some)
    for unserved in ("security.selinux", "system.posix_acl_access"):
        with pytest.raises(OSError) as err:
            os.getxattr(some, unserved)
        assert err.value.errno == errno.EOPNOTSUPP, unserved
    with pytest.raises(OSError) as err:
        os.getxattr(some, "user.fsmount.nothing")
    assert err.value.errno == errno.ENODATA
    assert gc.log.count("storage") == len(sizes)


# --------------------------------------------------------------------------- paths before listings


def test_a_path_in_an_archive_never_listed_costs_its_item(scale_mounter: Mounter):
    gc = scale_mounter.services.gc
    mount = scale_mounter.start("--archive", WALKED, "--archive", SMALL, scenario=False)
    root = archive_path(mount, WALKED)
    expected = gc.expected_archive(WALKED)
    value = next(p for p in expected if p.endswith("results.json"))
    scan = next(p for p in expected if p.startswith(value.split("/")[0]) and p.endswith(".mha"))
    gc.log.reset()
    assert (root / value).read_bytes() == expected[value].bytes()
    counts = gc.log.counts()
    assert counts.get("item") == 1 and not counts.get("items") and not counts.get("images"), counts
    assert (root / scan).read_bytes() == expected[scan].bytes()
    counts = gc.log.counts()
    assert counts.get("item") == 1 and counts.get("image") == 1, counts
    assert not counts.get("items") and not counts.get("images"), counts

    other = next(iter(gc.expected_archive(SMALL))).split("/")[0]  # an item of another archive
    gc.log.reset()
    for missing in (root / other, root / "not-an-item"):
        with pytest.raises(FileNotFoundError):
            os.stat(missing)
    assert gc.log.counts() == {"item": 1}, gc.log.counts()  # the name that could be an item

    # Listed now, the archive shows the item opened before as the same directory.
    inode = os.stat(root / value.split("/")[0]).st_ino
    assert len(os.listdir(root)) == WALKED_ITEMS
    assert os.stat(root / value.split("/")[0]).st_ino == inode


def test_scenario_walks_convert_nothing(mounter: Mounter, services) -> None:
    sc = services.scenario
    mount = mounter.start(gc=False)
    root = mount.path / "scenario"
    expected = sc.expected_tree()
    sc.log.reset()
    found = subprocess.run(
        ["find", str(root), "-type", "f"], capture_output=True, text=True, check=True, timeout=120
    )
    assert {os.path.relpath(p, root) for p in found.stdout.splitlines()} == set(expected)
    subprocess.run(["ls", "-R", str(root)], capture_output=True, check=True, timeout=120)
    assert sum(len(files) for _, _, files in os.walk(root)) == len(expected)
    assert sc.log.count("download") == 0 and sc.log.count("cdn") == 0, sc.log.counts()

    # Two stats in a row of converted formats: only those two are converted, no guess ahead.
    converted = sorted(p for p, e in expected.items() if e.target_format is not None)
    for path in converted[:2]:
        assert os.stat(root / path).st_size == expected[path].size
    stays(
        lambda: sc.log.count("download") == 2 and sc.log.count("cdn") == 2,
        1.5,
        f"a conversion nobody asked for: {sc.log.counts()}",
    )


def test_a_refresh_keeps_inodes_and_lists_again(scale_mounter: Mounter) -> None:
    gc = scale_mounter.services.gc
    mount = scale_mounter.start("--archive", SMALL, scenario=False)
    root = archive_path(mount, SMALL)
    first = sorted(os.listdir(root))[0]
    inode = os.stat(root / first).st_ino
    gc.log.reset()
    os.kill(mount.proc.pid, 1)  # SIGHUP: listings are asked again
    wait_for(lambda: "SIGHUP" in mount.logs(), 10, "the mount to take the SIGHUP")
    assert sorted(os.listdir(root))[0] == first
    assert gc.log.count("items") == 1
    assert os.stat(root / first).st_ino == inode


def test_when_the_listing_time_is_up_a_walk_goes_on_while_listings_come_again(
    scale_mounter: Mounter,
) -> None:
    """A walk of 100,000 items outlives any listing time: once it is up, the last listings
    are served at once while new ones are asked for behind them (SIGHUP still waits)."""
    gc = scale_mounter.services.gc
    mount = scale_mounter.start("--archive", GROWING, "--dir-cache-time", "1", scenario=False)
    root = archive_path(mount, GROWING)
    before = sorted(os.listdir(root))
    added = gc.data.add_item(GROWING)
    time.sleep(1.2)  # the listing time (1 s) is up
    gc.log.reset()
    gc.api_hold = 5.0  # a slow service: every listing now takes 5 s
    try:
        started = time.monotonic()
        assert os.listdir(root.parent) == [GROWING]
        assert sorted(os.listdir(root)) == before
        assert os.stat(root / before[0]).st_mode
        took = time.monotonic() - started
    finally:
        gc.api_hold = 0.0
    assert took < 4, f"the walk waited {took:.1f} s for listings"
    wait_for(lambda: added in os.listdir(root), 20, "the new item in the new listing")
    # The archive's directory was kept across the refresh of the archives: no item of it
    # was looked up alone, and the listing that came behind was used.
    assert gc.log.count("item") == 0, gc.log.counts()


def test_a_walk_beyond_the_entry_budget_stays_exact_and_bounded(scale_mounter: Mounter):
    """The kernel is asked to drop what was walked longest ago; walks still see everything."""
    gc = scale_mounter.services.gc
    budget = 2_000  # a 2,500-item archive is about 20,000 entries
    mount = scale_mounter.start("--archive", WALKED, "--max-entries", str(budget), scenario=False)
    root = archive_path(mount, WALKED)
    expected = set(gc.expected_archive(WALKED))
    for _ in range(2):  # the second walk looks up again what the kernel dropped
        found = subprocess.run(
            ["find", str(root), "-type", "f"], capture_output=True, text=True, check=True
        )
        assert {os.path.relpath(p, root) for p in found.stdout.splitlines()} == expected
        held = fuse_stats(mount)["entries"]
        assert held < 4 * budget, f"{held} entries held for a budget of {budget}"
    some = sorted(expected)[:50]
    assert all(os.stat(root / path).st_size >= 0 for path in some)


def resident_kib(mount: Mount) -> int:
    with open(f"/proc/{mount.proc.pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_memory_stays_flat_across_50_refreshes_of_a_1000_item_archive(mounter: Mounter, services):
    """Each SIGHUP brings a new listing; the old tree is let go, not kept beside it."""
    gc = services.gc
    mount = mounter.start("--archive", "demo-cohort", scenario=False)
    root = mount.path / "grand-challenge" / "demo-cohort"
    items = len(gc.data.items(gc.data.archive("demo-cohort")))
    assert items >= 1000

    def refresh_and_walk() -> None:
        done = mount.logs().count("SIGHUP")
        os.kill(mount.proc.pid, 1)
        wait_for(lambda: mount.logs().count("SIGHUP") > done, 10, "the mount to take SIGHUP")
        found = subprocess.run(["find", str(root)], capture_output=True, check=True, timeout=60)
        assert len(found.stdout.splitlines()) == 1 + 3 * items  # item, value, file

    inode = os.stat(next(root.iterdir()) / "cohort-score.json").st_ino
    for _ in range(15):  # the allocator settles (its arenas grow for a dozen rounds)
        refresh_and_walk()
    settled = resident_kib(mount)
    for _ in range(35):
        refresh_and_walk()
    grown = resident_kib(mount) - settled
    # A tree kept per refresh would be about 35 x 1 MB here.
    assert grown < 8 * 1024, f"{grown} KiB more after 35 more refreshes of {items} items"
    assert os.stat(next(root.iterdir()) / "cohort-score.json").st_ino == inode  # same file
