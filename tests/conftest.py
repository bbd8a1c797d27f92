"""Shared fixtures: the fake services on loopback, and the real CLI mounted through the kernel.

Every mount is a subprocess of `python -m fsmount mount --foreground`, and every fixture
unmounts in `finally` (`fusermount3 -u -z`), so a failing test never leaves a mount behind.

Many failure paths of the mount only log, so a test also fails when a mount it ran logged a
warning or an error that the test did not declare (`checklogs`, in the spirit of S3QL's
`pytest_checklogs`): declare one with `mounter.start(..., expect_logs=[regex])` or
`mount.expect_logs(regex)`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fsmount.demo.services import DemoServices, start_demo_services
from fsmount.mountinfo import read_mounts

# Warnings the product logs by design in the situations the tests create (regexes).
SKIPPED_EDGE_CASES = r"demo-edge-cases/[^:]*: skipping "  # hostile values, left out and logged
GAVE_UP = r"giving up after \d+ tries"  # a request retried until its budget was spent
CHANGED = r"the remote file changed while being read"  # EIO for a file replaced under a reader
STALE_LISTING = r"refreshing \S+ failed; serving the last listing"  # a service down

SECRET_ENV = (
    "GRAND_CHALLENGE_AUTHORIZATION",
    "SCENARIO_SDK_API_KEY",
    "SCENARIO_SDK_API_SECRET",
    "SCENARIO_BASE_URL",
    "SCENARIO_PROJECT_ID",
    "GRAND_CHALLENGE_API_URL",
    "CREDENTIALS_DIRECTORY",
    "NOTIFY_SOCKET",
)


def fuse_unavailable() -> str | None:
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"/dev/fuse cannot be opened: {exc}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = fuse_unavailable()
    for item in items:
        if "fuse" in item.keywords and reason:
            item.add_marker(pytest.mark.skip(reason=reason))


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until true; fail after `timeout` seconds (never sleep and hope)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def fsmount_mounts() -> list[str]:
    return [m.mount_point for m in read_mounts() if m.fstype == "fuse.fsmount"]


# A record as fsmount's logging writes it (logs.setup_logging), with or without the time.
_RECORD = re.compile(
    r"(?:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} )?(DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: "
)
_QUIET = ("DEBUG", "INFO")


def unexpected_logs(text: str, expected: Sequence[str] = ()) -> list[str]:
    """The records of a log at WARNING or above that match none of the `expected` regexes
    (searched in the record's first line), and tracebacks not part of such a record (an
    exception nothing caught)."""
    found: list[str] = []
    level: str | None = None  # of the record the current line belongs to
    for line in text.splitlines():
        record = _RECORD.match(line)
        if record is not None:
            level = record.group(1)
        elif line.startswith("Traceback (most recent call last):") and level in (None, *_QUIET):
            level = "CRITICAL"  # an exception nothing logged, printed as the process died
        else:
            continue
        if level not in _QUIET and not any(re.search(p, line) for p in expected):
            found.append(line)
    return found


@dataclass
class WatchedLog:
    """The output of a process a test started, checked for warnings after each test."""

    path: Path
    expected: list[str] = field(default_factory=list)  # regexes of the records allowed
    checked: int = 0  # bytes already checked, by an earlier test

    def unchecked(self) -> list[str]:
        """What was logged since the last check, up to the last complete line."""
        try:
            data = self.path.read_bytes()[self.checked :]
        except FileNotFoundError:
            return []
        data = data[: data.rfind(b"\n") + 1]
        self.checked += len(data)
        return unexpected_logs(data.decode(errors="replace"), self.expected)


_WATCHED: list[WatchedLog] = []


def watch_log(path: Path, expected: Sequence[str] = ()) -> WatchedLog:
    """Have `checklogs` check the log at `path` after this test and every later one."""
    watched = WatchedLog(path, list(expected))
    _WATCHED.append(watched)
    return watched


@pytest.fixture(autouse=True)
def checklogs(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test whose mounts logged a warning or error it did not declare.

    Autouse fixtures are set up first, so this one is torn down last: after the mounts of the
    test were stopped, with their last words.
    """
    yield
    found = {str(w.path): lines for w in _WATCHED if (lines := w.unchecked())}
    if found:
        report = "\n".join(f"{path}:\n  " + "\n  ".join(lines) for path, lines in found.items())
        pytest.fail(
            f"{request.node.name}: unexpected warnings or errors were logged (declare the"
            f" expected ones with expect_logs):\n{report}",
            pytrace=False,
        )


@dataclass
class Mount:
    """A running `fsmount mount --foreground` subprocess and its mount point."""

    path: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    watched: WatchedLog
    stopped: bool = field(default=False)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def expect_logs(self, *patterns: str) -> None:
        """Warnings or errors this mount may log from now on (regexes), without failing."""
        self.watched.expected.extend(patterns)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal the mount and wait for it to exit; returns its exit code."""
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        self.stopped = True
        return code


class Mounter:
    """Starts mounts of the real CLI against the fake services, and cleans every one up."""

    def __init__(self, base: Path, services: DemoServices) -> None:
        self.base = base
        self.services = services
        self.mounts: list[Mount] = []
        self._count = 0

    def args(self, *, gc: bool = True, scenario: bool = True) -> list[str]:
        """Flags pointing at the fake services, secrets passed in files (never argv)."""
        args: list[str] = []
        if gc and self.services.gc is not None:
            token = self.base / "gc-token"
            token.write_text(f"Bearer {self.services.gc.token}\n")
            args += ["--grand-challenge-url", self.services.gc.api_url]
            args += ["--grand-challenge-token-file", str(token)]
        if scenario and self.services.scenario is not None:
            creds = self.base / "scenario-credentials"
            creds.write_text(f"{self.services.scenario.key}\n{self.services.scenario.secret}\n")
            args += ["--scenario-url", self.services.scenario.api_url]
            args += ["--scenario-credentials-file", str(creds)]
        return args

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
        env["XDG_CONFIG_HOME"] = str(self.base / "no-config")  # no user config file
        env.update(extra or {})
        return env

    def start(
        self,
        *extra: str,
        gc: bool = True,
        scenario: bool = True,
        cache_dir: Path | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
        expect_logs: Sequence[str] = (),
        name: str | None = None,
    ) -> Mount:
        self._count += 1
        path = self.base / (name or f"mnt{self._count}")
        path.mkdir()
        log_path = self.base / f"mount{self._count}.log"
        cache = cache_dir or self.base / f"cache{self._count}"
        cmd = [sys.executable, "-m", "fsmount", "mount", "--foreground", str(path)]
        cmd += ["--cache-dir", str(cache), *self.args(gc=gc, scenario=scenario), *extra]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(env), cwd=self.base
            )
        mount = Mount(path, proc, log_path, watch_log(log_path, expect_logs))
        self.mounts.append(mount)
        if wait:

            def up() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(
                        f"fsmount exited early ({proc.returncode}):\n{mount.logs()}"
                    )
                return os.path.ismount(path)

            wait_for(up, 60, f"the mount at {path}")
        return mount

    def cleanup(self) -> None:
        for mount in self.mounts:
            if os.path.ismount(mount.path):
                subprocess.run(["fusermount3", "-u", "-z", str(mount.path)], check=False)
            if mount.proc.poll() is None:
                mount.proc.terminate()
                try:
                    mount.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    mount.proc.kill()
                    mount.proc.wait()


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoServices]:
    with start_demo_services(workdir=tmp_path_factory.mktemp("services")) as running:
        yield running


@pytest.fixture
def mounter(tmp_path: Path, services: DemoServices) -> Iterator[Mounter]:
    mounter = Mounter(tmp_path, services)
    try:
        yield mounter
    finally:
        mounter.cleanup()


@pytest.fixture(scope="session")
def shared_mount(
    tmp_path_factory: pytest.TempPathFactory, services: DemoServices
) -> Iterator[Mount]:
    """One mount of both services for the read-only tests that do not count requests."""
    mounter = Mounter(tmp_path_factory.mktemp("shared"), services)
    try:
        yield mounter.start(expect_logs=[SKIPPED_EDGE_CASES])
    finally:
        mounter.cleanup()


@pytest.fixture(scope="session", autouse=True)
def no_mount_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fail the run if one of this session's mounts is still there (and clear it)."""
    base = str(tmp_path_factory.getbasetemp().resolve())
    yield
    leaked = {path for path in fsmount_mounts() if path.startswith(base + "/")}
    for path in leaked:
        subprocess.run(["fusermount3", "-u", "-z", path], check=False)
    assert not leaked, f"mounts left behind: {leaked}"


@contextlib.contextmanager
def no_new_requests(log, *kinds: str) -> Iterator[None]:
    """Assert that the block makes no request of the given kinds to a fake service."""
    before = {k: log.count(k) for k in kinds}
    yield
    after = {k: log.count(k) for k in kinds}
    assert after == before, f"unexpected requests: before {before}, after {after}"
