"""Configuration: every option once, with its flag, environment variable, file key and default.

Precedence is flag, then environment, then config file, then default. Secrets are never taken
from the command line (every user can read it in `ps`): only from files, or from the
environment variables the official clients read.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsmount.errors import StartupError

LOG_LEVELS = ("debug", "info", "warning", "error")
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """`500M`, `20G`, `1.5T`, `1048576` -> bytes (binary units, optional `B`/`iB`)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 500M, 20G)")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])


def parse_seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a positive number of seconds: {text!r}")
    return value


def _positive(number: int) -> int:
    if number <= 0:
        raise ValueError(f"must be positive: {number}")
    return number


def parse_port(text: str) -> int:
    """A TCP port to listen on, 1-65535."""
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(f"not a TCP port: {text!r}")
    return port


def parse_log_level(text: str) -> str:
    level = text.strip().lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"not a log level: {text!r} (use {', '.join(LOG_LEVELS)})")
    return level


def parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fsmount")


def _default_config_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "fsmount" / "config.toml"


@dataclass(frozen=True)
class Option:
    """One setting; `key` is its config-file key and (with `-` as `_`) its Config attribute."""

    key: str
    flag: str
    env: str | None
    default: Any
    parse: Callable[[str], Any]
    help: str
    repeat: bool = False
    metavar: str | None = None


OPTIONS: tuple[Option, ...] = (
    Option(
        "grand-challenge-url",
        "--grand-challenge-url",
        "GRAND_CHALLENGE_API_URL",
        "https://grand-challenge.org/api/v1/",
        str,
        "Grand Challenge API base URL",
        metavar="URL",
    ),
    Option(
        "grand-challenge-token-file",
        "--grand-challenge-token-file",
        None,
        None,
        str,
        "file holding the Grand Challenge token (one line, optionally after 'Bearer '); "
        "else $GRAND_CHALLENGE_AUTHORIZATION, else $CREDENTIALS_DIRECTORY/grand-challenge-token",
        metavar="PATH",
    ),
    Option(
        "archive",
        "--archive",
        None,
        (),
        str,
        "show only this archive (repeatable)",
        repeat=True,
        metavar="SLUG",
    ),
    Option(
        "scenario-url",
        "--scenario-url",
        "SCENARIO_BASE_URL",
        "https://api.cloud.scenario.com/v1",
        str,
        "Scenario API base URL",
        metavar="URL",
    ),
    Option(
        "scenario-credentials-file",
        "--scenario-credentials-file",
        None,
        None,
        str,
        "file holding the Scenario API key and secret (two lines); else $SCENARIO_SDK_API_KEY"
        " and $SCENARIO_SDK_API_SECRET, else $CREDENTIALS_DIRECTORY/scenario-credentials",
        metavar="PATH",
    ),
    Option(
        "scenario-project",
        "--scenario-project",
        "SCENARIO_PROJECT_ID",
        None,
        str,
        "Scenario project id (default: the key's own project)",
        metavar="ID",
    ),
    Option(
        "cache-dir",
        "--cache-dir",
        "FSMOUNT_CACHE_DIR",
        None,
        str,
        "disk cache directory (default: $CACHE_DIRECTORY under systemd, else"
        " $XDG_CACHE_HOME/fsmount)",
        metavar="DIR",
    ),
    Option(
        "cache-size",
        "--cache-size",
        "FSMOUNT_CACHE_SIZE",
        "10G",
        parse_size,
        "disk cache budget, a hard limit (500M, 20G)",
        metavar="SIZE",
    ),
    Option(
        "timeout",
        "--timeout",
        "FSMOUNT_TIMEOUT",
        60.0,
        parse_seconds,
        "seconds after which a read from a service that does not answer fails (EIO/ETIMEDOUT)",
        metavar="SECONDS",
    ),
    Option(
        "dir-cache-time",
        "--dir-cache-time",
        "FSMOUNT_DIR_CACHE_TIME",
        300.0,
        parse_seconds,
        "seconds a directory listing is used before it is asked for again (behind readers,"
        " who get the last one meanwhile; SIGHUP makes them wait for the new one)",
        metavar="SECONDS",
    ),
    Option(
        "max-entries",
        "--max-entries",
        "FSMOUNT_MAX_ENTRIES",
        100_000,
        lambda text: _positive(int(text)),
        "files and directories the kernel is left holding at once; beyond, the ones used"
        " longest ago are dropped and looked up again if used (bounds memory on huge walks)",
        metavar="N",
    ),
    Option(
        "allow-other",
        "--allow-other",
        "FSMOUNT_ALLOW_OTHER",
        False,
        parse_bool,
        "let other users see the mount (permissions still apply: default_permissions)",
    ),
    Option(
        "metrics-port",
        "--metrics-port",
        "FSMOUNT_METRICS_PORT",
        None,
        parse_port,
        "serve Prometheus metrics at http://127.0.0.1:PORT/metrics (default: off)",
        metavar="PORT",
    ),
    Option(
        "log-level",
        "--log-level",
        "FSMOUNT_LOG_LEVEL",
        "info",
        parse_log_level,
        "debug, info, warning or error",
        metavar="LEVEL",
    ),
)

BOOLEAN_KEYS = frozenset({"allow-other"})


@dataclass(frozen=True)
class Config:
    grand_challenge_url: str
    grand_challenge_token_file: str | None
    archive: tuple[str, ...]
    scenario_url: str
    scenario_credentials_file: str | None
    scenario_project: str | None
    cache_dir: str | None
    cache_size: int
    timeout: float
    dir_cache_time: float
    max_entries: int
    allow_other: bool
    metrics_port: int | None
    log_level: str
    flags: frozenset[str] = frozenset()  # the keys given as flags: secrets' precedence needs it

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir or os.environ.get("CACHE_DIRECTORY") or _default_cache_dir())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option as a flag, its help naming the environment variable and the default."""
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"TOML configuration file (default: {_default_config_file()}, if it exists)",
    )
    for opt in OPTIONS:
        extra = []
        if opt.env:
            extra.append(f"env {opt.env}")
        if opt.default not in (None, (), False):
            extra.append(f"default {opt.default}")
        help_text = opt.help + (f" [{'; '.join(extra)}]" if extra else "")
        if opt.key in BOOLEAN_KEYS:
            parser.add_argument(opt.flag, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(
                opt.flag,
                action="append" if opt.repeat else "store",
                default=None,
                metavar=opt.metavar,
                help=help_text,
            )


def load(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Config:
    """Merge flags, environment, file and defaults; any bad value is one clear error."""
    environ = os.environ if environ is None else environ
    explicit = getattr(args, "config", None)
    path = Path(explicit) if explicit else _default_config_file()
    file_values = _read_file(path, required=bool(explicit))
    values: dict[str, Any] = {}
    flags: set[str] = set()
    for opt in OPTIONS:
        attr = opt.key.replace("-", "_")
        given = getattr(args, attr, None)
        try:
            if given is not None:
                value = tuple(given) if opt.repeat else given
                source = opt.flag
                flags.add(opt.key)
            elif opt.env and environ.get(opt.env):
                value, source = environ[opt.env], f"${opt.env}"
            elif opt.key in file_values:
                value, source = file_values[opt.key], f"{opt.key} in {path}"
            else:
                value, source = opt.default, f"the default of {opt.flag}"
                if not isinstance(value, str):
                    values[attr] = value
                    continue
            values[attr] = _coerce(opt, value)
        except (ValueError, TypeError) as exc:
            raise StartupError(f"bad value for {source}: {exc}") from None
    return Config(**values, flags=frozenset(flags))


def _coerce(opt: Option, value: Any) -> Any:
    if opt.repeat:
        items = [value] if isinstance(value, str) else list(value)
        return tuple(opt.parse(str(v)) for v in items)
    if isinstance(value, bool) and opt.key in BOOLEAN_KEYS:
        return value
    if isinstance(value, int | float) and opt.parse in (parse_seconds, parse_size, parse_port):
        return opt.parse(str(value))
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return opt.parse(value)


def _read_file(path: Path, *, required: bool) -> dict[str, Any]:
    if not path.exists():
        if required:
            raise StartupError(f"configuration file {path} does not exist")
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise StartupError(f"cannot read configuration file {path}: {exc}") from None
    known = {opt.key for opt in OPTIONS}
    for key in data:
        if key not in known:
            raise StartupError(f"unknown key {key!r} in configuration file {path}")
    return data


def read_secret_file(path: str, what: str) -> list[str]:
    """Non-empty lines of a secret file; the error names the file, never its content."""
    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines()]
    except OSError as exc:
        raise StartupError(f"cannot read the {what} file {path}: {exc.strerror}") from None
    return [line for line in lines if line]


def grand_challenge_token_source(
    cfg: Config, environ: Mapping[str, str] | None = None
) -> Callable[[], str] | None:
    """How to (re-)read the Grand Challenge token, or None when none is configured."""
    environ = os.environ if environ is None else environ
    token = environ.get("GRAND_CHALLENGE_AUTHORIZATION", "").strip()
    path = cfg.grand_challenge_token_file
    if token and "grand-challenge-token-file" not in cfg.flags:
        path = None  # flag > environment > file: the variable beats a file the config names
    if not path and not token:
        path = _credential_path(environ, "grand-challenge-token")
    if path:

        def from_file() -> str:
            lines = read_secret_file(path, "Grand Challenge token")
            if not lines:
                raise StartupError(f"the Grand Challenge token file {path} is empty")
            return lines[0].split()[-1]  # the token, optionally after "Bearer "

        return from_file
    if token:
        return lambda: token.split()[-1]
    return None


def scenario_credentials_source(
    cfg: Config, environ: Mapping[str, str] | None = None
) -> Callable[[], tuple[str, str]] | None:
    """How to (re-)read the Scenario key and secret, or None when none are configured."""
    environ = os.environ if environ is None else environ
    key = environ.get("SCENARIO_SDK_API_KEY", "").strip()
    secret = environ.get("SCENARIO_SDK_API_SECRET", "").strip()
    path = cfg.scenario_credentials_file
    if key and secret and "scenario-credentials-file" not in cfg.flags:
        path = None  # flag > environment > file: the variables beat a file the config names
    if not path and not (key and secret):
        path = _credential_path(environ, "scenario-credentials")
    if path:

        def from_file() -> tuple[str, str]:
            lines = read_secret_file(path, "Scenario credentials")
            if len(lines) < 2:
                raise StartupError(
                    f"the Scenario credentials file {path} needs two lines: key, then secret"
                )
            return lines[0], lines[1]

        return from_file
    if key and secret:
        return lambda: (key, secret)
    return None


def _credential_path(environ: Mapping[str, str], name: str) -> str | None:
    """A systemd `LoadCredential=` file, when the unit provides one."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if directory and os.path.exists(os.path.join(directory, name)):
        return os.path.join(directory, name)
    return None
