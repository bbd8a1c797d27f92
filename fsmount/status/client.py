"""Asking a running mount: its status document, or a control command and its events.

Blocking sockets, not trio: the callers are command-line programs, which ask and wait. Every
failure is a StatusError whose message is the one line the command prints.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fsmount.errors import StartupError
from fsmount.status.paths import control_path, socket_name, status_dirs


class StatusError(StartupError):
    """No status could be had; the message is the one line `fsmount status` prints.

    A StartupError so that the CLI's existing handler prints it as `fsmount: ...` and exits 1.
    """


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
    with (
        _asking(
            mountpoint,
            refused=(ConnectionRefusedError,),
            refusal=f"is not running (a stale status socket: {path})",
            silence=f"did not answer within {timeout:g}s",
        ),
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock,
    ):
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
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
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock,
        _asking(
            mountpoint,
            refused=(FileNotFoundError, ConnectionRefusedError),
            refusal="takes no commands (is it running a current fsmount?)",
            silence=f"said nothing for {idle:g}s",
        ),
    ):
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
        except ValueError:
            raise StatusError(f"the mount at {mountpoint} sent a garbled answer") from None


@contextlib.contextmanager
def _asking(
    mountpoint: Path,
    *,
    refused: tuple[type[OSError], ...],
    refusal: str,
    silence: str,
) -> Iterator[None]:
    """A failure to talk to the mount, as the one line the command prints: `refusal` when
    the socket turns the client away (`refused`), `silence` when it does not answer in time."""
    try:
        yield
    except refused:
        raise StatusError(f"the mount at {mountpoint} {refusal}") from None
    except TimeoutError:
        raise StatusError(f"the mount at {mountpoint} {silence}") from None
    except OSError as exc:
        raise StatusError(f"cannot ask the mount at {mountpoint}: {exc.strerror}") from None
