"""Scale benchmark: walking a 100,000-item archive on a distant service (issue 11).

    .venv/bin/python bench/scale.py [--items N] [--latency S] [--output PATH]

The demo's fake Grand Challenge serves, in this process, one archive of N items (each a
Value, two Files and an Image), with every API and storage response held back `--latency`
seconds (50 ms by default: a service across a continent). fsmount mounts it with an empty
cache, and each figure is timed with the requests the fake counted meanwhile:

- `ls ARCHIVE`, then `find ARCHIVE -name '*.mha'` (the walk: names only);
- `ls -l` of one item directory, `du -sb` of 1,000 items (sizes: probes, ahead of the reader);
- after a remount over the same cache, `ls` and `find` again;
- the mount's peak resident memory (VmHWM) on each mount;
- the same `find` on `floorfs.py`, a pyfuse3 filesystem of the same shape that answers from
  memory and does nothing else: the floor any pyfuse3 filesystem stands on here.

It writes `bench/scale-results.md` (commit it).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mounts import REPO, FileSystem, Mount, mounted

from fsmount.demo.gc_samples import scale_archive
from fsmount.demo.grand_challenge import GrandChallengeFake

SLUG = "scale"
FILE_KINDS = ("item", "image", "media", "storage")  # requests for one item or file
WALK_TARGET = 60.0  # seconds
MEMORY_TARGET = 300 << 20  # bytes


class ScaleMount(FileSystem):
    """`fsmount mount --archive scale` against the in-process fake."""

    name = "fsmount"

    def __init__(self, fake: GrandChallengeFake, work: Path) -> None:
        self.fake = fake
        self.work = work
        self._token = work / "gc-token"
        self._token.write_text(fake.token + "\n")
        self._token.chmod(0o600)
        self._config = work / "fsmount.toml"
        self._config.write_text("")

    def command(self, point: Path, cache: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "fsmount",
            "mount",
            "--foreground",
            str(point),
            "--config",
            str(self._config),
            "--cache-dir",
            str(cache),
            "--grand-challenge-url",
            self.fake.api_url,
            "--grand-challenge-token-file",
            str(self._token),
            "--archive",
            SLUG,
            "--log-level",
            "warning",
        ]

    def relative_path(self, name: str) -> str:
        return f"grand-challenge/{SLUG}/{name}".rstrip("/")

    def version(self) -> str:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        )
        return f"fsmount at {commit.stdout.strip()}"


@dataclass
class Figure:
    what: str
    seconds: float
    requests: dict[str, int]
    note: str = ""

    def requests_text(self) -> str:
        total = sum(self.requests.values())
        parts = ", ".join(f"{kind} {n:,}" for kind, n in sorted(self.requests.items()))
        return f"{total:,} ({parts})" if parts else "0"


@dataclass
class Run:
    items: int
    latency: float
    figures: list[Figure] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    rss_after_walk: int = 0


@contextmanager
def counted(fake: GrandChallengeFake, run: Run, what: str) -> Iterator[Figure]:
    fake.log.reset()
    figure = Figure(what, 0.0, {})
    started = time.monotonic()
    yield figure
    figure.seconds = time.monotonic() - started
    figure.requests = fake.log.counts()
    run.figures.append(figure)
    print(f"{what}: {figure.seconds:.2f} s, requests {figure.requests_text()}", flush=True)


def shell(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=3600).stdout


def first_mount(fake: GrandChallengeFake, system: ScaleMount, cache: Path, run: Run) -> None:
    with mounted(system, cache, "first") as mount:
        root = mount.point / system.relative_path("")
        with counted(fake, run, "`ls ARCHIVE`") as figure:
            names = shell(["ls", str(root)]).split()
            figure.note = f"{len(names):,} items"
        walk(fake, mount, root, run, "`find ARCHIVE -name '*.mha'`")
        run.rss_after_walk = mount.memory()
        one = root / names[0]
        with counted(fake, run, "`ls -l` of one item") as figure:
            shell(["ls", "-l", str(one)])
            figure.note = "its stored files' sizes probed"
        batch = [str(root / name) for name in names[1:1001]]
        with counted(fake, run, "`du -sb` of 1,000 items") as figure:
            total = sum(int(line.split()[0]) for line in shell(["du", "-sb", *batch]).splitlines())
            figure.note = f"{total:,} bytes"
        run.peaks.append(mount.peak_memory())


def walk(fake: GrandChallengeFake, mount: Mount, root: Path, run: Run, what: str) -> None:
    with counted(fake, run, what) as figure:
        found = shell(["find", str(root), "-name", "*.mha"]).splitlines()
        figure.note = f"{len(found):,} files found"
    if len(found) != run.items:
        raise AssertionError(f"the walk found {len(found)} images, not {run.items}")


def second_mount(fake: GrandChallengeFake, system: ScaleMount, cache: Path, run: Run) -> None:
    with mounted(system, cache, "remount") as mount:
        root = mount.point / system.relative_path("")
        with counted(fake, run, "`ls ARCHIVE` after a remount") as figure:
            figure.note = f"{len(shell(['ls', str(root)]).split()):,} items"
        walk(fake, mount, root, run, "`find ARCHIVE -name '*.mha'` after a remount")
        run.peaks.append(mount.peak_memory())


def floor_walk(run: Run, work: Path) -> None:
    """The same `find` on `floorfs.py`: what pyfuse3, trio and the kernel cost alone."""
    point = work / "floor"
    point.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("floorfs.py")), str(point), str(run.items)]
    )
    try:
        deadline = time.monotonic() + 60
        while not os.path.ismount(point):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("floorfs did not mount")
            time.sleep(0.05)
        started = time.monotonic()
        found = shell(["find", str(point), "-name", "*.mha"]).splitlines()
        figure = Figure("`find -name '*.mha'` on floorfs (the pyfuse3 floor)", 0.0, {})
        figure.seconds = time.monotonic() - started
        figure.note = f"{len(found):,} files found; no request, nothing but answers from memory"
        run.figures.append(figure)
        print(f"{figure.what}: {figure.seconds:.2f} s", flush=True)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(point)], check=False)
        proc.wait(timeout=30)


def report(run: Run, system: ScaleMount, took: float) -> str:
    by_what = {f.what: f for f in run.figures}
    walk_figure = by_what["`find ARCHIVE -name '*.mha'`"]
    again = by_what["`find ARCHIVE -name '*.mha'` after a remount"]
    floor = next(f for f in run.figures if "floorfs" in f.what)
    per_file = {k: walk_figure.requests.get(k, 0) + again.requests.get(k, 0) for k in FILE_KINDS}
    peak = max(run.peaks)
    no_slower = again.seconds <= walk_figure.seconds * 1.1  # 10%: one run's noise here
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# fsmount scale benchmark results",
        "",
        f"Produced by `.venv/bin/python bench/scale.py` on {now}; the run took "
        f"{took / 60:.1f} min. Rerun it to replace this file.",
        "",
        "## Setup",
        "",
        f"- {system.version()}; Python {platform.python_version()}; "
        f"{os.cpu_count()} CPUs; kernel {platform.release()}.",
        f"- One archive of {run.items:,} items on the demo's fake Grand Challenge (in the "
        "benchmark's process), each item a Value, two Files (CSV, PDF) and an Image (MetaImage): "
        f"{run.items * 4:,} files, {run.items * 4:,} directories.",
        f"- Every API, `/media/` and storage response is held back {run.latency * 1000:.0f} ms.",
        "- Empty cache for the first mount; the remount reuses it. Requests are counted by the "
        "fake, by kind: `items`/`images` are listing pages (1,000 records each), `item`, "
        "`image`, `media` and `storage` are requests for one item, image or file.",
        "",
        "## Results",
        "",
        "| Figure | Time | Requests | Note |",
        "|---|---|---|---|",
    ]
    for f in run.figures:
        lines.append(f"| {f.what} | {f.seconds:.2f} s | {f.requests_text()} | {f.note} |")
    lines += [
        f"| Peak resident memory of the mount (VmHWM) | | | first mount "
        f"{run.peaks[0] / 1e6:.0f} MB, remount {run.peaks[1] / 1e6:.0f} MB; "
        f"{run.rss_after_walk / 1e6:.0f} MB resident after the first walk |",
        "",
        "## Targets",
        "",
        "| Target | Measured | Met |",
        "|---|---|---|",
        f"| The walk of {run.items:,} items takes under {WALK_TARGET:.0f} s | "
        f"{walk_figure.seconds:.1f} s (the pyfuse3 floor: {floor.seconds:.1f} s) | "
        f"{_yes(walk_figure.seconds < WALK_TARGET)} |",
        f"| The walks make no per-file request | {sum(per_file.values())} "
        f"({', '.join(f'{k} {v}' for k, v in per_file.items())}) | "
        f"{_yes(not any(per_file.values()))} |",
        f"| Peak resident memory under {MEMORY_TARGET >> 20} MB | {peak / 1e6:.0f} MB | "
        f"{_yes(peak < MEMORY_TARGET)} |",
        f"| A remount's walk is no slower | {again.seconds:.1f} s after the remount, "
        f"{walk_figure.seconds:.1f} s before | {_yes(no_slower)} |",
        "",
    ]
    return "\n".join(lines)


def _yes(met: bool) -> str:
    return "yes" if met else "**no**"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per response")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "scale-results.md")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="fsmount-scale-") as scratch,
        GrandChallengeFake() as fake,
    ):
        work = Path(scratch)
        print(f"building {args.items:,} items...", flush=True)
        fake.data.add_archive(scale_archive(fake.data.builder, SLUG, args.items))
        fake.api_hold = fake.storage_hold = args.latency
        run = Run(args.items, args.latency)
        system = ScaleMount(fake, work)
        cache = work / "cache"
        first_mount(fake, system, cache, run)
        second_mount(fake, system, cache, run)
        floor_walk(run, work)
        text = report(run, system, time.monotonic() - started)
    args.output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
