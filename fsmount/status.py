"""Status and metrics of a running mount: a Unix socket for `fsmount status`, and Prometheus.

The mount process serves both from its trio nursery (`serve_status`, and `serve_metrics` when a
metrics port is configured); both answer from one `collect()` callable that returns a
snapshot of the mount's counters, so neither ever blocks the filesystem. The mount itself shows
no status file: the product keeps the tree free of anything but the services' data.

The status document (`collect()`'s answer, sent as one JSON object per connection)::

    {
      "mountpoint": "/mnt/fsmount/lab",        # as the mount process was given it
      "pid": 1234,
      "started": 1700000000.0,                  # time.time() when the mount came up
      "services": [{"name": "grand-challenge", "api": "https://grand-challenge.org/api/v1/"}],
                                                # API URLs without userinfo or query strings
      "cache": {"dir": str, "bytes": int, "blocks": int, "budget": int, "hits": int,
                "misses": int, "bytes_fetched": int, "downloads_in_flight": int},
      "http": {"requests": int, "retries": int, "errors": int, "bytes_fetched": int,
               "url_resolves": int, "by_status": {"200": int, "206": int, ...}},
      "fuse": {"bytes_served": int, "reads": int, "errors": int, "xattr_requests": int,
               "entries": int}
    }

Every section and counter is optional for the readers here (`render`, `prometheus`): a missing
one is left out rather than shown as 0, so a partial `collect()` is never mistaken for an idle
mount. Secrets never appear in it: it is readable by whoever can reach the socket.

Where the status socket lives (the same rule for the mount and for `fsmount status`, whatever
environment each runs in, so a system service and an administrator's shell agree):

1. `$FSMOUNT_RUNTIME_DIR`, when set (tests, unusual layouts);
2. root: `/run/fsmount/` (a system unit has no `$XDG_RUNTIME_DIR`, while root's login shell
   has `/run/user/0`; ignoring it keeps both on one directory);
3. others: `$XDG_RUNTIME_DIR/fsmount/`, else `/run/user/<uid>/fsmount/` when that runtime
   directory exists;
4. a fallback under the default cache directory: `${XDG_CACHE_HOME:-~/.cache}/fsmount/run/`.

The socket is `<first 16 hex digits of sha256(mount point)>.sock` in the first of these whose
path fits a Unix socket address; `query` looks in every candidate, so a mount started with a
different environment is still found. The mount point is made absolute and its parent
directory's symlinks are resolved, never the mount point itself: resolving it would ask the
filesystem, which from inside the mount process deadlocks. Directories are created 0700 and
the socket is 0600: only its owner (and root) can ask.

Beside it, `<same digits>.ctl` is the control socket, for work only the mount can do (see
`serve_control`): `fsmount cache prefetch --batch` asks the mount to run Scenario exports into
its own block cache. It is 0600 too, which matters more here: whoever can ask could spend the
account's credits.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, TextIO

import trio

from fsmount.errors import StartupError
from fsmount.mountinfo import MOUNTINFO, read_mounts

log = logging.getLogger(__name__)

Collect = Callable[[], dict[str, Any]]
"""Returns the status document above; called once per status or metrics request."""

Send = Callable[[dict[str, Any]], Awaitable[None]]
"""Sends one event (a JSON object) to the client of a control command."""
Command = Callable[[dict[str, Any], Send], Awaitable[None]]
"""A control command: gets the client's request and sends it events until it is done."""

RUNTIME_DIR_ENV = "FSMOUNT_RUNTIME_DIR"
SOCKET_SUFFIX = ".sock"
CONTROL_SUFFIX = ".ctl"  # no longer than SOCKET_SUFFIX, so it fits wherever the status socket does
_MAX_REQUEST_LINE = 1 << 20  # a control request: a command and its arguments (paths)
_MAX_SOCKET_PATH = 107  # sun_path is 108 bytes, NUL included
_CLIENT_DEADLINE = 10.0  # seconds a status or metrics client may take before it is dropped
_MAX_REQUEST_HEAD = 8192
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class StatusError(StartupError):
    """No status could be had; the message is the one line `fsmount status` prints.

    A StartupError so that the CLI's existing handler prints it as `fsmount: ...` and exits 1.
    """


# ---------------------------------------------------------------------------------------------
# Where the socket is


def _mount_key(mountpoint: Path) -> str:
    """The mount point as a stable string, without touching the mount itself (see above)."""
    absolute = os.path.abspath(mountpoint)
    parent, name = os.path.split(absolute)
    return os.path.join(os.path.realpath(parent), name) if name else absolute


def socket_name(mountpoint: Path) -> str:
    """The socket's file name: a hash, so any mount point gives a short, safe name."""
    digest = hashlib.sha256(os.fsencode(_mount_key(mountpoint))).hexdigest()
    return digest[:16] + SOCKET_SUFFIX


def status_dirs(environ: Mapping[str, str] | None = None) -> list[Path]:
    """Candidate socket directories, preferred first (the rule in the module docstring)."""
    environ = os.environ if environ is None else environ
    if environ.get(RUNTIME_DIR_ENV):
        return [Path(environ[RUNTIME_DIR_ENV])]
    uid = os.geteuid()
    dirs: list[Path] = []
    if uid == 0:
        dirs.append(Path("/run/fsmount"))
    else:
        if environ.get("XDG_RUNTIME_DIR"):
            dirs.append(Path(environ["XDG_RUNTIME_DIR"]) / "fsmount")
        user_run = Path(f"/run/user/{uid}")
        with contextlib.suppress(OSError):
            if user_run.is_dir() and user_run.stat().st_uid == uid:
                dirs.append(user_run / "fsmount")
    cache = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    dirs.append(Path(cache) / "fsmount" / "run")
    return list(dict.fromkeys(dirs))  # without duplicates, order kept


def socket_path(mountpoint: Path, environ: Mapping[str, str] | None = None) -> Path:
    """Where the mount at `mountpoint` serves its status (the first usable candidate)."""
    name = socket_name(mountpoint)
    candidates = status_dirs(environ)
    for directory in candidates:
        path = directory / name
        if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
            continue
        if directory.is_dir() or directory.parent.is_dir():
            return path
    return candidates[-1] / name  # the cache fallback; serve_status creates it


def control_path(status_socket: Path) -> Path:
    """The control socket of the mount whose status socket is `status_socket`: beside it."""
    return status_socket.with_suffix(CONTROL_SUFFIX)


def running_mounts(owner: int | None = None, mountinfo: str = MOUNTINFO) -> list[Path]:
    """Mount points of fsmount mounts (type `fuse.fsmount`), optionally only `owner`'s."""
    return [
        Path(entry.mount_point)
        for entry in read_mounts(mountinfo)
        if entry.fstype == "fuse.fsmount"
        and (owner is None or entry.super_option("user_id") == str(owner))
    ]


# ---------------------------------------------------------------------------------------------
# Serving


def _document(collect: Collect) -> dict[str, Any]:
    """collect()'s answer, or an error document: a bug there must not kill the server."""
    try:
        return collect()
    except Exception as exc:
        log.exception("cannot collect the status")
        return {"error": f"cannot collect the status: {exc!r}"}


async def serve_status(
    socket_path: Path,
    collect: Collect,
    *,
    task_status: trio.TaskStatus[Path | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer every connection to `socket_path` with the status document, until cancelled.

    The socket is bound under a temporary name, made 0600 and renamed into place, so it is
    never reachable with a looser mode and a stale socket from a crashed mount is replaced
    atomically. It is removed on exit unless another process has replaced it meanwhile.
    `task_status.started` reports the path once connections are accepted, or None when the
    socket cannot be made: that is logged, and the mount carries on without a status.
    """
    await _serve_unix(
        socket_path,
        partial(_answer, _answer_status, collect),
        "no status socket (fsmount status will not work)",
        task_status,
    )


async def serve_control(
    socket_path: Path,
    commands: Mapping[str, Command],
    *,
    task_status: trio.TaskStatus[Path | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the commands clients ask for on `socket_path`, until cancelled.

    A client sends one request, a JSON object on one line: `{"command": NAME, ...}`. The
    command answers with events, one JSON object a line, and the connection closes when it is
    done; a failure is the event `{"event": "error", "message": ...}`. Commands may run for
    minutes, so there is no deadline beyond the request's own; a client that hangs up cancels
    its command. The socket is made and removed as the status socket is.
    """
    await _serve_unix(
        socket_path,
        partial(_run_command, commands),
        "no control socket (fsmount cache prefetch --batch will not work)",
        task_status,
    )


async def _serve_unix(
    socket_path: Path,
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    unavailable: str,
    task_status: trio.TaskStatus[Path | None],
) -> None:
    """Serve `handler` on a Unix socket bound at `socket_path` (see `serve_status`)."""
    try:
        sock, inode = await _bind_status_socket(socket_path)
    except OSError as exc:
        log.warning("%s: %s", unavailable, exc)
        task_status.started(None)
        return
    try:
        task_status.started(socket_path)
        await trio.serve_listeners(handler, [trio.SocketListener(sock)])
    finally:
        with contextlib.suppress(OSError):
            if os.stat(socket_path).st_ino == inode:
                socket_path.unlink()


async def _bind_status_socket(socket_path: Path) -> tuple[trio.socket.SocketType, int]:
    """A listening socket at `socket_path` (0600), and its inode."""
    socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = socket_path.with_name(f".{socket_path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(os.fspath(temporary))
        os.chmod(temporary, 0o600)
        os.rename(temporary, socket_path)
        sock.listen(16)
        return sock, os.stat(socket_path).st_ino
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise


async def _answer(
    handler: Callable[[trio.SocketStream, Collect], Awaitable[None]],
    collect: Collect,
    stream: trio.SocketStream,
) -> None:
    """Run one client's handler; nothing a client does may take the mount down with it."""
    async with stream:
        with trio.move_on_after(_CLIENT_DEADLINE):
            try:
                await handler(stream, collect)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                log.debug("status client went away: %s", exc)


async def _answer_status(stream: trio.SocketStream, collect: Collect) -> None:
    body = json.dumps(_document(collect), separators=(",", ":")) + "\n"
    await stream.send_all(body.encode())


async def _run_command(commands: Mapping[str, Command], stream: trio.SocketStream) -> None:
    """One control client: its request, then its command, cancelled if the client hangs up."""

    async def send(event: dict[str, Any]) -> None:
        await stream.send_all(json.dumps(event, separators=(",", ":")).encode() + b"\n")

    async with stream:
        try:
            with trio.fail_after(_CLIENT_DEADLINE):
                request, rest = await _read_line(stream)
            document = json.loads(request)
            name = document.get("command") if isinstance(document, dict) else None
            command = commands.get(name) if isinstance(name, str) else None
            if rest or command is None:
                await send({"event": "error", "message": "this mount does not know that command"})
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_hangup, stream, nursery.cancel_scope)
                try:
                    await command(document, send)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    log.debug("control client went away: %s", exc)
                except Exception:
                    log.exception("control command %s failed", name)
                    failed = {"event": "error", "message": "the mount failed (its log says why)"}
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await send(failed)
                finally:
                    nursery.cancel_scope.cancel()
        except (trio.TooSlowError, ValueError) as exc:
            log.debug("bad control request: %r", exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("control client went away: %s", exc)


async def _cancel_on_hangup(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
    """Cancel `scope` when the client hangs up (it sends nothing after its request)."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        while await stream.receive_some(4096):
            pass
    scope.cancel()


async def _read_line(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    """The first line the client sends (without its newline), and whatever came after it."""
    data = b""
    while b"\n" not in data:
        if len(data) > _MAX_REQUEST_LINE:
            raise ValueError("control request too long")
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise ValueError("control request cut short")
        data += chunk
    line, _, rest = data.partition(b"\n")
    return line, rest


async def open_metrics_listeners(port: int, host: str = "127.0.0.1") -> list[trio.SocketListener]:
    """Bind the metrics port; a port in use is a StartupError, raised before anything mounts."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise StartupError(
            f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
        ) from None


async def serve_metrics(
    port: int,
    collect: Collect,
    *,
    host: str = "127.0.0.1",
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `GET /metrics` (Prometheus text format 0.0.4) on host:port until cancelled.

    Loopback only by default: the figures say which archives are read and how much, and a
    scraper on another host can go through a reverse proxy. Port 0 picks a free port, which
    `task_status.started` reports.
    """
    listeners = await open_metrics_listeners(port, host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await serve_metrics_on(listeners, collect)


async def serve_metrics_on(listeners: Sequence[trio.SocketListener], collect: Collect) -> None:
    """`serve_metrics` on listeners bound beforehand (see `open_metrics_listeners`)."""
    await trio.serve_listeners(partial(_answer, _answer_http, collect), list(listeners))


async def _answer_http(stream: trio.SocketStream, collect: Collect) -> None:
    head = await _read_request_head(stream)
    if head is None:
        return
    method, _, rest = head.partition(" ")
    path = rest.partition(" ")[0].partition("?")[0]
    if path != "/metrics":
        response = _http_response(404, "Not Found", b"not found: try /metrics\n")
    elif method not in ("GET", "HEAD"):
        response = _http_response(
            405, "Method Not Allowed", b"use GET\n", extra="Allow: GET, HEAD\r\n"
        )
    else:
        body = prometheus(_document(collect)).encode()
        response = _http_response(200, "OK", body, content_type=PROMETHEUS_CONTENT_TYPE)
        if method == "HEAD":
            response = response[: response.index(b"\r\n\r\n") + 4]
    await stream.send_all(response)


async def _read_request_head(stream: trio.SocketStream) -> str | None:
    """The request line, once the whole head has arrived; None for a bad or huge request."""
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > _MAX_REQUEST_HEAD:
            return None
        chunk = await stream.receive_some(4096)
        if not chunk:
            return None
        data += chunk
    return data.split(b"\r\n", 1)[0].decode("latin-1")


def _http_response(
    code: int,
    reason: str,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    extra: str = "",
) -> bytes:
    head = (
        f"HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    )
    return head.encode() + body


# ---------------------------------------------------------------------------------------------
# Asking


def find_socket(mountpoint: Path, environ: Mapping[str, str] | None = None) -> Path:
    """The status socket of the mount at `mountpoint`, looking in every candidate directory."""
    name = socket_name(mountpoint)
    for directory in status_dirs(environ):
        if (directory / name).exists():
            return directory / name
    raise StatusError(
        f"no status socket for {mountpoint}: is it an fsmount mount, started by this user?"
    )


def query(mountpoint: Path, timeout: float = 5) -> dict[str, Any]:
    """The status document of the mount at `mountpoint`; StatusError if it cannot be had."""
    path = find_socket(mountpoint)
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(os.fspath(path))
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
    except ConnectionRefusedError:
        raise StatusError(
            f"the mount at {mountpoint} is not running (a stale status socket: {path})"
        ) from None
    except TimeoutError:
        raise StatusError(f"the mount at {mountpoint} did not answer within {timeout:g}s") from None
    except OSError as exc:
        raise StatusError(f"cannot ask the mount at {mountpoint}: {exc.strerror}") from None
    try:
        document = json.loads(b"".join(chunks))
    except ValueError:
        raise StatusError(f"the mount at {mountpoint} sent a garbled status") from None
    if not isinstance(document, dict):
        raise StatusError(f"the mount at {mountpoint} sent a garbled status")
    if "error" in document:
        raise StatusError(f"the mount at {mountpoint}: {document['error']}")
    return document


def control(
    mountpoint: Path, request: Mapping[str, Any], *, idle: float
) -> Iterator[dict[str, Any]]:
    """Send `request` to the mount's control socket; yield the events it answers, until it
    closes the connection. StatusError when the mount cannot be asked, says nothing for `idle`
    seconds, or sends something that is not an event. Closing the generator hangs up, which
    cancels the command in the mount."""
    path = control_path(find_socket(mountpoint))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(idle)
        try:
            sock.connect(os.fspath(path))
            sock.sendall(json.dumps(dict(request)).encode() + b"\n")
            pending = b""
            while chunk := sock.recv(65536):
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    event = json.loads(line)
                    if not isinstance(event, dict):
                        raise ValueError(line)
                    yield event
            if pending:
                raise ValueError(pending)
        except (FileNotFoundError, ConnectionRefusedError):
            raise StatusError(
                f"the mount at {mountpoint} takes no commands (is it running a current fsmount?)"
            ) from None
        except TimeoutError:
            raise StatusError(f"the mount at {mountpoint} said nothing for {idle:g}s") from None
        except OSError as exc:
            raise StatusError(f"cannot ask the mount at {mountpoint}: {exc.strerror}") from None
        except ValueError:
            raise StatusError(f"the mount at {mountpoint} sent a garbled answer") from None


def command(mountpoints: Sequence[str], *, as_json: bool = False, out: TextIO | None = None) -> int:
    """`fsmount status [MOUNTPOINT...]`: every named mount, or all of this user's; exit code.

    One error line per mount that does not answer, so it doubles as a health check: 0 only
    when every mount answered.
    """
    out = out or sys.stdout
    targets = [Path(m) for m in mountpoints] or running_mounts(owner=os.geteuid())
    if not targets:
        raise StatusError("no fsmount mount of this user is running")
    code = 0
    for mountpoint in targets:
        try:
            document = query(mountpoint)
        except StatusError as exc:
            print(f"fsmount: {exc}", file=sys.stderr)
            code = 1
            continue
        out.write(json.dumps(document) + "\n" if as_json else render(document))
    return code


# ---------------------------------------------------------------------------------------------
# Showing


@dataclass(frozen=True, slots=True)
class Metric:
    """One counter of the status document, named once for both the table and Prometheus."""

    section: str  # "cache", "http" or "fuse"
    key: str
    name: str  # the Prometheus name
    kind: Literal["counter", "gauge"]
    help: str  # Prometheus HELP, and the row's label in `render`
    unit: Literal["", "bytes"] = ""


METRICS: tuple[Metric, ...] = (
    Metric(
        "cache", "bytes", "fsmount_cache_bytes", "gauge", "bytes held in the disk cache", "bytes"
    ),
    Metric("cache", "blocks", "fsmount_cache_blocks", "gauge", "blocks held in the disk cache"),
    Metric("cache", "budget", "fsmount_cache_budget_bytes", "gauge", "disk cache budget", "bytes"),
    Metric(
        "cache", "hits", "fsmount_cache_hits_total", "counter", "block reads served from the cache"
    ),
    Metric(
        "cache",
        "misses",
        "fsmount_cache_misses_total",
        "counter",
        "block reads that waited for a download",
    ),
    Metric(
        "cache",
        "bytes_fetched",
        "fsmount_cache_fetched_bytes_total",
        "counter",
        "bytes downloaded into the cache",
        "bytes",
    ),
    Metric(
        "cache",
        "downloads_in_flight",
        "fsmount_cache_downloads_in_flight",
        "gauge",
        "downloads in progress",
    ),
    Metric("http", "requests", "fsmount_http_requests_total", "counter", "HTTP requests sent"),
    Metric(
        "http",
        "retries",
        "fsmount_http_retries_total",
        "counter",
        "HTTP requests retried after a transient failure",
    ),
    Metric(
        "http",
        "errors",
        "fsmount_http_errors_total",
        "counter",
        "HTTP operations that failed for good",
    ),
    Metric(
        "http",
        "bytes_fetched",
        "fsmount_http_fetched_bytes_total",
        "counter",
        "bytes received over HTTP",
        "bytes",
    ),
    Metric(
        "http",
        "url_resolves",
        "fsmount_http_url_resolves_total",
        "counter",
        "signed download URLs obtained",
    ),
    Metric(
        "fuse",
        "bytes_served",
        "fsmount_fuse_served_bytes_total",
        "counter",
        "bytes returned to readers",
        "bytes",
    ),
    Metric("fuse", "reads", "fsmount_fuse_reads_total", "counter", "read requests answered"),
    Metric(
        "fuse",
        "errors",
        "fsmount_fuse_errors_total",
        "counter",
        "requests answered with an error",
    ),
    Metric(
        "fuse",
        "entries",
        "fsmount_fuse_entries",
        "gauge",
        "files and directories the kernel holds",
    ),
    Metric(
        "fuse",
        "xattr_requests",
        "fsmount_fuse_xattr_requests_total",
        "counter",
        "extended attribute requests answered",
    ),
)

METRICS_BY_KEY = {(m.section, m.key): m for m in METRICS}
SECTION_TITLES = {"cache": "disk cache", "http": "HTTP", "fuse": "readers"}


def _value(status: Mapping[str, Any], metric: Metric) -> int | float | None:
    section = status.get(metric.section)
    value = section.get(metric.key) if isinstance(section, Mapping) else None
    return value if _is_number(value) else None


def _by_status(status: Mapping[str, Any]) -> dict[str, int]:
    http = status.get("http")
    by_status = http.get("by_status") if isinstance(http, Mapping) else None
    if not isinstance(by_status, Mapping):
        return {}
    return {str(code): count for code, count in sorted(by_status.items()) if _is_number(count)}


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def format_size(n: float) -> str:
    """Binary units, as the cache size is given (`10G` is 10 GiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s"


def _summary_rows(status: Mapping[str, Any], now: float) -> Iterable[tuple[str, str]]:
    if "pid" in status:
        yield "pid", str(status["pid"])
    if _is_number(status.get("started")):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status["started"]))
        yield "up", f"{format_duration(now - status['started'])} (since {started})"
    for service in status.get("services") or ():
        yield str(service.get("name", "?")), str(service.get("api", ""))
    cache = status.get("cache")
    if isinstance(cache, Mapping) and cache.get("dir"):
        yield "cache directory", str(cache["dir"])


def _section_rows(status: Mapping[str, Any], section: str) -> Iterable[tuple[str, str]]:
    for metric in METRICS:
        if metric.section != section:
            continue
        value = _value(status, metric)
        if value is not None:
            yield metric.help, format_size(value) if metric.unit == "bytes" else f"{value:,}"
    if section == "cache":
        hits = _value(status, METRICS_BY_KEY["cache", "hits"])
        misses = _value(status, METRICS_BY_KEY["cache", "misses"])
        if hits is not None and misses is not None and hits + misses:
            yield "hit rate", f"{100 * hits / (hits + misses):.1f}%"
    if section == "http" and (codes := _by_status(status)):
        yield "responses by status", ", ".join(f"{code}: {n:,}" for code, n in codes.items())


def render(status: Mapping[str, Any], *, now: float | None = None, width: int = 100) -> str:
    """The status document as a table for people (plain text: no colour codes to paste)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    now = time.time() if now is None else now
    table = Table(
        title=f"fsmount at {status.get('mountpoint', '?')}",
        title_justify="left",
        show_header=False,
        box=box.SIMPLE,
    )
    table.add_column("what", no_wrap=True)
    table.add_column("value", overflow="fold")
    for label, value in _summary_rows(status, now):
        table.add_row(label, value)
    for section, title in SECTION_TITLES.items():
        rows = list(_section_rows(status, section))
        if rows:
            table.add_section()
            table.add_row(f"[bold]{title}[/bold]", "")
            for label, value in rows:
                table.add_row(f"  {label}", value)
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None, force_terminal=False).print(table)
    return "".join(line.rstrip() + "\n" for line in buffer.getvalue().splitlines())


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _sample(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


def _family(
    name: str, kind: str, help_text: str, samples: Iterable[tuple[str, float]]
) -> list[str]:
    """One metric family: HELP, TYPE and its samples (`labels` already formatted)."""
    lines = [f"# HELP {name} {_escape_help(help_text)}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{labels} {_sample(value)}" for labels, value in samples]
    return lines


def prometheus(status: Mapping[str, Any]) -> str:
    """The status document in the Prometheus text exposition format, version 0.0.4."""
    lines: list[str] = []
    if "mountpoint" in status:
        labels = f'{{mountpoint="{_escape_label(str(status["mountpoint"]))}"}}'
        lines += _family("fsmount_info", "gauge", "the mount this process serves", [(labels, 1)])
    if _is_number(status.get("started")):
        lines += _family(
            "fsmount_start_time_seconds",
            "gauge",
            "when the mount came up, in seconds since the epoch",
            [("", status["started"])],
        )
    services = [
        (
            f'{{service="{_escape_label(str(s.get("name", "")))}",'
            f'api="{_escape_label(str(s.get("api", "")))}"}}',
            1,
        )
        for s in status.get("services") or ()
        if isinstance(s, Mapping)
    ]
    if services:
        lines += _family("fsmount_service_info", "gauge", "a service this mount shows", services)
    for metric in METRICS:
        value = _value(status, metric)
        if value is not None:
            lines += _family(metric.name, metric.kind, metric.help, [("", value)])
    codes = _by_status(status)
    if codes:
        lines += _family(
            "fsmount_http_responses_total",
            "counter",
            "HTTP responses received, by status code",
            [(f'{{code="{_escape_label(code)}"}}', n) for code, n in codes.items()],
        )
    return "\n".join(lines) + "\n" if lines else ""
