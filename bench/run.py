"""`make bench`: fsmount side by side with curl, a local file and rclone, in one run.

One loopback server (bench_server.py) serves the same generated files to everyone: fsmount
mounts them as a Grand Challenge archive, rclone through its http backend with
`--vfs-cache-mode full`, curl downloads them directly (the network's limit, which on loopback
is the server's). Every phase starts from an empty cache unless it measures the cache, so a
figure never depends on the phase before it. The table and the targets of issue 4 go to
bench/results.md (see bench/README.md for what each figure means).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

from bench_server import (
    BIG_NAME,
    GIB,
    HUGE_NAME,
    MANY_COUNT,
    MANY_DIR,
    BenchServer,
    TrafficDelta,
    Wan,
)
from mounts import FileSystem, Fsmount, Mount, Rclone, mounted
from report import Figure, Report, Target, format_value, render
from rich.console import Console

from fsmount.cache.blocks import BlockStore

HERE = Path(__file__).resolve().parent
MIB = 1 << 20
RANDOM_READS = 200
RANDOM_SIZE = 4096
RANDOM_SEED = 4_096_200
DISK_NEEDED = 9 * GIB  # the largest phase holds a 5 GiB cache plus the local 1 GiB copy
CURL_RUNS = 3
TTFB_RUNS = 5
PAGE_RUNS = 3
# A far object store, for the rows after the loopback ones: what parallel ranged readahead is
# for, and what the loopback rows (CPU-bound on 2 shared cores) cannot show.
WAN = Wan(latency=0.020, rate=64 * (1 << 20))

console = Console(highlight=False)


def _block_size() -> int:
    """The block size fsmount's cache uses: BlockStore's default (mount.py passes none)."""
    return int(inspect.signature(BlockStore).parameters["block_size"].default)


BLOCK_SIZE = _block_size()


# -- figures --------------------------------------------------------------------------------

SEQ_COLD = Figure("Cold sequential read, 1 GiB", "MiB/s", higher_is_better=True)
SEQ_CPU = Figure("CPU time of the mount process during that cold read", "s", False)
SEQ_DISK = Figure("Second read after remount, page cache dropped (disk-cache hit)", "MiB/s", True)
SEQ_PAGE = Figure("Third read, same mount (page cache)", "MiB/s", higher_is_better=True)
TTFB = Figure("Time to first byte (open + 1-byte read)", "ms", higher_is_better=False)
RANDOM_TIME = Figure(f"{RANDOM_READS} random 4 KiB reads, 1 GiB file: time", "s", False)
RANDOM_BYTES = Figure(f"{RANDOM_READS} random 4 KiB reads: bytes fetched", "MiB", False)
LS_COLD = Figure(f"`ls -l` of {MANY_COUNT:,} files, first", "s", higher_is_better=False)
DU_COLD = Figure(f"`du -s` of {MANY_COUNT:,} files, after that `ls -l`", "s", False)
LS_REMOUNT = Figure(f"`ls -l` of {MANY_COUNT:,} files after a remount", "s", False)
DU_REMOUNT = Figure(f"`du -s` of {MANY_COUNT:,} files after a remount", "s", False)
HUGE_SPEED = Figure("Cold sequential read, 5 GiB", "MiB/s", higher_is_better=True)
HUGE_MEMORY = Figure("Peak memory of the mount reading 5 GiB (VmHWM)", "MB", False)
WAN_SEQ = Figure(f"Cold sequential read, 1 GiB, emulated WAN ({WAN.describe()})", "MiB/s", True)
WAN_RANDOM = Figure(f"{RANDOM_READS} random 4 KiB reads, emulated WAN: time", "s", False)
FIGURES = [
    SEQ_COLD,
    SEQ_CPU,
    SEQ_DISK,
    SEQ_PAGE,
    TTFB,
    RANDOM_TIME,
    RANDOM_BYTES,
    LS_COLD,
    DU_COLD,
    LS_REMOUNT,
    DU_REMOUNT,
    HUGE_SPEED,
    HUGE_MEMORY,
    WAN_SEQ,
    WAN_RANDOM,
]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process (all its threads) has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mib_per_s(size: int, seconds: float) -> float:
    return size / MIB / seconds


def traffic_note(delta: TrafficDelta) -> str:
    """What the server served, e.g. "1,024 requests, 1,024.0 MiB"."""
    return f"{delta.total_requests:,} req, {delta.total_bytes / MIB:,.1f} MiB"


# -- how things are read --------------------------------------------------------------------


class MeasurementFailed(Exception):
    """A measured operation failed (a command's exit status, or an OSError such as EIO)."""

    def __init__(self, seconds: float, reason: str) -> None:
        super().__init__(reason)
        self.seconds = seconds
        self.reason = reason


def timed(cmd: list[str]) -> float:
    """Seconds `cmd` took; MeasurementFailed with its last line of stderr if it failed."""
    start = time.perf_counter()
    result = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode:
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        raise MeasurementFailed(elapsed, f"`{cmd[0]}`: {lines[-1].rsplit(': ', 1)[-1]}")
    return elapsed


def sequential_read(path: Path) -> float:
    """Seconds for `dd` to read the whole file in 1 MiB requests (an ordinary reader)."""
    return timed(["dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none"])


def first_byte(path: Path) -> float:
    """Seconds to open the file and get its first byte."""
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.read(fd, 1)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - start
    if len(data) != 1:
        raise RuntimeError(f"{path}: no first byte")
    return elapsed


def random_offsets(size: int) -> list[int]:
    """The same 4 KiB-aligned offsets for every system (a fixed seed)."""
    pages = random.Random(RANDOM_SEED).sample(range(size // RANDOM_SIZE), RANDOM_READS)
    return [page * RANDOM_SIZE for page in pages]


def random_reads(path: Path, offsets: list[int], expected: Callable[[int, int], bytes]) -> float:
    """Seconds for the `pread`s; the bytes are checked afterwards, outside the timing."""
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        got = [os.pread(fd, RANDOM_SIZE, offset) for offset in offsets]
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
    for offset, data in zip(offsets, got, strict=True):
        if data != expected(offset, RANDOM_SIZE):
            raise RuntimeError(f"{path}: wrong bytes at offset {offset}")
    return elapsed


def drop_page_cache(*trees: Path) -> str:
    """Empty the page cache (all of it as root, else the files under `trees`); returns how."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as control:
            control.write("3\n")
        return "`echo 3 > /proc/sys/vm/drop_caches` (after `sync`)"
    except OSError:
        for tree in trees:
            for directory, _, names in os.walk(tree):
                for name in names:
                    with contextlib.suppress(OSError):
                        fd = os.open(os.path.join(directory, name), os.O_RDONLY)
                        try:
                            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                        finally:
                            os.close(fd)
        return "`posix_fadvise(DONTNEED)` on every cache file (not root: no drop_caches)"


# -- the phases -----------------------------------------------------------------------------


class Bench:
    """One run: the server, a scratch directory, the systems, and the figures they fill."""

    def __init__(self, server: BenchServer, work: Path, systems: list[FileSystem]) -> None:
        self.server = server
        self.work = work
        self.systems = systems
        self.drop_method = ""
        self.notes: list[str] = []
        self.failures: list[str] = []

    @contextlib.contextmanager
    def fresh_cache(self, system: FileSystem, phase: str) -> Iterator[Path]:
        """An empty cache directory for one phase, deleted after it (disk space is finite)."""
        cache = self.work / "cache" / f"{system.name}-{phase}"
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        try:
            yield cache
        finally:
            shutil.rmtree(cache, ignore_errors=True)

    def step(self, text: str) -> None:
        console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {text}")

    def record(self, figure: Figure, column: str, value: float, note: str = "") -> None:
        figure.values[column] = value
        if note:
            figure.notes[column] = note
        self.step(
            f"  {column}: {figure.label}: [bold]{format_value(value, figure.unit)}[/bold]"
            + (f" ({note})" if note else "")
        )

    @contextlib.contextmanager
    def failure_noted(self, figure: Figure, column: str) -> Iterator[None]:
        """A failed measurement becomes the figure's note (and fails its target) instead of
        ending the run: a mount that errors under load is a result too."""
        start = time.perf_counter()
        try:
            yield
        except (MeasurementFailed, OSError) as exc:
            if isinstance(exc, MeasurementFailed):
                seconds, reason = exc.seconds, exc.reason
            else:
                seconds, reason = time.perf_counter() - start, f"{exc.strerror or exc}"
            text = f"failed after {seconds:.0f} s: {reason}"
            figure.notes[column] = f"**{text}**"
            self.failures.append(f"{column}, {figure.label}: {text}")
            self.step(f"  [red]{column}: {figure.label}: {text}[/red]")

    # -- references: curl and a local file

    def curl(self) -> None:
        self.step("curl (the server's limit)")
        url = self.server.plain_url(BIG_NAME)
        seconds = statistics.median(_curl_whole_file(url) for _ in range(CURL_RUNS))
        self.record(SEQ_COLD, "curl", mib_per_s(GIB, seconds), f"median of {CURL_RUNS}")
        firsts = [
            float(_curl(["-o", "/dev/null", "-r", "0-0", "-w", "%{time_starttransfer}", url]))
            for _ in range(TTFB_RUNS)
        ]
        self.record(TTFB, "curl", statistics.median(firsts) * 1000, f"median of {TTFB_RUNS}")
        measure = self.server.measure()
        self.record(RANDOM_TIME, "curl", _curl_random_reads(url), "one connection")
        delta = measure()
        self.record(RANDOM_BYTES, "curl", delta.total_bytes / MIB, traffic_note(delta))

    def local_file(self) -> None:
        """A local copy of the 1 GiB file on the cache disk: what "local" speed means here."""
        self.step("local file (the same 1 GiB on the cache disk)")
        path = self.work / "local-1gib.bin"
        payload = self.server.big.stored.payload
        with open(path, "wb") as out:
            for offset in range(0, payload.size, 8 * MIB):
                out.write(payload.read(offset, 8 * MIB))
            out.flush()
            os.fsync(out.fileno())
        try:
            self.drop_method = drop_page_cache(path.parent)
            self.record(SEQ_DISK, "local file", mib_per_s(GIB, sequential_read(path)), "from disk")
            self.page_cache_reads(path, "local file")
        finally:
            path.unlink()

    def page_cache_reads(self, path: Path, column: str) -> None:
        """The median of three more reads of a file just read: a page-cache hit where the
        system keeps its pages. One read takes a fifth of a second, so a single one is at the
        mercy of whatever else the machine does in that instant."""
        measure = self.server.measure()
        speeds = sorted(mib_per_s(GIB, sequential_read(path)) for _ in range(PAGE_RUNS))
        note = f"median of {', '.join(f'{s:,.0f}' for s in speeds)}"
        if column in ("fsmount", "rclone"):
            note += f"; {traffic_note(measure())}"
        self.record(SEQ_PAGE, column, statistics.median(speeds), note)

    # -- the mounts

    def sequential(self, system: FileSystem) -> None:
        self.step(f"{system.name}: sequential reads of 1 GiB")
        with self.fresh_cache(system, "seq") as cache:
            with mounted(system, cache, "seq-cold") as mount:
                path = self._stat(mount, BIG_NAME)
                drop_page_cache(cache)
                measure = self.server.measure()
                before = cpu_seconds(mount.pid), cpu_seconds(os.getpid())
                with self.failure_noted(SEQ_COLD, system.name):
                    seconds = sequential_read(path)
                    note = traffic_note(measure())
                    self.record(SEQ_COLD, system.name, mib_per_s(GIB, seconds), note)
                    server = cpu_seconds(os.getpid()) - before[1]
                    self.record(
                        SEQ_CPU,
                        system.name,
                        cpu_seconds(mount.pid) - before[0],
                        f"{seconds:.2f} s wall; server {server:.2f} s CPU",
                    )
            drop_page_cache(cache)
            with mounted(system, cache, "seq-remount") as mount:
                path = self._stat(mount, BIG_NAME)
                measure = self.server.measure()
                with self.failure_noted(SEQ_DISK, system.name):
                    seconds = sequential_read(path)
                    note = traffic_note(measure())
                    self.record(SEQ_DISK, system.name, mib_per_s(GIB, seconds), note)
                with self.failure_noted(SEQ_PAGE, system.name):
                    self.page_cache_reads(path, system.name)

    @contextlib.contextmanager
    def cold(
        self, system: FileSystem, phase: str, figure: Figure
    ) -> Iterator[tuple[Path, Callable[[], TrafficDelta]]]:
        """The 1 GiB file on a fresh mount over an empty cache, already looked up, and the
        server's counter started; a failure inside becomes the figure's note."""
        with self.fresh_cache(system, phase) as cache, mounted(system, cache, phase) as mount:
            path = self._stat(mount, BIG_NAME)
            measure = self.server.measure()
            with self.failure_noted(figure, system.name):
                yield path, measure

    def first_byte(self, system: FileSystem) -> None:
        self.step(f"{system.name}: time to first byte")
        with self.cold(system, "ttfb", TTFB) as (path, measure):
            seconds = first_byte(path)
            self.record(TTFB, system.name, seconds * 1000, traffic_note(measure()))

    def random(self, system: FileSystem) -> None:
        self.step(f"{system.name}: {RANDOM_READS} random 4 KiB reads")
        payload = self.server.big.stored.payload
        with self.cold(system, "random", RANDOM_TIME) as (path, measure):
            seconds = random_reads(path, random_offsets(GIB), payload.read)
            delta = measure()
            self.record(RANDOM_TIME, system.name, seconds)
            note = traffic_note(delta)
            self.record(RANDOM_BYTES, system.name, delta.total_bytes / MIB, note)

    def listing(self, system: FileSystem) -> None:
        self.step(f"{system.name}: `ls -l` and `du -s` of {MANY_COUNT:,} files")
        with self.fresh_cache(system, "list") as cache:
            for label, ls_figure, du_figure in (
                ("list-cold", LS_COLD, DU_COLD),
                ("list-remount", LS_REMOUNT, DU_REMOUNT),
            ):
                with mounted(system, cache, label) as mount:
                    directory = mount.path(MANY_DIR)
                    for command, figure in (("ls", ls_figure), ("du", du_figure)):
                        flags = "-l" if command == "ls" else "-s"
                        measure = self.server.measure()
                        with self.failure_noted(figure, system.name):
                            seconds = timed([command, flags, str(directory)])
                            self.record(figure, system.name, seconds, traffic_note(measure()))
                    with self.failure_noted(ls_figure, system.name):
                        count = len(os.listdir(directory))
                        if count != MANY_COUNT:
                            raise MeasurementFailed(0, f"{count} of {MANY_COUNT} files listed")

    def memory(self, system: FileSystem) -> None:
        self.step(f"{system.name}: reading 5 GiB (speed and peak memory)")
        with self.fresh_cache(system, "huge") as cache, mounted(system, cache, "huge") as mount:
            path = self._stat(mount, HUGE_NAME)
            before = mount.memory()
            measure = self.server.measure()
            with self.failure_noted(HUGE_SPEED, system.name):
                seconds = sequential_read(path)
                note = traffic_note(measure())
                self.record(HUGE_SPEED, system.name, mib_per_s(5 * GIB, seconds), note)
                note = f"{before / 1e6:,.0f} MB before reading"
                self.record(HUGE_MEMORY, system.name, mount.peak_memory() / 1e6, note)

    def _stat(self, mount: Mount, name: str) -> Path:
        """Look the file up first, so reads measure reading, not the directory listing."""
        path = mount.path(name)
        size = path.stat().st_size
        expected = {BIG_NAME: GIB, HUGE_NAME: 5 * GIB}[name]
        if size != expected:
            raise RuntimeError(f"{path}: size {size}, expected {expected}")
        return path

    # -- over an emulated wide-area link

    def wan_curl(self) -> None:
        self.step(f"curl over the emulated WAN ({WAN.describe()})")
        url = self.server.plain_url(BIG_NAME)
        self.record(WAN_SEQ, "curl", mib_per_s(GIB, _curl_whole_file(url)), "one GET")
        self.record(WAN_RANDOM, "curl", _curl_random_reads(url), "one connection")

    def wan(self, system: FileSystem) -> None:
        self.step(f"{system.name}: cold sequential and random reads over the emulated WAN")
        payload = self.server.big.stored.payload
        with self.cold(system, "wan-seq", WAN_SEQ) as (path, measure):
            seconds = sequential_read(path)
            self.record(WAN_SEQ, system.name, mib_per_s(GIB, seconds), traffic_note(measure()))
        with self.cold(system, "wan-random", WAN_RANDOM) as (path, measure):
            seconds = random_reads(path, random_offsets(GIB), payload.read)
            self.record(WAN_RANDOM, system.name, seconds, traffic_note(measure()))

    def run(self) -> None:
        self.curl()
        self.local_file()
        phases = [self.sequential, self.first_byte, self.random, self.listing, self.memory]
        for phase in phases:  # systems side by side within each phase, not one after the other
            for system in self.systems:
                phase(system)
        self.server.wan = WAN
        try:
            self.wan_curl()
            for system in self.systems:
                self.wan(system)
        finally:
            self.server.wan = None


def _curl_whole_file(url: str) -> float:
    """Seconds of one GET of the 1 GiB file to /dev/null."""
    out = _curl(["-o", "/dev/null", "-w", "%{time_total} %{size_download}", url])
    seconds, size = out.split()
    if int(size) != GIB:
        raise RuntimeError(f"curl got {size} bytes of {url}")
    return float(seconds)


def _curl_random_reads(url: str) -> float:
    """Seconds of the random reads as range GETs on one connection (no client overhead)."""
    args: list[str] = []
    for offset in random_offsets(GIB):
        args += ["-o", "/dev/null", "-r", f"{offset}-{offset + RANDOM_SIZE - 1}"]
        args += ["-w", "%{time_total}\\n", url, "--next", "-s"]
    return sum(float(line) for line in _curl(args[:-2]).split())


def _curl(args: list[str]) -> str:
    return subprocess.run(
        ["curl", "-s", "--fail", *args], check=True, capture_output=True, text=True
    ).stdout


# -- the report -----------------------------------------------------------------------------


def targets(rclone_ran: bool, duration: float) -> list[Target]:
    """Issue 4's targets, judged on this run's figures."""

    def versus(figure: Figure, other: str, goal: float, text: str) -> Target:
        ratio = figure.advantage(other)
        if "fsmount" not in figure.values and "fsmount" in figure.notes:
            return Target(text, f"fsmount {figure.notes['fsmount']}", False)
        if ratio is None:
            return Target(text, f"{other} not measured", None)
        mine = format_value(figure.values["fsmount"], figure.unit)
        theirs = format_value(figure.values[other], figure.unit)
        return Target(text, f"{ratio:.2f}x ({mine} vs {theirs})", ratio >= goal)

    random_bytes = RANDOM_BYTES.values.get("fsmount")
    peak = HUGE_MEMORY.values.get("fsmount")
    result = [
        versus(SEQ_COLD, "rclone", 1.5, "Cold sequential read ≥ 1.5x rclone's"),
        versus(SEQ_DISK, "rclone", 2.0, "Disk-cache hit ≥ 2x rclone's"),
        versus(SEQ_PAGE, "local file", 0.5, "Page-cache hit ≥ 0.5x a local file's"),
        Target(
            f"Random 4 KiB reads fetch at most one block ({BLOCK_SIZE // MIB} MiB) each",
            "not measured"
            if random_bytes is None
            else f"{random_bytes / RANDOM_READS:.2f} MiB per read on average"
            f" ({random_bytes:,.1f} MiB for {RANDOM_READS})",
            None if random_bytes is None else random_bytes * MIB <= RANDOM_READS * BLOCK_SIZE,
        ),
        Target(
            "Peak memory reading 5 GiB < 200 MB",
            "not measured" if peak is None else f"{peak:,.0f} MB",
            None if peak is None else peak < 200,
        ),
        Target("The benchmark runs in < 10 min", f"{duration / 60:.1f} min", duration < 600),
    ]
    if not rclone_ran:
        result.append(Target("rclone comparison", "rclone was not run", None))
    return result


def machine() -> list[str]:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        cpu = next((line.split(":", 1)[1].strip() for line in info if "model name" in line), cpu)
    with open("/proc/meminfo") as info:
        mem_kib = int(info.readline().split()[1])
    return [
        f"CPU: {cpu}, {os.cpu_count()} cores; RAM {mem_kib / 2**20:.0f} GiB",
        f"Kernel: {platform.system()} {platform.release()}; {_os_name()}",
    ]


def _os_name() -> str:
    with contextlib.suppress(OSError):
        return platform.freedesktop_os_release().get("PRETTY_NAME", "")
    return ""


def versions(systems: list[FileSystem]) -> list[str]:
    packages = ", ".join(
        f"{name} {metadata.version(name)}" for name in ("pyfuse3", "trio", "httpx", "hypercorn")
    )
    curl = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout
    return [
        f"Python {platform.python_version()}; {packages}",
        *(system.version() for system in systems),
        " ".join(curl.split()[:2]) if curl else "curl: unknown",
    ]


def method(work: Path, drop: str, rclone_ran: bool) -> list[str]:
    disk = (
        subprocess.run(["df", "--output=source,fstype", str(work)], capture_output=True, text=True)
        .stdout.splitlines()[-1]
        .split()
    )
    lines = [
        "One loopback HTTP server (hypercorn, in the benchmark's process) serves generated"
        " files: a 1 GiB file, a 5 GiB file and a directory of 10,000 files of 0.5-8 KiB."
        " fsmount mounts them through the fake Grand Challenge API (`/media/` redirect to signed"
        " storage URLs); rclone and curl read the same objects under `/plain/`.",
        "curl: a whole-file GET to /dev/null (median of 3), TTFB = `time_starttransfer` of a"
        " 1-byte range GET (median of 5), random reads = 200 range GETs on one connection.",
        "Sequential reads: `dd bs=1M` to /dev/null, after a `stat` of the file (the listing is"
        " not timed). Cold = empty cache, fresh mount. Disk-cache hit = unmount, drop the page"
        f" cache with {drop}, mount again over the same cache. Third read = the median of three"
        " more reads on that mount (for the local file: of three reads after it was read once).",
        "CPU time: user + system seconds of the mount process (all threads) from"
        " `/proc/<pid>/stat` over the cold read; the note gives the benchmark process's own"
        " (almost all of it the loopback server's) over the same read. On 2 cores, the mount,"
        " the server and `dd` share 2 CPU-seconds per second of wall time.",
        "Time to first byte: fresh mount, empty cache, `stat` done, then `open` + `read(1)`.",
        f"Random reads: fresh mount, empty cache, {RANDOM_READS} `pread`s of 4 KiB at"
        " 4 KiB-aligned offsets (fixed seed) in the 1 GiB file, checked against the source;"
        " bytes fetched = response-body bytes the server sent meanwhile.",
        "Listing: fresh mount with an empty cache, `ls -l`, then `du -s` on the same mount; then"
        " unmount, mount again over the same cache, and the same two commands.",
        "Memory: fresh mount, empty cache, `dd` of the 5 GiB file, then `VmHWM` (peak resident"
        " set since start) of the mount's process from `/proc/<pid>/status`.",
        f"Caches and the local copy live in a scratch directory on {disk[0]} ({disk[1]});"
        " every phase except the remounts starts from an empty cache. Each mount runs with its"
        " defaults:"
        " fsmount `--cache-size 10G`, rclone only `--vfs-cache-mode full --read-only`.",
        "rclone reopens files without the kernel's page cache (no `keep_cache`), so its third"
        " read goes through its VFS cache again; fsmount's is served by the kernel alone (no"
        " request reaches the mount).",
        f"Emulated WAN (the last two rows): the same server, with every response held back to"
        f" {WAN.describe()} (the server paces each body; loopback, CPU and disk unchanged)."
        " Fresh mounts, empty caches; the same reads as above. The targets are judged on the"
        " loopback rows only.",
        "Single runs (except curl and the page-cache reads). On this shared 2-core machine the"
        " same figure moved by up to a third between runs, rclone's as much as fsmount's.",
    ]
    if not rclone_ran:
        lines.append("rclone was not run (not installed, or `--no-rclone`): its column is empty.")
    return lines


# -- main -----------------------------------------------------------------------------------


def load_note(before: tuple[float, float, float], after: tuple[float, float, float]) -> str:
    """The machine's load around the run: other work on a 2-core machine moves the figures."""
    cores = os.cpu_count() or 1
    text = (
        f"Load average (1 min) {before[0]:.1f} at the start and {after[0]:.1f} at the end,"
        f" on {cores} cores"
    )
    if max(before[0], after[0]) > cores / 2:
        text += ": other work shared the machine with this run, so treat small differences as noise"
    return text + "."


def reclaim_note() -> str | None:
    """Say so when the kernel pages out idle file pages on its own (DAMON `pageout`, as some
    VMs do to hand memory back to the host): page-cache figures then depend on its timing."""
    with contextlib.suppress(OSError, ValueError):
        for state in Path("/sys/kernel/mm/damon/admin/kdamonds").glob("*/state"):
            if state.read_text().strip() != "on":
                continue
            for context in state.parent.glob("contexts/[0-9]*"):
                aggregation = int((context / "monitoring_attrs/intervals/aggr_us").read_text())
                for scheme in context.glob("schemes/[0-9]*"):
                    if (scheme / "action").read_text().strip() != "pageout":
                        continue
                    age = int((scheme / "access_pattern/age/min").read_text())
                    return (
                        "This kernel runs DAMON proactive reclaim: it pages out file pages idle"
                        f" for {age * aggregation / 1e6:.0f} s or more, judged on coarse"
                        " regions, so pages can leave the page cache between two reads. The"
                        " page-cache figures (local file included) are the least stable here."
                    )
    return None


def check_prerequisites(work: Path) -> None:
    missing = [tool for tool in ("fusermount3", "curl", "dd", "du") if not shutil.which(tool)]
    if missing:
        sys.exit(f"bench: missing tools: {', '.join(missing)}")
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        sys.exit(f"bench: /dev/fuse cannot be opened: {exc}")
    free = shutil.disk_usage(work).free
    if free < DISK_NEEDED:
        sys.exit(f"bench: {work} has {free / GIB:.1f} GiB free, the benchmark needs 9 GiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=HERE / "results.md")
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a temp dir)")
    parser.add_argument("--no-rclone", action="store_true", help="skip rclone even if installed")
    args = parser.parse_args(argv)

    started = datetime.datetime.now().astimezone()
    clock = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="fsmount-bench-", dir=args.workdir))
    try:
        check_prerequisites(work)
        with BenchServer() as server:
            systems: list[FileSystem] = [Fsmount(server, work)]
            if not args.no_rclone and Rclone.available():
                systems.append(Rclone(server, work))
            else:
                console.print("[yellow]rclone is not run: its column stays empty[/yellow]")
            bench = Bench(server, work, systems)
            load_before = os.getloadavg()
            tested = versions(systems)  # before running: the tree may change meanwhile
            bench.run()
            bench.notes.append(load_note(load_before, os.getloadavg()))
            bench.notes += [f"Failed: {failure}." for failure in bench.failures]
            if (reclaim := reclaim_note()) is not None:
                bench.notes.append(reclaim)
            rclone_ran = len(systems) > 1
            duration = time.monotonic() - clock
            report = Report(
                command="make bench",
                started=started.strftime("%Y-%m-%d %H:%M %Z"),
                duration=duration,
                machine=machine(),
                versions=tested,
                method=method(work, bench.drop_method, rclone_ran),
                figures=FIGURES,
                targets=targets(rclone_ran, duration),
                notes=bench.notes,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = render(report)
    args.output.write_text(text)
    console.print(text)
    console.print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
