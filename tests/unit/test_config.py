"""Configuration: flag > environment > file > default, one clear error per bad input, `--help`,
and the translation of mount(8) options (`mount.fsmount`) into the same flags."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fsmount import cli, config, mount_helper
from fsmount.errors import StartupError
from fsmount.logs import setup_logging


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return parser.parse_args(list(argv))


def load(
    tmp_path: Path, *flags: str, env: dict[str, str] | None = None, file: str | None = None
) -> config.Config:
    """config.load with exactly these flags, this environment and this config file's text."""
    path = tmp_path / "fsmount.toml"
    path.write_text(file or "")
    return config.load(parse("--config", str(path), *flags), environ=env or {})


# Each case: the option, then the (flag value, env value, file text, expected value) layers.
PRECEDENCE = {
    "cache-size": (
        ("--cache-size", "1G", 1 << 30),
        ("FSMOUNT_CACHE_SIZE", "2G", 2 << 30),
        ('cache-size = "3G"', 3 << 30),
        10 << 30,
    ),
    "grand-challenge-url": (
        ("--grand-challenge-url", "http://flag/", "http://flag/"),
        ("GRAND_CHALLENGE_API_URL", "http://env/", "http://env/"),
        ('grand-challenge-url = "http://file/"', "http://file/"),
        "https://grand-challenge.org/api/v1/",
    ),
    "timeout": (
        ("--timeout", "5", 5.0),
        ("FSMOUNT_TIMEOUT", "6.5", 6.5),
        ("timeout = 7", 7.0),
        60.0,
    ),
    "dir-cache-time": (
        ("--dir-cache-time", "1", 1.0),
        ("FSMOUNT_DIR_CACHE_TIME", "2", 2.0),
        ("dir-cache-time = 3.5", 3.5),
        300.0,
    ),
    "scenario-project": (
        ("--scenario-project", "flag-project", "flag-project"),
        ("SCENARIO_PROJECT_ID", "env-project", "env-project"),
        ('scenario-project = "file-project"', "file-project"),
        None,
    ),
    "log-level": (
        ("--log-level", "debug", "debug"),
        ("FSMOUNT_LOG_LEVEL", "warning", "warning"),
        ('log-level = "error"', "error"),
        "info",
    ),
}


@pytest.mark.parametrize("key", sorted(PRECEDENCE))
def test_flag_beats_environment_beats_file_beats_default(tmp_path: Path, key: str) -> None:
    (flag, flag_value, from_flag), (env_name, env_value, from_env), (line, from_file), default = (
        PRECEDENCE[key]
    )
    attr = key.replace("-", "_")
    env = {env_name: env_value}
    assert getattr(load(tmp_path, flag, flag_value, env=env, file=line), attr) == from_flag
    assert getattr(load(tmp_path, env=env, file=line), attr) == from_env
    assert getattr(load(tmp_path, file=line), attr) == from_file
    assert getattr(load(tmp_path), attr) == default


def test_boolean_option_from_every_layer(tmp_path: Path) -> None:
    assert load(tmp_path).allow_other is False
    assert load(tmp_path, file="allow-other = true").allow_other is True
    assert load(tmp_path, file='allow-other = "yes"').allow_other is True
    # an explicit "no" in the environment beats the file's yes
    env = {"FSMOUNT_ALLOW_OTHER": "no"}
    assert load(tmp_path, env=env, file="allow-other = true").allow_other is False
    assert load(tmp_path, "--allow-other", env=env).allow_other is True


def test_repeated_option_from_flags_or_file(tmp_path: Path) -> None:
    assert load(tmp_path).archive == ()
    assert load(tmp_path, file='archive = ["a", "b"]').archive == ("a", "b")
    assert load(tmp_path, file='archive = "solo"').archive == ("solo",)
    flags = ("--archive", "x", "--archive", "y")
    assert load(tmp_path, *flags, file='archive = ["a"]').archive == ("x", "y")


def test_the_default_config_file_is_read_when_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert config.load(parse(), environ={}).cache_size == 10 << 30  # absent: no error
    (tmp_path / "fsmount").mkdir()
    (tmp_path / "fsmount" / "config.toml").write_text('cache-size = "500M"\n')
    assert config.load(parse(), environ={}).cache_size == 500 << 20


def test_cache_directory_falls_back_to_systemd_then_xdg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg-cache")
    monkeypatch.delenv("CACHE_DIRECTORY", raising=False)
    assert load(tmp_path).cache_path == Path("/xdg-cache/fsmount")
    monkeypatch.setenv("CACHE_DIRECTORY", "/var/cache/fsmount/lab")
    assert load(tmp_path).cache_path == Path("/var/cache/fsmount/lab")
    assert load(tmp_path, file='cache-dir = "/file"').cache_path == Path("/file")
    assert load(tmp_path, "--cache-dir", "/flag").cache_path == Path("/flag")


def test_systemd_credentials_are_read_when_nothing_else_is_given(tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "grand-challenge-token").write_text("Bearer gc-secret\n")
    (creds / "scenario-credentials").write_text("the-key\nthe-secret\n")
    cfg = load(tmp_path)
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    gc = config.grand_challenge_token_source(cfg, env)
    scenario = config.scenario_credentials_source(cfg, env)
    assert gc is not None and gc() == "gc-secret"
    assert scenario is not None and scenario() == ("the-key", "the-secret")
    assert config.grand_challenge_token_source(cfg, {}) is None
    assert config.scenario_credentials_source(cfg, {}) is None


def test_environment_secrets_beat_systemd_credentials_as_help_says(tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "grand-challenge-token").write_text("from-credentials\n")
    (creds / "scenario-credentials").write_text("cred-key\ncred-secret\n")
    env = {
        "CREDENTIALS_DIRECTORY": str(creds),
        "GRAND_CHALLENGE_AUTHORIZATION": "Bearer from-env",
        "SCENARIO_SDK_API_KEY": "env-key",
        "SCENARIO_SDK_API_SECRET": "env-secret",
    }
    cfg = load(tmp_path)
    gc = config.grand_challenge_token_source(cfg, env)
    scenario = config.scenario_credentials_source(cfg, env)
    assert gc is not None and scenario is not None
    assert (gc(), scenario()) == ("from-env", ("env-key", "env-secret"))


def test_secret_files_follow_flag_then_environment_then_config_file(tmp_path: Path) -> None:
    (tmp_path / "flag-token").write_text("from-flag-file\n")
    (tmp_path / "file-token").write_text("from-config-file\n")
    (tmp_path / "flag-creds").write_text("flag-key\nflag-secret\n")
    (tmp_path / "file-creds").write_text("file-key\nfile-secret\n")
    env = {
        "GRAND_CHALLENGE_AUTHORIZATION": "from-env",
        "SCENARIO_SDK_API_KEY": "env-key",
        "SCENARIO_SDK_API_SECRET": "env-secret",
    }
    file = (
        f'grand-challenge-token-file = "{tmp_path / "file-token"}"\n'
        f'scenario-credentials-file = "{tmp_path / "file-creds"}"\n'
    )

    def secrets(cfg: config.Config, environ: dict[str, str]) -> tuple[str, tuple[str, str]]:
        gc = config.grand_challenge_token_source(cfg, environ)
        scenario = config.scenario_credentials_source(cfg, environ)
        assert gc is not None and scenario is not None
        return gc(), scenario()

    flags = (
        *("--grand-challenge-token-file", str(tmp_path / "flag-token")),
        *("--scenario-credentials-file", str(tmp_path / "flag-creds")),
    )
    assert secrets(load(tmp_path, *flags, file=file), env) == (
        "from-flag-file",
        ("flag-key", "flag-secret"),
    )
    assert secrets(load(tmp_path, file=file), env) == ("from-env", ("env-key", "env-secret"))
    assert secrets(load(tmp_path, file=file), {}) == (
        "from-config-file",
        ("file-key", "file-secret"),
    )


def test_no_secret_is_ever_taken_from_the_command_line() -> None:
    for opt in config.OPTIONS:
        if any(word in opt.key for word in ("token", "credential", "secret", "password")):
            assert opt.key.endswith("-file"), f"{opt.flag} would put a secret in `ps`"


# --- one clear error ----------------------------------------------------------------------------


def startup_error(tmp_path: Path, *flags: str, **kwargs: Any) -> str:
    with pytest.raises(StartupError) as caught:
        load(tmp_path, *flags, **kwargs)
    message = str(caught.value)
    assert "\n" not in message, "one line"
    return message


def test_unknown_key_in_the_file_is_named(tmp_path: Path) -> None:
    message = startup_error(tmp_path, file='cache-size = "1G"\ncache_sise = "2G"\n')
    assert "unknown key 'cache_sise'" in message
    assert str(tmp_path / "fsmount.toml") in message


def test_a_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    message = startup_error(tmp_path, file="cache-size = 1G = 2\n")
    assert message.startswith(f"cannot read configuration file {tmp_path / 'fsmount.toml'}")


def test_a_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match=r"configuration file .*nope\.toml does not exist"):
        config.load(parse("--config", str(tmp_path / "nope.toml")), environ={})


@pytest.mark.parametrize(
    ("flags", "env", "file", "names", "says"),
    [
        (("--cache-size", "lots"), {}, None, "--cache-size", "not a size: 'lots'"),
        ((), {"FSMOUNT_CACHE_SIZE": "12Q"}, None, "$FSMOUNT_CACHE_SIZE", "not a size"),
        ((), {}, 'cache-size = "-1G"', "cache-size in", "not a size"),
        ((), {}, "cache-size = [1]", "cache-size in", "expected a string"),
        (("--timeout", "soon"), {}, None, "--timeout", "soon"),
        (("--timeout", "0"), {}, None, "--timeout", "positive number of seconds"),
        ((), {"FSMOUNT_DIR_CACHE_TIME": "-5"}, None, "$FSMOUNT_DIR_CACHE_TIME", "positive"),
        ((), {}, 'timeout = "ten"', "timeout in", "ten"),
        ((), {"FSMOUNT_ALLOW_OTHER": "maybe"}, None, "$FSMOUNT_ALLOW_OTHER", "not a boolean"),
        ((), {}, 'allow-other = "perhaps"', "allow-other in", "not a boolean"),
        ((), {}, "grand-challenge-url = 5", "grand-challenge-url in", "expected a string"),
    ],
)
def test_a_bad_value_is_one_error_naming_where_it_came_from(
    tmp_path: Path,
    flags: tuple[str, ...],
    env: dict[str, str],
    file: str | None,
    names: str,
    says: str,
) -> None:
    message = startup_error(tmp_path, *flags, env=env, file=file)
    assert message.startswith(f"bad value for {names}"), message
    assert says in message


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_timeout_must_be_finite(tmp_path: Path, value: str) -> None:
    startup_error(tmp_path, "--timeout", value)


def test_help_lists_every_option_with_its_environment_variable_and_default() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fsmount", "mount", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "300"},  # argparse splits long words (URLs) to fit
        timeout=60,
    )
    text = " ".join(result.stdout.split())
    assert "--config PATH" in text
    for opt in config.OPTIONS:
        assert opt.flag in text, opt.flag
        if opt.env:
            assert f"env {opt.env}" in text, opt.env
        if opt.default not in (None, (), False):
            assert f"default {opt.default}" in text, opt.key


# --- mount(8) options -> flags (mount.fsmount) --------------------------------------------------


def test_mount_options_become_flags_in_one_word_each(tmp_path: Path) -> None:
    flags = mount_helper.translate(
        "lab",
        [
            "config=/etc/fsmount/other.toml",
            "cache-dir=/var/cache/fsmount/lab",
            "cache_size=20G",
            "archive=a",
            "archive=b",
            "allow_other",
            "log-file=/var/log/fsmount-lab.log",
            "grand-challenge-token-file=/etc/fsmount/lab.token",
        ],
        config_dir=tmp_path,
    )
    assert flags == [
        "--config=/etc/fsmount/other.toml",
        "--cache-dir=/var/cache/fsmount/lab",
        "--cache-size=20G",
        "--archive=a",
        "--archive=b",
        "--allow-other",
        "--log-file=/var/log/fsmount-lab.log",
        "--grand-challenge-token-file=/etc/fsmount/lab.token",
    ]
    # what the helper produces is what `fsmount mount` parses
    args = cli.build_parser().parse_args(["mount", "/mnt/lab", *flags])
    assert (args.cache_size, args.archive, args.allow_other) == ("20G", ["a", "b"], True)


def test_options_for_mount_systemd_and_the_vfs_are_ignored(tmp_path: Path) -> None:
    ignored = [
        "_netdev",
        "nofail",
        "x-systemd.automount",
        "x-systemd.idle-timeout=10min",
        "x-systemd.requires=network-online.target",
        "x-gvfs-show",
        "comment=systemd.automount",
        "auto",
        "noauto",
        "defaults",
        "user",
        "users",
        "rw",
        "ro",
        "nosuid",
        "nodev",
        "noatime",
    ]
    assert mount_helper.translate("lab", ignored, config_dir=tmp_path) == []


def test_the_source_names_the_default_config_file(tmp_path: Path) -> None:
    assert mount_helper.translate("lab", [], config_dir=tmp_path) == []
    (tmp_path / "lab.toml").write_text("")
    assert mount_helper.translate("lab", [], config_dir=tmp_path) == [
        f"--config={tmp_path / 'lab.toml'}"
    ]
    given = mount_helper.translate("lab", ["config=/x.toml"], config_dir=tmp_path)
    assert given == ["--config=/x.toml"], "an explicit config= wins"
    assert mount_helper.translate("../lab", [], config_dir=tmp_path / "sub") == []


def test_boolean_mount_options_take_a_value_or_none(tmp_path: Path) -> None:
    assert mount_helper.translate("s", ["allow-other=yes"], config_dir=tmp_path) == [
        "--allow-other"
    ]
    assert mount_helper.translate("s", ["allow-other=no"], config_dir=tmp_path) == []
    with pytest.raises(mount_helper.UsageError, match=r"'allow-other'.*not a boolean"):
        mount_helper.translate("s", ["allow-other=sometimes"], config_dir=tmp_path)


@pytest.mark.parametrize(
    ("option", "says"),
    [
        ("token=abc", "unknown mount option 'token'"),
        ("cache-dir", "'cache-dir' needs a value"),
        ("archive=", "'archive' needs a value"),
    ],
)
def test_a_bad_mount_option_is_named(tmp_path: Path, option: str, says: str) -> None:
    with pytest.raises(mount_helper.UsageError, match=says):
        mount_helper.translate("s", [option], config_dir=tmp_path)


def test_sloppy_mounts_skip_unknown_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = mount_helper.translate(
        "s", ["frobnicate=1", "archive=a"], sloppy=True, config_dir=tmp_path
    )
    assert flags == ["--archive=a"]
    assert "ignoring unknown option 'frobnicate'" in capsys.readouterr().err


def test_the_helper_command_line_is_read_as_mount8_writes_it() -> None:
    got = mount_helper.parse_invocation(
        ["lab", "/mnt/lab", "-s", "-n", "-o", "rw,archive=a", "-t", "fsmount", "-oarchive=b"]
    )
    assert (got.source, got.mountpoint, got.options) == (
        "lab",
        "/mnt/lab",
        ["rw", "archive=a", "archive=b"],
    )
    assert got.sloppy and not got.fake
    assert mount_helper.parse_invocation(["-fv", "a", "/b"]).fake
    with pytest.raises(mount_helper.UsageError, match="namespace"):
        mount_helper.parse_invocation(["a", "/b", "-N", "123"])
    with pytest.raises(mount_helper.UsageError, match="usage"):
        mount_helper.parse_invocation(["a"])


def test_a_fake_mount_prints_the_command_and_mounts_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = mount_helper.main(["lab", "/nonexistent/mnt", "-f", "-o", "_netdev,archive=a"])
    assert code == 0
    assert capsys.readouterr().err == "fsmount mount /nonexistent/mnt --archive=a\n"


def test_exit_codes_follow_mount8(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))  # not the user's file
    assert mount_helper.main(["lab", str(tmp_path), "-o", "bogus"]) == mount_helper.EXIT_USAGE
    assert "mount.fsmount: unknown mount option 'bogus'" in capsys.readouterr().err
    missing = str(tmp_path / "missing")
    assert mount_helper.main(["lab", missing, "-o", "archive=a"]) == mount_helper.EXIT_MOUNT_FAILED
    assert f"mount point {missing} is not a directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("level", "verbosity", "journal", "shown", "hidden"),
    [
        ("info", 0, False, "INFO", "DEBUG"),
        ("info", 1, False, "DEBUG", None),  # -v
        ("info", -1, False, "WARNING", "INFO"),  # -q
        ("warning", 0, True, "WARNING", "INFO"),  # under systemd: no timestamps
    ],
)
def test_logging_levels_and_journald_format(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    level: str,
    verbosity: int,
    journal: bool,
    shown: str,
    hidden: str | None,
) -> None:
    if journal:
        monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    else:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(level, verbosity)
        log = logging.getLogger("fsmount.test")
        for name in ("DEBUG", "INFO", "WARNING"):
            log.log(getattr(logging, name), "a %s line", name)
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    lines = capsys.readouterr().err.splitlines()
    assert any(line.startswith(f"{shown} fsmount.test: a {shown} line") for line in lines) == (
        journal
    ), lines
    assert any(f"{shown} fsmount.test: a {shown} line" in line for line in lines), lines
    if hidden:
        assert not any(f"a {hidden} line" in line for line in lines), lines
