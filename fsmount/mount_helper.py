"""`mount.fsmount`: lets mount(8), /etc/fstab and systemd `.mount` units mount fsmount.

mount(8) runs `/sbin/mount.fsmount SOURCE MOUNTPOINT [-sfnv] [-N NS] [-o OPTIONS] [-t TYPE]`
and expects it to return once the filesystem is mounted. This translates the `-o` options
into `fsmount mount` flags and runs it without `--foreground`, which daemonises and returns 0
only once the mount is up (or fails with its one line on stderr).

- Every `fsmount mount` setting is an option named like its config-file key
  (`cache-dir=/var/cache/fsmount/lab`, `archive=a,archive=b`; `_` may stand for `-`), plus
  `config=PATH` and `log-file=PATH`; a boolean one may stand alone (`allow_other`).
- SOURCE names the mount: with no `config=` option, `/etc/fsmount/SOURCE.toml` is used when it
  exists, the file the systemd unit reads.
- Options meant for mount(8), systemd or other tools are ignored: `_netdev`, `nofail`,
  `x-*` (so `x-systemd.automount`), `comment=...`, `auto`, `noauto`, `defaults`, `user`,
  `users`, `nouser`, `owner`, `group`, `rw`, `ro` (the mount is always read-only), and the
  VFS flags fsmount always sets or that mean nothing here (`nosuid`, `nodev`, `noatime`...).
- Secrets are never options: mount options are visible in `ps` and in the mount table. They
  come from the files the configuration names (`grand-challenge-token-file=...`).

Exit codes follow mount(8): 1 for a bad invocation or option, 32 when mounting fails.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fsmount import config

EXIT_USAGE = 1
EXIT_MOUNT_FAILED = 32

CONFIG_DIR = Path("/etc/fsmount")

IGNORED = frozenset(
    {
        "_netdev",
        "nofail",
        "auto",
        "noauto",
        "defaults",
        "user",
        "users",
        "nouser",
        "owner",
        "group",
        "rw",
        "ro",
        "nosuid",
        "suid",
        "nodev",
        "dev",
        "noexec",
        "exec",
        "atime",
        "noatime",
        "relatime",
        "norelatime",
        "strictatime",
        "lazytime",
        "nolazytime",
        "diratime",
        "nodiratime",
        "async",
        "sync",
        "silent",
        "loud",
    }
)
IGNORED_PREFIXES = ("x-", "comment=")

# Options of `fsmount mount` itself rather than of the configuration.
EXTRA_OPTIONS = {"config": "--config", "log-file": "--log-file"}


class UsageError(Exception):
    """A bad command line or mount option; the message is the one line printed."""


@dataclass
class Invocation:
    """What mount(8) asked for."""

    source: str
    mountpoint: str
    options: list[str] = field(default_factory=list)
    fake: bool = False  # -f: do everything but mount
    sloppy: bool = False  # -s: ignore unknown options instead of failing
    verbose: bool = False


def parse_invocation(argv: Sequence[str]) -> Invocation:
    """mount(8)'s helper command line: two positionals, then short flags in any order."""
    positional: list[str] = []
    options: list[str] = []
    flags: set[str] = set()
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-o", "-t", "-N"):
            if not args:
                raise UsageError(f"{arg} needs a value")
            value = args.pop(0)
            if arg == "-o":
                options += [opt for opt in value.split(",") if opt]
            elif arg == "-N":
                raise UsageError("mounting in another namespace (-N) is not supported")
        elif arg.startswith("-o") and len(arg) > 2:
            options += [opt for opt in arg[2:].split(",") if opt]
        elif arg.startswith("-") and len(arg) > 1:
            unknown = set(arg[1:]) - set("sfnvrwi")
            if unknown:
                raise UsageError(f"unknown flag -{''.join(sorted(unknown))}")
            flags |= set(arg[1:])
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise UsageError("usage: mount.fsmount SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS]")
    return Invocation(
        positional[0],
        positional[1],
        options,
        fake="f" in flags,
        sloppy="s" in flags,
        verbose="v" in flags,
    )


def _flag_table() -> dict[str, config.Option | str]:
    """Option name -> the config Option it sets, or the flag of a command-line-only option."""
    table: dict[str, config.Option | str] = {opt.key: opt for opt in config.OPTIONS}
    table.update(EXTRA_OPTIONS)
    return table


def translate(
    source: str,
    options: Iterable[str],
    *,
    sloppy: bool = False,
    config_dir: Path = CONFIG_DIR,
) -> list[str]:
    """mount options -> `fsmount mount` flags (without the mount point).

    Raises UsageError naming the first unknown or malformed option, unless `sloppy`, where
    an unknown one is skipped with a warning (mount(8)'s `-s`).
    """
    table = _flag_table()
    flags: list[str] = []
    for raw in options:
        if raw in IGNORED or raw.startswith(IGNORED_PREFIXES):
            continue
        name, has_value, value = raw.partition("=")
        key = name.replace("_", "-")
        target = table.get(key)
        if target is None:
            if sloppy:
                print(f"mount.fsmount: ignoring unknown option {name!r}", file=sys.stderr)
                continue
            known = ", ".join(sorted(table))
            raise UsageError(f"unknown mount option {name!r} (fsmount takes: {known})")
        if isinstance(target, config.Option) and target.key in config.BOOLEAN_KEYS:
            try:
                enabled = config.parse_bool(value) if has_value else True
            except ValueError as exc:
                raise UsageError(f"bad value for mount option {name!r}: {exc}") from None
            if enabled:
                flags.append(target.flag)
            continue
        if not has_value or not value:
            raise UsageError(f"mount option {name!r} needs a value ({key}=...)")
        flag = target.flag if isinstance(target, config.Option) else target
        flags.append(f"{flag}={value}")  # one word: a value starting with "-" stays a value
    if not any(f.startswith("--config=") for f in flags) and "/" not in source:
        default = config_dir / f"{source}.toml"
        if default.is_file():
            flags.append(f"--config={default}")
    return flags


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `mount.fsmount`; returns mount(8)'s exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        invocation = parse_invocation(argv)
        flags = translate(invocation.source, invocation.options, sloppy=invocation.sloppy)
    except UsageError as exc:
        print(f"mount.fsmount: {exc}", file=sys.stderr)
        return EXIT_USAGE
    command = ["mount", invocation.mountpoint, *flags]
    if invocation.verbose or invocation.fake:
        print("fsmount " + shlex.join(command), file=sys.stderr)
    if invocation.fake:
        return 0
    from fsmount import cli

    code = cli.main(command)
    return 0 if code == 0 else EXIT_MOUNT_FAILED


if __name__ == "__main__":
    sys.exit(main())
