"""The mount's side of `fsmount status` and of Prometheus: both answer from `collect()`.

The mount serves both from its trio nursery (`serve_status`, and `serve_metrics_on` when a
metrics port is configured). The mount itself shows no status file: the product keeps the tree
free of anything but the services' data. Where the socket lives is `paths.py`'s rule.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path

import trio

from fsmount.errors import StartupError
from fsmount.status.document import Collect, snapshot
from fsmount.status.render import prometheus

log = logging.getLogger(__name__)

CLIENT_DEADLINE = 10.0  # seconds a status or metrics client may take before it is dropped
_MAX_REQUEST_HEAD = 8192
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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
    await serve_unix(
        socket_path,
        partial(_answer, _answer_status, collect),
        "no status socket (fsmount status will not work)",
        task_status,
    )


async def serve_unix(
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
        with trio.move_on_after(CLIENT_DEADLINE):
            try:
                await handler(stream, collect)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                log.debug("status client went away: %s", exc)


async def _answer_status(stream: trio.SocketStream, collect: Collect) -> None:
    body = json.dumps(snapshot(collect), separators=(",", ":")) + "\n"
    await stream.send_all(body.encode())


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
        body = prometheus(snapshot(collect)).encode()
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
