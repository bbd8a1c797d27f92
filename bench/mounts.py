"""Mounting the systems under test (fsmount, rclone) for one phase, and always unmounting.

Each mount runs in the foreground as a child process, so its pid is known (peak memory is read
from `/proc/<pid>/status`) and its log goes to a file the report can point at. Whatever
happens, the mount point is released with `fusermount3 -u -z` and the process is ended.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench_server import BENCH_ARCHIVES, BIG_NAME, HUGE_NAME, MANY_DIR, BenchServer

REPO = Path(__file__).resolve().parent.parent
MOUNT_TIMEOUT = 60.0
EXIT_TIMEOUT = 30.0

# Environment a mount must not inherit: it would point it at other services or credentials.
_FOREIGN_ENV = (
    "GRAND_CHALLENGE_AUTHORIZATION",
    "GRAND_CHALLENGE_API_URL",
    "SCENARIO_SDK_API_KEY",
    "SCENARIO_SDK_API_SECRET",
    "SCENARIO_BASE_URL",
    "SCENARIO_PROJECT_ID",
    "CREDENTIALS_DIRECTORY",
    "NOTIFY_SOCKET",
    "FSMOUNT_CACHE_DIR",
    "FSMOUNT_CACHE_SIZE",
)


class MountFailed(RuntimeError):
    """A mount did not come up; the message carries the tail of its log."""


@dataclass(frozen=True)
class Mount:
    """A mounted system: where its files are, and the process serving them."""

    system: FileSystem
    point: Path
    pid: int

    def path(self, name: str) -> Path:
        """A benchmark file (`BIG_NAME`, `HUGE_NAME`) or the `MANY_DIR` directory."""
        return self.point / self.system.relative_path(name)

    def peak_memory(self) -> int:
        """Bytes: the process's peak resident set (VmHWM) since it started."""
        return _status_kib(self.pid, "VmHWM") * 1024

    def memory(self) -> int:
        """Bytes: the process's current resident set (VmRSS)."""
        return _status_kib(self.pid, "VmRSS") * 1024


class FileSystem(ABC):
    """One system under test: how to mount it, where it shows the benchmark files."""

    name: str

    def __init__(self, server: BenchServer, work: Path) -> None:
        self.server = server
        self.work = work

    @abstractmethod
    def command(self, point: Path, cache: Path) -> list[str]:
        """The foreground mount command."""

    @abstractmethod
    def relative_path(self, name: str) -> str:
        """Where a benchmark file or directory is, relative to the mount point."""

    @abstractmethod
    def version(self) -> str:
        """A one-line version, for the report."""

    def environment(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV}


class Fsmount(FileSystem):
    """`fsmount mount` of the benchmark archives through the fake Grand Challenge API."""

    name = "fsmount"

    def __init__(self, server: BenchServer, work: Path) -> None:
        super().__init__(server, work)
        self._token = work / "gc-token"
        self._token.write_text(server.token + "\n")
        self._token.chmod(0o600)
        self._config = work / "fsmount.toml"  # empty: no user configuration file is read
        self._config.write_text("")

    def command(self, point: Path, cache: Path) -> list[str]:
        cmd = [sys.executable, "-m", "fsmount", "mount", "--foreground", str(point)]
        cmd += ["--config", str(self._config), "--cache-dir", str(cache)]
        cmd += ["--grand-challenge-url", self.server.api_url]
        cmd += ["--grand-challenge-token-file", str(self._token), "--log-level", "warning"]
        for slug in BENCH_ARCHIVES:
            cmd += ["--archive", slug]
        return cmd

    def relative_path(self, name: str) -> str:
        return self.server.mount_path(name)

    def version(self) -> str:
        commit = _output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
        changed = _output(["git", "-C", str(REPO), "status", "--porcelain", "--", "fsmount"])
        dirty = len(changed.splitlines())
        state = f", plus {dirty} uncommitted file(s) under fsmount/" if dirty else ""
        return f"fsmount at commit {commit}{state}"


class Rclone(FileSystem):
    """`rclone mount` of the plain tree over its http backend, `--vfs-cache-mode full`.

    Everything else is rclone's default, as a user would run it.
    """

    name = "rclone"

    def __init__(self, server: BenchServer, work: Path) -> None:
        super().__init__(server, work)
        self._config = work / "rclone.conf"  # empty: no user remotes or settings
        self._config.write_text("")

    @staticmethod
    def available() -> bool:
        return shutil.which("rclone") is not None

    def command(self, point: Path, cache: Path) -> list[str]:
        return [
            "rclone",
            "mount",
            ":http:",
            str(point),
            "--http-url",
            self.server.plain_url(),
            "--vfs-cache-mode",
            "full",
            "--cache-dir",
            str(cache),
            "--read-only",
            "--config",
            str(self._config),
        ]

    def relative_path(self, name: str) -> str:
        assert name in (BIG_NAME, HUGE_NAME, MANY_DIR)
        return name

    def version(self) -> str:
        return _output(["rclone", "version"]).splitlines()[0]


@contextlib.contextmanager
def mounted(system: FileSystem, cache: Path, label: str) -> Iterator[Mount]:
    """Mount `system` with its cache in `cache` for the duration of the block.

    `label` names the mount point and log file (one per phase, kept for a post-mortem).
    """
    point = system.work / "mnt" / f"{system.name}-{label}"
    point.mkdir(parents=True, exist_ok=True)
    log_path = system.work / "logs" / f"{system.name}-{label}.log"
    log_path.parent.mkdir(exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            system.command(point, cache),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=system.environment(),
            cwd=system.work,
        )
    try:
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(point):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise MountFailed(f"{system.name} did not mount at {point}:\n{tail}")
            time.sleep(0.02)
        yield Mount(system, point, proc.pid)
    finally:
        _unmount(point, proc)


def _unmount(point: Path, proc: subprocess.Popen[bytes]) -> None:
    """Unmount (lazily if busy) and wait for the mount process; kill it if it hangs."""
    if os.path.ismount(point):
        subprocess.run(["fusermount3", "-u", "-z", str(point)], check=False)
    try:
        proc.wait(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(f"no {field} in /proc/{pid}/status")


def _output(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
    except OSError as exc:
        return f"({cmd[0]}: {exc})"
