"""Where a mount's status and control sockets are: one rule for the mount and its clients.

The same rule holds for the mount and for `fsmount status`, whatever environment each runs
in, so a system service and an administrator's shell agree:

1. `$FSMOUNT_RUNTIME_DIR`, when set (tests, unusual layouts);
2. root: `/run/fsmount/` (a system unit has no `$XDG_RUNTIME_DIR`, while root's login shell
   has `/run/user/0`; ignoring it keeps both on one directory);
3. others: `$XDG_RUNTIME_DIR/fsmount/`, else `/run/user/<uid>/fsmount/` when that runtime
   directory exists;
4. a fallback under the default cache directory: `${XDG_CACHE_HOME:-~/.cache}/fsmount/run/`.

The socket is `<first 16 hex digits of sha256(mount point)>.sock` in the first of these whose
path fits a Unix socket address; `client.find_socket` looks in every candidate, so a mount started
with a different environment is still found. The mount point is made absolute and its parent
directory's symlinks are resolved, never the mount point itself: resolving it would ask the
filesystem, which from inside the mount process deadlocks. Directories are created 0700 and
the socket is 0600: only its owner (and root) can ask.

Beside it, `<same digits>.ctl` is the control socket, for work only the mount can do (see
`server.serve_control`): `fsmount cache prefetch --batch` asks the mount to run Scenario
exports into its own block cache. It is 0600 too, which matters more here: whoever can ask
could spend the account's credits.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

RUNTIME_DIR_ENV = "FSMOUNT_RUNTIME_DIR"
SOCKET_SUFFIX = ".sock"
CONTROL_SUFFIX = ".ctl"  # no longer than SOCKET_SUFFIX, so it fits wherever the status socket does
_MAX_SOCKET_PATH = 107  # sun_path is 108 bytes, NUL included


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
