"""The disk cache through the kernel: budget, LRU, remounts, crashes, corruption, sharing, and
`fsmount cache stats | clear | prefetch`. Every read is checked byte for byte.

Reads that must reach the mount (not the kernel's page cache, which the mount keeps across
opens) use O_DIRECT. Cache contents are measured while the mount process is stopped
(SIGSTOP), so a measurement is one instant, never a walk racing evictions.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import random
import re
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mount, Mounter, no_new_requests, wait_for
from test_faults import within
from test_grand_challenge import COHORT, HUGE, fsmount, huge_file

from fsmount.cache.blocks import HEADER_SIZE, cache_usage
from fsmount.demo.content import pattern
from fsmount.demo.services import DemoServices

pytestmark = pytest.mark.fuse

MiB = 1 << 20
SEED = 20_240_601  # demo-large's byte stream
MEDICAL = "demo-medical"
STORED = (".mha", ".mhd", ".zraw", ".tif", ".tiff", ".pdf", ".csv")  # File/Image sockets
BOUND = 2.0  # seconds a request may take on a loaded machine (a lock wait is 5 s, then EIO)


# -- helpers ------------------------------------------------------------------------------------


def read_direct(path: Path, offset: int = 0, length: int | None = None) -> bytes:
    """Bytes of `path` read with O_DIRECT, so every read reaches the mount."""
    end = os.stat(path).st_size if length is None else offset + length
    parts = []
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        with mmap.mmap(-1, MiB) as buffer:  # page-aligned, as O_DIRECT requires
            while offset < end:
                n = os.preadv(fd, [buffer], offset)
                if n == 0:
                    break
                take = min(n, end - offset)
                parts.append(buffer[:take])
                offset += take
    finally:
        os.close(fd)
    return b"".join(parts)


def check_huge(path: Path, offset: int, length: int, *, direct: bool = False) -> None:
    """Read `[offset, offset + length)` of the 3 GiB file in 4 MiB reads; assert every byte."""
    with open(path, "rb", buffering=0) as f:
        for start in range(offset, offset + length, 4 * MiB):
            size = min(4 * MiB, offset + length - start)
            data = read_direct(path, start, size) if direct else os.pread(f.fileno(), size, start)
            assert data == pattern(SEED, start, size), f"wrong bytes at {start}"


def medical(mount: Mount) -> Path:
    return mount.path / "grand-challenge" / MEDICAL


def stored_files(services: DemoServices) -> dict[str, bytes]:
    """demo-medical's files that come from storage (not inline values): path -> bytes."""
    expected = services.gc.expected_archive(MEDICAL)
    return {p: e.bytes() for p, e in expected.items() if p.endswith(STORED) and e.size}


def check_tree(root: Path, files: dict[str, bytes], *, direct: bool = False) -> None:
    for rel, data in files.items():
        got = read_direct(root / rel) if direct else (root / rel).read_bytes()
        assert got == data, rel


def storage_ranges(services: DemoServices) -> list[tuple[int, int]]:
    """(first, last) byte of every storage GET since the log was reset, size probes left out."""
    ranges = []
    for entry in services.gc.log.entries("storage"):
        spec = entry.headers.get("range", "")
        first, _, last = spec.removeprefix("bytes=").partition("-")
        if spec and spec != "bytes=0-0":
            ranges.append((int(first), int(last)))
    return ranges


def blocks_dir(cache: Path) -> Path:
    return cache / "blocks"


def held_bytes(cache: Path) -> int:
    """Bytes of block files, those being written (tmp/) included."""
    tmp = blocks_dir(cache) / "tmp"
    writing = sum(p.stat().st_size for p in tmp.iterdir()) if tmp.is_dir() else 0
    return cache_usage(blocks_dir(cache)).bytes_held + writing


def block_files(cache: Path) -> list[Path]:
    return sorted(blocks_dir(cache).glob("[0-9a-f][0-9a-f]/*-*"))


def _stopped(pid: int) -> bool:
    """Whether every thread of `pid` is stopped (state T), so nothing of it runs."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            state = (task / "stat").read_text().rpartition(")")[2].split()[0]
            if state not in ("T", "t"):
                return False
    return True


@contextlib.contextmanager
def frozen(*mounts: Mount) -> Iterator[None]:
    """Stop the mount processes (SIGSTOP) for an exact look at the cache; always resume them."""
    try:
        for mount in mounts:
            os.kill(mount.proc.pid, signal.SIGSTOP)
        for mount in mounts:
            wait_for(lambda m=mount: _stopped(m.proc.pid), 10, "the mount process to stop")
        yield
    finally:
        for mount in mounts:
            os.kill(mount.proc.pid, signal.SIGCONT)


def cache_cli(mounter: Mounter, *args: str, env: dict[str, str] | None = None):
    return fsmount("cache", *args, env=mounter.env(env))


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


# -- budget, LRU, remount -------------------------------------------------------------------------


def test_the_budget_holds_while_reading_three_times_more(
    mounter: Mounter, services, tmp_path
) -> None:
    budget = 64 * MiB
    cache = tmp_path / "cache"
    mount = mounter.start("--cache-size", "64M", "--archive", HUGE, scenario=False, cache_dir=cache)
    path, _ = huge_file(mount, services)
    done = threading.Event()
    samples: list[int] = []
    errors: list[BaseException] = []

    def sample() -> None:
        try:
            while not done.wait(0.05):
                with frozen(mount):
                    samples.append(held_bytes(cache))
        except BaseException as exc:
            errors.append(exc)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        check_huge(path, 0, 200 * MiB)
    finally:
        done.set()
        sampler.join(30)
    assert not errors, errors
    assert len(samples) >= 3, samples
    assert max(samples) <= budget, [s for s in samples if s > budget]
    with frozen(mount):
        after = held_bytes(cache)
    assert budget // 2 < after <= budget  # it was used, and evicted: 200 MiB did not fit


def test_lru_evicts_the_least_recently_used_file_first(mounter: Mounter, services, tmp_path):
    files = stored_files(services)
    by_size = sorted({len(data): rel for rel, data in files.items()}.items(), reverse=True)
    (_, a), (_, b), (_, c), (_, d) = by_size[0], by_size[1], by_size[2], by_size[-1]
    size = {p: HEADER_SIZE + len(files[p]) for p in (a, b, c, d)}
    budget = size[a] + size[b] + size[c]  # A, B and C fit exactly; D needs room
    assert size[d] <= size[b]  # so evicting B alone makes room for D
    cache = tmp_path / "cache"
    args = ("--cache-size", str(budget), "--archive", MEDICAL)
    mount = mounter.start(*args, scenario=False, cache_dir=cache)
    root = medical(mount)
    for rel in (a, b, c, a, d):  # A is used again before D comes: B is now the oldest
        assert read_direct(root / rel) == files[rel], rel
    assert mount.stop() == 0

    mount = mounter.start(*args, scenario=False, cache_dir=cache)  # sees only what is on disk
    root = medical(mount)
    gc = services.gc
    with no_new_requests(gc.log, "storage"):
        for rel in (a, c, d):
            assert (root / rel).read_bytes() == files[rel], rel
    before = gc.log.count("storage")
    assert (root / b).read_bytes() == files[b]
    assert gc.log.count("storage") == before + 1, "B should have been evicted"


def test_a_remount_serves_cached_files_without_storage_or_cdn(
    mounter: Mounter, services, tmp_path
) -> None:
    cache = tmp_path / "cache"
    files = stored_files(services)
    scenario = services.scenario.expected_tree()
    natives = sorted(p for p in scenario if p.startswith("assets/") and p.endswith(".png"))[:3]

    def read_all(mount: Mount) -> None:
        check_tree(medical(mount), files)
        check_tree(mount.path / "scenario", {p: scenario[p].data for p in natives})

    mount = mounter.start("--archive", MEDICAL, cache_dir=cache)
    read_all(mount)
    assert mount.stop() == 0
    mount = mounter.start("--archive", MEDICAL, cache_dir=cache)
    with (
        no_new_requests(services.gc.log, "storage", "media"),
        no_new_requests(services.scenario.log, "download", "cdn"),
    ):
        read_all(mount)


def test_a_4k_read_is_answered_before_its_block_is_in_and_an_unmount_keeps_the_block(
    mounter: Mounter, services, tmp_path
) -> None:
    """Every storage body stalls half-way for 2 s: a 4 KiB O_DIRECT read at the start of an
    uncached block is answered from the half that came, without waiting out the stall.
    Unmounting right after waits for the rest of the block (the download resumes after the
    stall), so a remount serves the whole block without a storage request."""
    cache = tmp_path / "cache"
    mount = mounter.start("--archive", HUGE, scenario=False, cache_dir=cache)
    path, _ = huge_file(mount, services)
    os.stat(path)
    offset = 700 * MiB
    services.gc.storage_faults.configure(stall_rate=1.0, stall_seconds=2)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            with mmap.mmap(-1, 4096) as page:  # one page: the kernel asks the mount for 4 KiB
                started = time.monotonic()
                assert os.preadv(fd, [page], offset) == 4096
                took = time.monotonic() - started
                assert page[:] == pattern(SEED, offset, 4096)
        finally:
            os.close(fd)
        stalled = services.gc.storage_faults.events
        wait_for(lambda: stalled("stall"), 10, "the body to stall")
    finally:
        services.gc.reset_faults()
    assert took < 1.5, f"the 4 KiB read waited {took:.1f} s for the rest of its block"
    assert mount.stop() == 0
    mount = mounter.start("--archive", HUGE, scenario=False, cache_dir=cache)
    path, _ = huge_file(mount, services)
    os.stat(path)
    with no_new_requests(services.gc.log, "storage"):
        assert read_direct(path, offset, MiB) == pattern(SEED, offset, MiB)


# -- crashes and damage -------------------------------------------------------------------------


def test_kill_9_during_a_download_then_a_remount_serves_correct_bytes(
    mounter: Mounter, services, tmp_path
) -> None:
    gc = services.gc
    cache = tmp_path / "cache"
    args = ("--archive", HUGE)
    mount = mounter.start(*args, scenario=False, cache_dir=cache)
    path, _ = huge_file(mount, services)
    check_huge(path, 0, 8 * MiB)  # stored before the crash
    far = 1 << 30
    outcome: list[BaseException | bytes] = []

    def read_far() -> None:
        try:
            outcome.append(read_direct(path, far, 4 * MiB))
        except OSError as exc:
            outcome.append(exc)

    gc.storage_faults.configure(stall_rate=1.0, stall_seconds=30)
    reader = threading.Thread(target=read_far)
    try:
        reader.start()
        wait_for(lambda: any(f >= far for f, _ in storage_ranges(services)), 30, "the download")
        os.kill(mount.proc.pid, signal.SIGKILL)
        mount.proc.wait(30)
        subprocess.run(["fusermount3", "-u", "-z", str(mount.path)], check=True)
        reader.join(30)
    finally:
        gc.reset_faults()
    assert not reader.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], OSError), outcome

    # What a crash mid-write leaves: the dead process's lock and a torn temporary file.
    locks = list((blocks_dir(cache) / "locks").glob(f"{mount.proc.pid}-*.lock"))
    assert len(locks) == 1, locks
    torn = blocks_dir(cache) / "tmp" / f"{locks[0].stem}.999"
    torn.write_bytes(b"FSMB half a block")

    mount = mounter.start(*args, scenario=False, cache_dir=cache)
    path, _ = huge_file(mount, services)
    os.stat(path)
    gc.log.reset()
    check_huge(path, 0, 8 * MiB, direct=True)
    # Stored before the crash: not fetched again (readahead past them may be).
    assert all(first >= 8 * MiB for first, _ in storage_ranges(services)), storage_ranges(services)
    check_huge(path, far, 4 * MiB, direct=True)
    wait_for(lambda: not torn.exists() and not locks[0].exists(), 30, "the crash debris to go")


def test_a_flipped_byte_in_a_cached_block_is_detected_and_fetched_again(
    mounter: Mounter, services, tmp_path
) -> None:
    files = stored_files(services)
    rel = max(files, key=lambda p: len(files[p]))
    cache = tmp_path / "cache"
    args = ("--archive", MEDICAL)
    mount = mounter.start(*args, scenario=False, cache_dir=cache)
    assert (medical(mount) / rel).read_bytes() == files[rel]
    assert mount.stop() == 0
    [block] = block_files(cache)
    damaged = bytearray(block.read_bytes())
    assert damaged[HEADER_SIZE:] == files[rel]
    damaged[HEADER_SIZE + len(files[rel]) // 2] ^= 0x01
    block.write_bytes(damaged)

    mount = mounter.start(*args, scenario=False, cache_dir=cache)
    mount.expect_logs(r"cache block \S+ is corrupt")
    services.gc.log.reset()
    assert (medical(mount) / rel).read_bytes() == files[rel]
    assert storage_ranges(services) == [(0, len(files[rel]) - 1)]
    assert block.read_bytes()[HEADER_SIZE:] == files[rel]  # repaired on disk
    assert "corrupt" in mount.logs()


# -- sharing and single flight ------------------------------------------------------------------


def test_two_mounts_share_one_cache_directory(mounter: Mounter, services, tmp_path) -> None:
    cache = tmp_path / "cache"
    budget = 32 * MiB
    args = ("--cache-size", "32M", "--archive", HUGE, "--archive", MEDICAL)
    mounts = [mounter.start(*args, scenario=False, cache_dir=cache) for _ in range(2)]
    files = stored_files(services)
    errors: list[BaseException] = []

    def read(mount: Mount, offset: int) -> None:
        try:
            check_huge(huge_file(mount, services)[0], offset, 48 * MiB)
            check_tree(medical(mount), files)
        except BaseException as exc:
            errors.append(exc)

    # Both mounts read the same regions at once, evicting each other's blocks as they go.
    readers = [
        threading.Thread(target=read, args=(mount, offset))
        for mount in mounts
        for offset in (0, 24 * MiB)
    ]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(120)
    assert not any(r.is_alive() for r in readers)
    assert not errors, errors
    with frozen(*mounts):
        assert held_bytes(cache) <= 2 * budget  # NOTES.md: N processes of budget B, N x B
        assert sorted(cache_usage(blocks_dir(cache)).users) == sorted(m.proc.pid for m in mounts)


def holds_the_database_lock(cache: Path) -> bool:
    """Whether a process holds the write lock of the metadata database in `cache`."""
    db = sqlite3.connect(cache / "metadata.sqlite", timeout=0, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError:
        return True
    finally:
        db.close()


def test_a_mount_answers_while_another_on_its_cache_holds_the_database(
    mounter: Mounter, services, tmp_path
) -> None:
    """Another process holds the metadata database's write lock (here: this test, taking it
    as `fsmount cache` or a second mount would) while one mount writes its metadata in a burst
    (`ls -lR` of 1,050 items: first seen, sizes probed): the other mount on the same cache
    still answers `stat` and `ls` of what it never saw, within a bound, and the burst ends."""
    cache = tmp_path / "cache"
    quiet = mounter.start("--archive", MEDICAL, scenario=False, cache_dir=cache)
    busy = mounter.start("--archive", COHORT, scenario=False, cache_dir=cache)
    holder = sqlite3.connect(cache / "metadata.sqlite", timeout=10, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the write lock, held until the checks are done
    try:
        assert holds_the_database_lock(cache)
        with within(60, "ls -lR of 1,050 items while the lock is held"):
            burst = subprocess.run(
                ["ls", "-lR", str(busy.path / "grand-challenge" / COHORT)],
                capture_output=True,
                timeout=60,
            )
        assert burst.returncode == 0
        archive = medical(quiet)  # never listed by either mount before
        with within(BOUND, "ls of the archive"):
            items = sorted(os.listdir(archive))[:3]
        for item in items:
            with within(BOUND, f"ls and stat of {item}"):
                for entry in os.scandir(archive / item):
                    entry.stat()
        assert holds_the_database_lock(cache)  # the bounds held while it was held
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    check_tree(medical(quiet), stored_files(services))  # and what was learned is right


def test_ten_concurrent_readers_of_one_file_cause_one_download_per_block(
    mounter: Mounter, services
) -> None:
    mount = mounter.start("--archive", HUGE, scenario=False)
    path, _ = huge_file(mount, services)
    os.stat(path)  # the size is known before the log is reset
    length = 16 * MiB
    start = threading.Barrier(10)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            start.wait(30)
            check_huge(path, 0, length, direct=True)
        except BaseException as exc:
            errors.append(exc)

    services.gc.log.reset()
    readers = [threading.Thread(target=read) for _ in range(10)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(120)
    assert not errors, errors
    downloads: dict[int, int] = {}
    for first, last in storage_ranges(services):
        for block in range(first // MiB, last // MiB + 1):
            downloads[block] = downloads.get(block, 0) + 1
    assert set(range(length // MiB)) <= set(downloads)
    assert max(downloads.values()) == 1, {b: n for b, n in downloads.items() if n > 1}


def test_random_4k_reads_fetch_only_nearby_blocks(mounter: Mounter, services) -> None:
    mount = mounter.start("--archive", HUGE, scenario=False)
    path, size = huge_file(mount, services)
    os.stat(path)
    offsets = random.Random(4).sample(range(0, size - 4096, 4096), 24)
    services.gc.log.reset()
    with open(path, "rb", buffering=0) as f:
        for offset in offsets:
            assert os.pread(f.fileno(), 4096, offset) == pattern(SEED, offset, 4096), offset
    ranges = storage_ranges(services)
    served = sum(last - first + 1 for first, last in ranges)
    assert served <= 2 * MiB * len(offsets), f"{served} bytes for {len(offsets)} reads"
    for first, last in ranges:  # nothing far from a read (no readahead of random reads)
        assert any(o - MiB <= first and last < o + 2 * MiB for o in offsets), (first, last)


# -- fsmount cache stats | clear | prefetch -------------------------------------------------------


def test_cache_stats_shows_blocks_budget_and_the_mount_using_it(
    mounter: Mounter, services, tmp_path
) -> None:
    cache = tmp_path / "cache"
    mount = mounter.start("--archive", MEDICAL, scenario=False, cache_dir=cache)
    files = stored_files(services)
    check_tree(medical(mount), files)  # one miss per file
    check_tree(medical(mount), files, direct=True)  # one hit per file
    result = cache_cli(mounter, "stats", "--json", "--cache-dir", str(cache), "--cache-size", "3G")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["cache_dir"] == str(cache)
    assert stats["blocks"] == len(files)
    assert stats["bytes"] == sum(HEADER_SIZE + len(data) for data in files.values())
    assert stats["budget"] == 3 << 30
    assert stats["metadata_bytes"] > 0
    [user] = stats["users"]  # the mount, with its own counters from its status socket
    assert user["pid"] == mount.proc.pid and user["mountpoint"] == str(mount.path)
    assert user["budget"] == 10 << 30
    assert user["misses"] >= len(files) and user["hits"] >= len(files)

    # The same directory through the environment, the default budget, for people.
    text = cache_cli(mounter, "stats", env={"FSMOUNT_CACHE_DIR": str(cache)})
    assert text.returncode == 0, text.stderr
    assert f"pid {mount.proc.pid}" in text.stdout
    assert f"{len(files):,} (" in text.stdout and "10.0 GiB" in text.stdout
    assert re.search(r"[\d,]+ hits, [\d,]+ misses \(\d+\.\d%\)", text.stdout), text.stdout


def test_cache_clear_is_refused_while_mounted_unless_forced(
    mounter: Mounter, services, tmp_path
) -> None:
    cache = tmp_path / "cache"
    files = stored_files(services)
    args = ("--archive", MEDICAL)
    mount = mounter.start(*args, scenario=False, cache_dir=cache)
    check_tree(medical(mount), files)
    assert mount.stop() == 0
    done = cache_cli(mounter, "clear", "--cache-dir", str(cache))
    assert done.returncode == 0, done.stderr
    assert f"removed {len(files)} blocks" in done.stdout
    assert block_files(cache) == []

    mount = mounter.start(*args, scenario=False, cache_dir=cache)
    services.gc.log.reset()
    check_tree(medical(mount), files)
    assert len(storage_ranges(services)) == len(files)  # cleared: everything fetched again
    refused = cache_cli(mounter, "clear", "--cache-dir", str(cache))
    assert refused.returncode == 1
    [line] = error_lines(refused)
    assert "in use" in line and str(mount.proc.pid) in line and "--force" in line
    assert len(block_files(cache)) == len(files)

    forced = cache_cli(mounter, "clear", "--force", "--cache-dir", str(cache))
    assert forced.returncode == 0, forced.stderr
    assert block_files(cache) == []
    check_tree(medical(mount), files, direct=True)  # the mount still reads correctly


def test_cache_prefetch_fills_the_cache_so_reading_needs_no_storage(
    mounter: Mounter, services, tmp_path
) -> None:
    cache = tmp_path / "cache"
    args = ("--archive", MEDICAL, "--archive", "demo-private")
    mount = mounter.start(*args, scenario=False, cache_dir=cache)
    archives = [mount.path / "grand-challenge" / slug for slug in (MEDICAL, "demo-private")]
    expected = {
        slug: {p: e.bytes() for p, e in services.gc.expected_archive(slug).items()}
        for slug in (MEDICAL, "demo-private")
    }
    result = cache_cli(mounter, "prefetch", "--jobs", "3", *map(str, archives))
    assert result.returncode == 0, result.stderr
    count = sum(map(len, expected.values()))
    assert f"prefetched {count} of {count} files" in result.stdout
    assert mount.stop() == 0

    mount = mounter.start(*args, scenario=False, cache_dir=cache)
    with no_new_requests(services.gc.log, "storage", "media"):
        for slug, files in expected.items():
            check_tree(mount.path / "grand-challenge" / slug, files)


def test_cache_prefetch_reports_bad_paths_and_failed_files(
    mounter: Mounter, services, tmp_path
) -> None:
    outside = cache_cli(mounter, "prefetch", str(tmp_path))
    assert outside.returncode == 2
    assert error_lines(outside) == [f"fsmount: {tmp_path} is not on an fsmount mount"]

    mount = mounter.start("--timeout", "2", "--archive", MEDICAL, scenario=False)
    mount.expect_logs(r"read: .*storage HTTP 503")  # the prefetch during the outage
    root = medical(mount)
    files = stored_files(services)
    stored = root / max(files, key=lambda p: len(files[p]))
    value = next(root.glob("*/results.json"))  # an inline value: no storage needed
    os.stat(stored)  # sizes known while storage is healthy
    os.stat(value)
    services.gc.storage_faults.configure(outage=True)
    try:
        result = cache_cli(mounter, "prefetch", str(stored), str(value))
    finally:
        services.gc.reset_faults()
    assert result.returncode == 1
    [line] = error_lines(result)
    assert line.startswith(f"fsmount: cannot prefetch {stored}: "), line
    assert "prefetched 1 of 2 files" in result.stdout

    elsewhere = cache_cli(mounter, "prefetch", "--cache-dir", str(tmp_path / "other"), str(value))
    assert elsewhere.returncode == 0, elsewhere.stderr
    [warning] = error_lines(elsewhere)
    assert f"the mount at {mount.path} does not use {tmp_path / 'other'}" in warning
