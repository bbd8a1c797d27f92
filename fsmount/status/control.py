"""The control socket: work only the mount can do, asked for by a command-line client.

`fsmount cache prefetch --batch` asks the mount, over it, to run Scenario exports into its own
block cache (fsmount/export.py); the mount answers with events until the work is done. It is
made, placed and removed as the status socket is (`paths.py`, `server.serve_unix`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import trio

from fsmount.status.server import CLIENT_DEADLINE, serve_unix

log = logging.getLogger(__name__)

Send = Callable[[dict[str, Any]], Awaitable[None]]
"""Sends one event (a JSON object) to the client of a control command."""
Command = Callable[[dict[str, Any], Send], Awaitable[None]]
"""A control command: gets the client's request and sends it events until it is done."""

_MAX_REQUEST_LINE = 1 << 20  # a control request: a command and its arguments (paths)


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
    await serve_unix(
        socket_path,
        partial(_run_command, commands),
        "no control socket (fsmount cache prefetch --batch will not work)",
        task_status,
    )


async def _run_command(commands: Mapping[str, Command], stream: trio.SocketStream) -> None:
    """One control client: its request, then its command, cancelled if the client hangs up."""

    async def send(event: dict[str, Any]) -> None:
        await stream.send_all(json.dumps(event, separators=(",", ":")).encode() + b"\n")

    async with stream:
        try:
            with trio.fail_after(CLIENT_DEADLINE):
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
