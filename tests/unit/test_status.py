"""`fsmount status` and `/metrics`: socket location, the socket round trip, both renderings."""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from fsmount.commands.status import show
from fsmount.errors import StartupError
from fsmount.mountinfo import running_mounts
from fsmount.status.client import StatusError, control, query
from fsmount.status.control import Send, serve_control
from fsmount.status.document import METRICS
from fsmount.status.paths import RUNTIME_DIR_ENV, control_path, socket_path, status_dirs
from fsmount.status.render import format_size, prometheus, render
from fsmount.status.server import open_metrics_listeners, serve_metrics, serve_status

SAMPLE: dict[str, Any] = {
    "mountpoint": "/mnt/fsmount/lab",
    "pid": 4242,
    "started": 1_700_000_000.0,
    "services": [
        {"name": "grand-challenge", "api": "https://grand-challenge.org/api/v1/"},
        {"name": "scenario", "api": "https://api.cloud.scenario.com/v1"},
    ],
    "cache": {
        "dir": "/var/cache/fsmount/lab",
        "bytes": 3 << 30,
        "blocks": 768,
        "budget": 10 << 30,
        "hits": 900,
        "misses": 100,
        "bytes_fetched": 5 << 30,
        "downloads_in_flight": 2,
    },
    "http": {
        "requests": 1234,
        "retries": 7,
        "errors": 1,
        "bytes_fetched": (5 << 30) + 12345,
        "url_resolves": 56,
        "by_status": {"200": 300, "206": 930, "503": 4},
    },
    "fuse": {
        "bytes_served": 6 << 30,
        "reads": 50_000,
        "errors": 3,
        "xattr_requests": 12,
        "entries": 900,
    },
}


def run_with_server(
    server: Callable[..., Awaitable[None]], *args: Any, client: Callable[[Any], Any]
) -> Any:
    """Start `server` under trio, run the blocking `client(started_value)` in a thread, stop."""

    async def main() -> Any:
        async with trio.open_nursery() as nursery:
            started = await nursery.start(server, *args)
            result = await trio.to_thread.run_sync(client, started)
            nursery.cancel_scope.cancel()
        return result

    return trio.run(main)


@pytest.fixture
def runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "run"
    monkeypatch.setenv(RUNTIME_DIR_ENV, str(directory))
    return directory


# --- where the socket is ------------------------------------------------------------------------


def test_root_uses_run_fsmount_whatever_its_shell_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """A system unit (no XDG_RUNTIME_DIR) and root's login shell must find the same socket."""
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    service = status_dirs({})
    shell = status_dirs({"XDG_RUNTIME_DIR": "/run/user/0", "XDG_CACHE_HOME": "/x"})
    assert service[0] == shell[0] == Path("/run/fsmount")


def test_a_user_prefers_the_runtime_dir_then_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 54321)  # no /run/user/54321 here
    dirs = status_dirs({"XDG_RUNTIME_DIR": "/run/user/54321", "XDG_CACHE_HOME": "/c"})
    assert dirs == [Path("/run/user/54321/fsmount"), Path("/c/fsmount/run")]
    assert status_dirs({"XDG_CACHE_HOME": "/c"}) == [Path("/c/fsmount/run")]


def test_the_override_is_the_only_candidate() -> None:
    assert status_dirs({RUNTIME_DIR_ENV: "/tmp/x"}) == [Path("/tmp/x")]


def test_one_mount_point_spelled_differently_has_one_socket(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    env = {RUNTIME_DIR_ENV: "/run/x"}
    same = {
        socket_path(tmp_path / "real" / "mnt", env),
        socket_path(tmp_path / "link" / "mnt", env),
        socket_path(tmp_path / "real" / "sub" / ".." / "mnt", env),
    }
    assert len(same) == 1
    assert socket_path(tmp_path / "real" / "other", env) not in same
    (path,) = same
    assert path.parent == Path("/run/x") and path.name.endswith(".sock")


def test_a_socket_path_too_long_for_af_unix_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 54321)
    env = {"XDG_RUNTIME_DIR": "/" + "r" * 120, "XDG_CACHE_HOME": "/tmp"}
    assert socket_path(Path("/mnt/x"), env).parent == Path("/tmp/fsmount/run")


def test_running_mounts_reads_fuse_fsmount_entries_only(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
        "90 22 0:50 / /mnt/with\\040space ro,nosuid shared:1 - fuse.fsmount fsmount"
        " ro,user_id=0,group_id=0,default_permissions\n"
        "91 22 0:51 / /home/u/lab ro - fuse.fsmount fsmount ro,user_id=1000,group_id=1000\n"
        "92 22 0:52 / /mnt/sshfs rw - fuse.sshfs host: rw,user_id=0,group_id=0\n"
    )
    everyone = running_mounts(mountinfo=str(info))
    assert everyone == [Path("/mnt/with space"), Path("/home/u/lab")]
    assert running_mounts(owner=1000, mountinfo=str(info)) == [Path("/home/u/lab")]


# --- the socket ---------------------------------------------------------------------------------


def test_status_round_trip_through_a_private_socket(runtime_dir: Path, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    path = socket_path(mountpoint)

    def client(started: Path) -> dict[str, Any]:
        assert started == path
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
        return query(mountpoint)

    assert run_with_server(serve_status, path, lambda: SAMPLE, client=client) == SAMPLE
    assert not path.exists(), "the socket is removed when the server stops"


def test_a_stale_socket_of_a_crashed_mount_is_replaced(runtime_dir: Path, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    path = socket_path(mountpoint)
    path.parent.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # bound, never listening: what a killed mount leaves
        with pytest.raises(StatusError, match="not running"):
            query(mountpoint)
        got = run_with_server(
            serve_status, path, lambda: {"pid": 1}, client=lambda _: query(mountpoint)
        )
    assert got == {"pid": 1}


def test_query_names_a_mount_without_a_socket(runtime_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(StatusError, match=r"no status socket for .*nowhere"):
        query(tmp_path / "nowhere")


def test_a_failing_collect_is_reported_and_the_server_keeps_going(
    runtime_dir: Path, tmp_path: Path
) -> None:
    mountpoint = tmp_path / "mnt"
    answers = iter([RuntimeError("boom"), SAMPLE])

    def collect() -> dict[str, Any]:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def client(_: Path) -> dict[str, Any]:
        with pytest.raises(StatusError, match=r"cannot collect the status.*boom"):
            query(mountpoint)
        return query(mountpoint)

    got = run_with_server(serve_status, socket_path(mountpoint), collect, client=client)
    assert got == SAMPLE


def test_status_command_prints_every_named_mount_and_fails_for_a_missing_one(
    runtime_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mountpoint = tmp_path / "mnt"

    def client(_: Path) -> tuple[int, str, int, str]:
        table, lines = io.StringIO(), io.StringIO()
        code_table = show([str(mountpoint)], out=table)
        code_json = show([str(mountpoint), str(tmp_path / "gone")], as_json=True, out=lines)
        return code_table, table.getvalue(), code_json, lines.getvalue()

    code_table, table, code_json, lines = run_with_server(
        serve_status, socket_path(mountpoint), lambda: SAMPLE, client=client
    )
    assert code_table == 0 and "fsmount at /mnt/fsmount/lab" in table
    assert code_json == 1, "a mount that does not answer makes the health check fail"
    assert [json.loads(line) for line in lines.splitlines()] == [SAMPLE]
    assert "no status socket for" in capsys.readouterr().err


def test_status_command_without_mounts_says_so(tmp_path: Path) -> None:
    (tmp_path / "mountinfo").write_text("")  # a mount table without fsmount mounts
    with pytest.raises(StatusError, match="no fsmount mount"):
        show([], mountinfo=str(tmp_path / "mountinfo"))


def test_clients_that_hang_up_early_do_not_stop_the_server(
    runtime_dir: Path, tmp_path: Path
) -> None:
    """A status or metrics client must never take the mount down with it."""
    mountpoint = tmp_path / "mnt"

    def rude(address: Any, family: int) -> None:
        for _ in range(5):
            with socket.socket(family, socket.SOCK_STREAM) as conn:
                conn.connect(address)
                # reset instead of a clean close: the server's send fails with ECONNRESET
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def status_client(path: Path) -> dict[str, Any]:
        rude(str(path), socket.AF_UNIX)
        return query(mountpoint)

    got = run_with_server(
        serve_status, socket_path(mountpoint), lambda: SAMPLE, client=status_client
    )
    assert got == SAMPLE

    def metrics_client(port: int) -> int:
        rude(("127.0.0.1", port), socket.AF_INET)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest of the head
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).status_code

    assert run_with_server(serve_metrics, 0, lambda: SAMPLE, client=metrics_client) == 200


def test_no_status_socket_is_logged_and_the_mount_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "file").write_text("")
    blocked = tmp_path / "file" / "run" / "x.sock"  # its directory cannot be made

    async def main() -> Path | None:
        async with trio.open_nursery() as nursery:
            return await nursery.start(serve_status, blocked, lambda: SAMPLE)

    assert trio.run(main) is None
    assert "fsmount status will not work" in caplog.text


def test_a_metrics_port_in_use_is_a_startup_error() -> None:
    async def main() -> None:
        listeners = await open_metrics_listeners(0)
        port = listeners[0].socket.getsockname()[1]
        try:
            with pytest.raises(StartupError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
                await open_metrics_listeners(port)
        finally:
            for listener in listeners:
                await listener.aclose()

    trio.run(main)


# --- /metrics -----------------------------------------------------------------------------------


def test_metrics_endpoint_serves_prometheus_text_on_loopback() -> None:
    def client(port: int) -> list[httpx.Response]:
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=10) as http:
            return [
                http.get(f"{base}/metrics"),
                http.get(f"{base}/metrics?name[]=x"),
                http.head(f"{base}/metrics"),
                http.get(f"{base}/"),
                http.post(f"{base}/metrics"),
            ]

    ok, with_query, head, not_found, post = run_with_server(
        serve_metrics, 0, lambda: SAMPLE, client=client
    )
    assert ok.status_code == 200
    assert ok.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert ok.text == prometheus(SAMPLE)
    assert with_query.text == ok.text
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(ok.content))
    assert not_found.status_code == 404
    assert post.status_code == 405 and post.headers["allow"] == "GET, HEAD"


def test_metrics_listen_on_loopback_only() -> None:
    async def main() -> str:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_metrics, 0, lambda: SAMPLE)
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                host = conn.getpeername()[0]
            nursery.cancel_scope.cancel()
        return host

    assert trio.run(main) == "127.0.0.1"


# --- renderings ---------------------------------------------------------------------------------


def families(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_prometheus_exposes_every_counter_with_its_type() -> None:
    parsed = families(prometheus(SAMPLE))
    for metric in METRICS:
        # the parser drops a counter's _total suffix from the family name
        family = parsed[metric.name.removesuffix("_total")]
        assert family.type == metric.kind
        (sample,) = family.samples
        assert sample.value == SAMPLE[metric.section][metric.key]
    responses = parsed["fsmount_http_responses"]
    assert {s.labels["code"]: s.value for s in responses.samples} == {
        "200": 300,
        "206": 930,
        "503": 4,
    }
    services = parsed["fsmount_service_info"].samples
    assert [(s.labels["service"], s.labels["api"]) for s in services] == [
        (s["name"], s["api"]) for s in SAMPLE["services"]
    ]
    assert parsed["fsmount_start_time_seconds"].samples[0].value == SAMPLE["started"]
    assert parsed["fsmount_info"].samples[0].labels == {"mountpoint": "/mnt/fsmount/lab"}


def test_prometheus_text_is_exact_for_a_small_document() -> None:
    document = {"mountpoint": '/mnt/"q"\\x', "fuse": {"reads": 3, "errors": 0}}
    assert prometheus(document) == (
        "# HELP fsmount_info the mount this process serves\n"
        "# TYPE fsmount_info gauge\n"
        'fsmount_info{mountpoint="/mnt/\\"q\\"\\\\x"} 1\n'
        "# HELP fsmount_fuse_reads_total read requests answered\n"
        "# TYPE fsmount_fuse_reads_total counter\n"
        "fsmount_fuse_reads_total 3\n"
        "# HELP fsmount_fuse_errors_total requests answered with an error\n"
        "# TYPE fsmount_fuse_errors_total counter\n"
        "fsmount_fuse_errors_total 0\n"
    )
    assert families(prometheus(document))["fsmount_info"].samples[0].labels == {
        "mountpoint": '/mnt/"q"\\x'
    }


def test_missing_figures_are_left_out_not_shown_as_zero() -> None:
    assert prometheus({}) == ""
    text = prometheus({"cache": {"hits": 5, "misses": "n/a"}, "http": {"by_status": {}}})
    assert set(families(text)) == {"fsmount_cache_hits"}
    assert "misses" not in render({"cache": {"hits": 5}}, now=0)


def test_render_is_a_plain_table_for_people() -> None:
    text = render(SAMPLE, now=SAMPLE["started"] + 2 * 3600 + 3 * 60)
    assert "\x1b[" not in text, "no colour codes when not on a terminal"
    lines = [" ".join(line.split()) for line in text.splitlines()]
    expected = [
        "fsmount at /mnt/fsmount/lab",
        "pid 4242",
        "grand-challenge https://grand-challenge.org/api/v1/",
        "scenario https://api.cloud.scenario.com/v1",
        "cache directory /var/cache/fsmount/lab",
        "disk cache",
        "bytes held in the disk cache 3.0 GiB",
        "disk cache budget 10.0 GiB",
        "block reads served from the cache 900",
        "hit rate 90.0%",
        "downloads in progress 2",
        "HTTP requests sent 1,234",
        "bytes received over HTTP 5.0 GiB",
        "responses by status 200: 300, 206: 930, 503: 4",
        "readers",
        "bytes returned to readers 6.0 GiB",
        "read requests answered 50,000",
        "requests answered with an error 3",
    ]
    for line in expected:
        assert line in lines, f"{line!r} not in:\n{text}"
    assert any(line.startswith("up 2h 03m (since ") for line in lines)


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (3 << 30, "3.0 GiB"), (5 << 40, "5.0 TiB")],
)
def test_sizes_are_shown_in_binary_units(n: int, text: str) -> None:
    assert format_size(n) == text


# --- the control socket ---------------------------------------------------------------------------


def test_control_commands_answer_events_and_a_client_leaving_cancels_its_command(
    runtime_dir: Path, tmp_path: Path
) -> None:
    mountpoint = tmp_path / "mnt"
    path = socket_path(mountpoint)
    ended: list[str] = []

    async def echo(request: dict[str, Any], send: Send) -> None:
        for n in range(3):
            await send({"event": "n", "n": n, "paths": request["paths"]})

    async def silent(request: dict[str, Any], send: Send) -> None:
        if request.get("hello"):
            await send({"event": "hello"})
        try:
            await trio.sleep_forever()
        finally:
            ended.append("cancelled")

    def client() -> None:
        ctl = control_path(path)
        assert ctl.name == path.name.replace(".sock", ".ctl")
        assert stat.S_IMODE(ctl.stat().st_mode) == 0o600
        events = list(control(mountpoint, {"command": "echo", "paths": ["a/b"]}, idle=5))
        assert events == [{"event": "n", "n": n, "paths": ["a/b"]} for n in range(3)]
        unknown = list(control(mountpoint, {"command": "rm -rf"}, idle=5))
        assert unknown == [{"event": "error", "message": "this mount does not know that command"}]
        with pytest.raises(StatusError, match=r"said nothing for 0\.3s"):
            list(control(mountpoint, {"command": "silent"}, idle=0.3))
        events = control(mountpoint, {"command": "silent", "hello": True}, idle=5)
        assert next(events) == {"event": "hello"}
        events.close()  # the client leaves: both silent commands end
        deadline = time.monotonic() + 5
        while len(ended) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ended == ["cancelled", "cancelled"]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_status, path, lambda: SAMPLE)
            commands = {"echo": echo, "silent": silent}
            await nursery.start(serve_control, control_path(path), commands)
            await trio.to_thread.run_sync(client)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert not control_path(path).exists()
