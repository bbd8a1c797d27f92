"""Running as a service: the systemd units, the `mount.fsmount` helper, `fsmount status`.

No systemd runs here, so the units are checked twice: `systemd-analyze verify` reads them as
systemd would, and `run_unit` carries out what systemd would do for them (credentials copied
into a private directory, the cache directory, the environment files, the ExecStartPre,
ExecStart and ExecStopPost lines with specifiers and `${VARIABLES}` expanded) against the fake
services, with a notify socket of our own to see READY=1 and STOPPING=1 arrive, and from whom.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from conftest import SECRET_ENV, Mounter, wait_for, watch_log
from prometheus_client.parser import text_string_to_metric_families

from fsmount.demo.services import DemoServices
from fsmount.mount import KERNEL_READAHEAD_KIB
from fsmount.mountinfo import running_mounts
from fsmount.status.client import query
from fsmount.status.paths import RUNTIME_DIR_ENV

pytestmark = pytest.mark.fuse

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
INSTALLED = "/usr/local/bin/fsmount"  # where docs/systemd.md links the venv's script
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
INSTANCE = "lab"
SANDBOXING = re.compile(
    r"^(Private(Tmp|Devices|Mounts|Network)|Protect(System|Home|Kernel\w*|ControlGroups|Proc)"
    r"|ReadOnlyPaths|InaccessiblePaths|TemporaryFileSystem|DeviceAllow|MountFlags)="
)


# --- reading a unit -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """A unit file as `(section, key, value)` entries, in order (keys may repeat)."""

    entries: tuple[tuple[str, str, str], ...]

    @classmethod
    def read(cls, path: Path) -> Unit:
        entries, section = [], ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            assert not line.endswith("\\"), "keep unit lines unbroken: this reader is simple"
            if line.startswith("["):
                section = line.strip("[]")
                continue
            key, _, value = line.partition("=")
            entries.append((section, key.strip(), value.strip()))
        return cls(tuple(entries))

    def values(self, key: str) -> list[str]:
        return [value for _, k, value in self.entries if k == key]


@dataclass(frozen=True)
class Variant:
    """One shipped unit, and what systemd would substitute for it (under a test root)."""

    name: str
    user: bool

    @property
    def path(self) -> Path:
        return REPO / "systemd" / self.name

    def home(self, root: Path) -> Path:
        return root / "home"

    def config_dir(self, root: Path) -> Path:
        """Where the instance's settings and secrets go: /etc/fsmount, ~/.config/fsmount."""
        return self.home(root) / ".config" / "fsmount" if self.user else root / "etc" / "fsmount"

    def specifiers(self, root: Path) -> dict[str, str]:
        return {
            "i": INSTANCE,
            "u": "root",
            "h": str(self.home(root)),
            "E": str(self.home(root) / ".config") if self.user else "/etc",
            "%": "%",
        }

    def cache_base(self, root: Path) -> Path:
        return self.home(root) / ".cache" if self.user else root / "var" / "cache"

    def remap(self, root: Path, word: str) -> str:
        """System paths the test cannot write to, moved under its root."""
        moves = {INSTALLED: str(BIN / "fsmount"), "/etc/fsmount/": f"{self.config_dir(root)}/"}
        for old, new in moves.items():
            if word.startswith(old):
                return new + word[len(old) :]
        return word


VARIANTS = [Variant("fsmount@.service", user=False), Variant("fsmount-user@.service", user=True)]


def expand_specifiers(text: str, specifiers: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        letter = match.group(1)
        assert letter in specifiers, f"specifier %{letter} is not modelled by this test"
        return specifiers[letter]

    return re.sub(r"%(.)", one, text)


def expand_variables(word: str, env: dict[str, str]) -> str:
    """`${NAME}` within a word and `$NAME` as a whole word, as systemd expands Exec lines."""
    if re.fullmatch(r"\$\w+", word):
        return env.get(word[1:], "")
    return re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word)


# --- carrying a unit out ------------------------------------------------------------------------


class NotifySocket:
    """A stand-in for systemd's notify socket, recording who sent each message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))

    def close(self) -> None:
        self.sock.close()

    def receive(self, proc: subprocess.Popen[bytes], timeout: float, logs: Path) -> tuple[int, str]:
        """The next message and its sender's pid; fails if `proc` exits or time runs out."""
        ucred = struct.Struct("iII")  # pid, uid, gid
        got: list[tuple[int, str]] = []

        def arrived() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"exited ({proc.returncode}) first:\n{logs.read_text()}")
            self.sock.settimeout(0.2)
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(ucred.size))
            except TimeoutError:
                return False
            pids = [
                ucred.unpack(payload[: ucred.size])[0]
                for level, kind, payload in ancillary
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
            ]
            got.append((pids[0] if pids else -1, data.decode()))
            return True

        wait_for(arrived, timeout, "a notify message")
        return got[0]


@dataclass
class UnitRun:
    """A unit's instance carried out as systemd would, under `root`."""

    variant: Variant
    root: Path
    unit: Unit
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.root / "service.log"

    def expand(self, text: str) -> str:
        return expand_specifiers(text, self.variant.specifiers(self.root))

    def command(self, line: str, env: dict[str, str]) -> tuple[list[str], bool]:
        """An Exec line as argv, and whether its failure is ignored (the `-` prefix)."""
        prefix = re.match(r"[-@+!:]*", line).group(0)
        words = shlex.split(self.expand(line[len(prefix) :]))
        argv = [self.variant.remap(self.root, expand_variables(w, env)) for w in words]
        return argv, "-" in prefix

    def prepare(self, notify: Path) -> None:
        """The environment systemd would give: settings, credentials, cache, notify socket."""
        env = {"PATH": SYSTEMD_PATH, "NOTIFY_SOCKET": str(notify), "INVOCATION_ID": "0" * 32}
        env[RUNTIME_DIR_ENV] = str(self.root / "run")  # keep status sockets in here
        if self.variant.user:
            env["HOME"] = str(self.variant.home(self.root))
        for assignment in self.unit.values("Environment"):
            key, _, value = self.expand(assignment).partition("=")
            env[key] = self.variant.remap(self.root, value)
        for name in self.unit.values("EnvironmentFile"):
            path = Path(self.variant.remap(self.root, self.expand(name.removeprefix("-"))))
            if path.exists() or not name.startswith("-"):
                for line in path.read_text().splitlines():
                    if line.strip() and not line.startswith("#"):
                        key, _, value = line.partition("=")
                        env[key.strip()] = value.strip()
        credentials = self.root / "credentials"
        credentials.mkdir(mode=0o700)
        for spec in self.unit.values("LoadCredential"):
            name, _, source = self.expand(spec).partition(":")
            shutil.copyfile(self.variant.remap(self.root, source), credentials / name)
        env["CREDENTIALS_DIRECTORY"] = str(credentials)
        (cache,) = self.unit.values("CacheDirectory")
        cache_dir = self.variant.cache_base(self.root) / self.expand(cache)
        cache_dir.mkdir(parents=True, mode=0o700)
        env["CACHE_DIRECTORY"] = str(cache_dir)
        self.env = env

    def run_each(self, key: str) -> None:
        env = dict(self.env)
        if self.proc is not None:
            env["MAINPID"] = str(self.proc.pid)
        for line in self.unit.values(key):
            argv, ignore_failure = self.command(line, env)
            result = subprocess.run(argv, env=env, capture_output=True, timeout=60)
            assert ignore_failure or result.returncode == 0, f"{key}={line}: {result}"

    def start(self) -> subprocess.Popen[bytes]:
        self.run_each("ExecStartPre")
        (line,) = self.unit.values("ExecStart")
        argv, _ = self.command(line, self.env)
        watch_log(self.log)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd="/"
            )
        return self.proc

    def cleanup(self, mountpoint: Path) -> None:
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def write_instance_config(
    variant: Variant, root: Path, services: DemoServices, extra_env: str = ""
) -> None:
    """What docs/systemd.md has the administrator write for an instance."""
    assert services.gc is not None and services.scenario is not None
    directory = variant.config_dir(root)
    directory.mkdir(parents=True)
    (directory / f"{INSTANCE}.toml").write_text('cache-size = "1G"\ndir-cache-time = 60\n')
    (directory / f"{INSTANCE}.env").write_text(
        f"GRAND_CHALLENGE_API_URL={services.gc.api_url}\n"
        f"SCENARIO_BASE_URL={services.scenario.api_url}\n{extra_env}"
    )
    token = directory / f"{INSTANCE}.grand-challenge-token"
    token.write_text(f"Bearer {services.gc.token}\n")
    creds = directory / f"{INSTANCE}.scenario-credentials"
    creds.write_text(f"{services.scenario.key}\n{services.scenario.secret}\n")
    token.chmod(0o600)
    creds.chmod(0o600)


# --- the units ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_units_pass_systemd_analyze_verify(tmp_path: Path, variant: Variant) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    # verify insists the ExecStart binary exists; nothing is installed system-wide by tests
    text = variant.path.read_text().replace(INSTALLED, str(BIN / "fsmount"))
    (tmp_path / variant.name).write_text(text)
    env = dict(os.environ)
    command = [analyze]
    if variant.user:
        runtime = tmp_path / "xdg-runtime"
        runtime.mkdir(mode=0o700)
        env["XDG_RUNTIME_DIR"] = str(runtime)  # a user manager needs one, even to verify
        command.append("--user")
    instance = variant.name.replace("@", f"@{INSTANCE}")
    result = subprocess.run(
        [*command, "verify", str(tmp_path / instance)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    # systemd only warns about a misspelt key or a bad value: any output is a failure here
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_units_start_the_documented_binary_with_no_sandboxing(variant: Variant) -> None:
    unit = Unit.read(variant.path)
    (start,) = unit.values("ExecStart")
    assert start.startswith(f"{INSTALLED} mount --foreground ")
    assert INSTALLED in (REPO / "docs" / "systemd.md").read_text()
    assert unit.values("Type") == ["notify"] and unit.values("KillMode") == ["mixed"]
    hiding = [f"{k}={v}" for _, k, v in unit.entries if SANDBOXING.match(f"{k}=")]
    assert not hiding, f"these would hide the mount from the host: {hiding}"


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_unit_notifies_ready_once_mounted_and_stopping_on_sigterm(
    tmp_path: Path, services: DemoServices, variant: Variant
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    if variant.user:  # the unit's default mount point, under %h
        mountpoint = variant.home(root) / "fsmount" / INSTANCE
        extra = ""
    else:  # moved by the environment file, as docs/systemd.md says to
        mountpoint = root / "srv" / INSTANCE
        extra = f"FSMOUNT_MOUNTPOINT={mountpoint}\n"
    write_instance_config(variant, root, services, extra)
    run = UnitRun(variant, root, Unit.read(variant.path))
    notify = NotifySocket(tmp_path / "notify")
    try:
        run.prepare(notify.path)
        proc = run.start()
        assert mountpoint.is_dir(), "ExecStartPre creates the mount point"
        sender, message = notify.receive(proc, 60, run.log)
        mounted = os.path.ismount(mountpoint)  # at once: READY=1 must follow the mount
        assert "READY=1" in message.splitlines(), message
        assert mounted, "READY=1 arrived before the mount was visible"
        assert sender == proc.pid, "NotifyAccess=main: the main process must send it"
        assert sorted(os.listdir(mountpoint)) == ["grand-challenge", "scenario"]
        assert (Path(run.env["CACHE_DIRECTORY"]) / "metadata.sqlite").exists()

        run.run_each("ExecReload")  # SIGHUP: listings are dropped, the mount stays
        assert sorted(os.listdir(mountpoint)) == ["grand-challenge", "scenario"]
        assert proc.poll() is None and os.path.ismount(mountpoint)

        proc.send_signal(signal.SIGTERM)  # KillMode=mixed: the main process alone
        sender, message = notify.receive(proc, 30, run.log)
        assert "STOPPING=1" in message.splitlines() and sender == proc.pid
        assert proc.wait(timeout=30) == 0, run.log.read_text()
        assert not os.path.ismount(mountpoint), "fsmount unmounts by itself"
        run.run_each("ExecStopPost")
        logs = run.log.read_text()
        assert services.gc.token not in logs and services.scenario.secret not in logs
    finally:
        notify.close()
        run.cleanup(mountpoint)


def test_a_restart_after_kill_9_clears_the_stale_mount_and_mounts_again(
    tmp_path: Path, services: DemoServices
) -> None:
    variant = VARIANTS[0]  # the system unit; the user unit shares its Exec lines' logic
    assert not variant.user
    root = tmp_path / "root"
    root.mkdir()
    mountpoint = root / "srv" / INSTANCE
    write_instance_config(variant, root, services, f"FSMOUNT_MOUNTPOINT={mountpoint}\n")
    unit = Unit.read(variant.path)
    assert unit.values("Restart") == ["on-failure"]
    notify = NotifySocket(tmp_path / "notify")
    first = UnitRun(variant, root, unit)
    again: UnitRun | None = None
    try:
        first.prepare(notify.path)
        proc = first.start()
        notify.receive(proc, 60, first.log)
        proc.kill()  # SIGKILL: no unmount, the mount point is left "not connected"
        proc.wait()
        with pytest.raises(OSError):
            os.listdir(mountpoint)
        # systemd restarts the unit: ExecStopPost, then ExecStartPre, clear the dead mount.
        first.run_each("ExecStopPost")
        again = UnitRun(variant, root, unit, env=first.env)
        proc = again.start()
        _, message = notify.receive(proc, 60, again.log)
        assert "READY=1" in message.splitlines()
        assert sorted(os.listdir(mountpoint)) == ["grand-challenge", "scenario"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not os.path.ismount(mountpoint)
    finally:
        notify.close()
        first.cleanup(mountpoint)
        if again is not None:
            again.cleanup(mountpoint)


def test_a_mount_point_with_spaces_gets_its_readahead_raised_and_is_listed(mounter: Mounter):
    """Mountinfo writes a space as `\\040`: the mount must still find itself there."""
    if os.geteuid() != 0:
        pytest.skip("only root may raise a mount's kernel readahead")
    mount = mounter.start(gc=False, name="a mount\twith spaces")
    device = os.stat(mount.path).st_dev  # asked from this process, not the mount's
    setting = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
    wanted = str(KERNEL_READAHEAD_KIB)
    wait_for(lambda: setting.read_text().strip() == wanted, 30, "the raised readahead")
    assert mount.path in running_mounts(owner=os.getuid())
    assert query(mount.path)["mountpoint"] == str(mount.path)


def test_an_unmount_from_outside_sends_stopping_and_exits_0(
    tmp_path: Path, mounter: Mounter
) -> None:
    notify = NotifySocket(tmp_path / "notify")
    try:
        mount = mounter.start(scenario=False, env={"NOTIFY_SOCKET": str(notify.path)})
        _, message = notify.receive(mount.proc, 60, mount.log_path)
        assert "READY=1" in message.splitlines()
        subprocess.run(["fusermount3", "-u", str(mount.path)], check=True)
        assert mount.proc.wait(timeout=30) == 0, mount.logs()
        notify.sock.settimeout(5)
        data = notify.sock.recv(4096).decode()  # sent before the process exited
        assert "STOPPING=1" in data.splitlines()
    finally:
        notify.close()


def test_an_unmount_while_the_kernel_reads_ahead_is_no_error(
    mounter: Mounter, services: DemoServices
) -> None:
    """The kernel drops its own readahead requests when the mount goes: the answers they get
    later are refused (ENOENT), which is no error (libfuse, too, keeps quiet about it)."""
    gc = services.gc
    assert gc is not None
    mount = mounter.start("--archive", "demo-large", scenario=False)
    expected = gc.expected_archive("demo-large")
    rel = max(expected, key=lambda p: expected[p].size)
    path = mount.path / "grand-challenge" / "demo-large" / rel
    os.stat(path)
    gc.storage_faults.configure(latency=1.0)  # the readahead is still in flight at the unmount
    try:
        with open(path, "rb") as f:  # WILLNEED: the kernel reads ahead, and does not wait
            os.posix_fadvise(f.fileno(), 0, 4 << 20, os.POSIX_FADV_WILLNEED)
        subprocess.run(["fusermount3", "-u", "-z", str(mount.path)], check=True)
        assert mount.proc.wait(timeout=30) == 0, mount.logs()
    finally:
        gc.reset_faults()


# --- mount.fsmount ------------------------------------------------------------------------------


def clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "no-config")
    env[RUNTIME_DIR_ENV] = str(tmp_path / "run")
    return env


def serving_pids(mountpoint: Path) -> list[int]:
    """Live fsmount processes serving `mountpoint` (the daemon is no child of ours)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and b"--foreground" in argv and os.fsencode(mountpoint) in argv:
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def helper_mountpoint(tmp_path: Path) -> Iterator[Path]:
    """A mount point that is unmounted, and its daemon gone, whatever the test did."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    try:
        yield mountpoint
    finally:
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
        for pid in serving_pids(mountpoint):
            os.kill(pid, signal.SIGKILL)


def helper_config(tmp_path: Path, services: DemoServices) -> Path:
    """A config file naming the services and the secret files, as an fstab mount needs."""
    assert services.gc is not None and services.scenario is not None
    token = tmp_path / "gc-token"
    token.write_text(f"{services.gc.token}\n")
    creds = tmp_path / "scenario-credentials"
    creds.write_text(f"{services.scenario.key}\n{services.scenario.secret}\n")
    conf = tmp_path / "lab.toml"
    conf.write_text(
        f'grand-challenge-url = "{services.gc.api_url}"\n'
        f'grand-challenge-token-file = "{token}"\n'
        f'scenario-url = "{services.scenario.api_url}"\n'
        f'scenario-credentials-file = "{creds}"\n'
    )
    return conf


def run_helper(tmp_path: Path, mountpoint: Path, options: str) -> subprocess.CompletedProcess[str]:
    """As mount(8) runs /sbin/mount.fsmount (here the venv's console script)."""
    return subprocess.run(
        [str(BIN / "mount.fsmount"), INSTANCE, str(mountpoint), "-o", options],
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_mount_helper_returns_once_mounted_and_the_mount_unmounts(
    tmp_path: Path, services: DemoServices, helper_mountpoint: Path
) -> None:
    conf = helper_config(tmp_path, services)
    watch_log(tmp_path / "daemon.log")
    options = (
        f"rw,_netdev,nofail,x-systemd.automount,x-systemd.idle-timeout=10min,config={conf},"
        f"cache-dir={tmp_path / 'cache'},cache_size=1G,log-file={tmp_path / 'daemon.log'}"
    )
    result = run_helper(tmp_path, helper_mountpoint, options)
    assert result.returncode == 0, result.stderr
    assert os.path.ismount(helper_mountpoint), "mount(8) expects the mount up on return"
    assert sorted(os.listdir(helper_mountpoint)) == ["grand-challenge", "scenario"]
    (daemon,) = serving_pids(helper_mountpoint)

    unmount = subprocess.run(
        [sys.executable, "-m", "fsmount", "unmount", str(helper_mountpoint)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unmount.returncode == 0, unmount.stderr
    wait_for(lambda: daemon not in serving_pids(helper_mountpoint), 30, "the daemon to exit")
    assert not os.path.ismount(helper_mountpoint)


def test_mount_helper_failure_is_one_line_and_mount8s_exit_code(
    tmp_path: Path, services: DemoServices, helper_mountpoint: Path
) -> None:
    conf = helper_config(tmp_path, services)
    result = run_helper(tmp_path, helper_mountpoint, f"config={conf},archive=no-such-archive")
    assert result.returncode == 32
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-archive" in lines[0], result.stderr
    assert not os.path.ismount(helper_mountpoint)


# --- fsmount status -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_status_and_metrics_count_what_a_read_cost(
    tmp_path: Path, mounter: Mounter, services: DemoServices
) -> None:
    runtime = tmp_path / "run"
    port = free_port()
    env = {RUNTIME_DIR_ENV: str(runtime)}
    gc = services.gc
    gc.log.reset()  # from here on, the fake counts exactly what this mount asks
    mount = mounter.start(
        "--metrics-port", str(port), "--archive", "demo-medical", scenario=False, env=env
    )
    images = (  # stored files go through storage and the block cache (JSON values do not)
        Path(top, name)
        for top, _, names in os.walk(mount.path / "grand-challenge")
        for name in names
        if name.endswith((".mha", ".tif", ".tiff")) and Path(top, name).stat().st_size > 0
    )
    data = next(images).read_bytes()

    def fsmount_status(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "fsmount", "status", *args, str(mount.path)],
            env=mounter.env(env),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    document = json.loads(fsmount_status("--json"))
    assert document["mountpoint"] == str(mount.path) and document["pid"] == mount.proc.pid
    assert [s["name"] for s in document["services"]] == ["grand-challenge"]
    assert document["fuse"]["bytes_served"] >= len(data) and document["fuse"]["reads"] >= 1
    assert document["cache"]["bytes"] >= len(data) and document["cache"]["misses"] >= 1
    # The figures match what the fake Grand Challenge counted: API pages and details (200),
    # /media/ redirects (302), storage probes and ranges (206); no retry, error or download
    # left in flight.
    http, cache, counted = document["http"], document["cache"], gc.log.counts()
    media, storage = counted.get("media", 0), counted.get("storage", 0)
    assert media >= 1 and storage >= 2
    assert http["requests"] == sum(counted.values()), (http, counted)
    assert http["by_status"] == {
        "200": sum(counted.values()) - media - storage,
        "206": storage,
        "302": media,
    }, (http, counted)
    assert http["url_resolves"] == media
    assert (http["retries"], http["errors"], cache["downloads_in_flight"]) == (0, 0, 0)
    # Bytes: the cached blocks, plus at most one byte per size probe.
    assert cache["bytes_fetched"] <= http["bytes_fetched"] <= cache["bytes_fetched"] + storage
    assert f"fsmount at {mount.path}" in fsmount_status()

    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert metrics.status_code == 200
    served = {
        f.name: f.samples[0].value
        for f in text_string_to_metric_families(metrics.text)
        if f.samples
    }
    assert served["fsmount_fuse_served_bytes"] >= len(data)
    assert served["fsmount_http_requests"] == http["requests"]
    assert served["fsmount_http_url_resolves"] == media

    assert mount.stop() == 0
    assert not list(runtime.iterdir()), "the socket is removed when the mount stops"
