"""The suite's own guard: a mount that logs a warning nobody declared fails its test."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import unexpected_logs

pytestmark = pytest.mark.fuse

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

INNER = """
import os
import signal

from conftest import wait_for


def dump_stacks(mount):
    os.kill(mount.proc.pid, signal.SIGUSR1)  # the dump is logged as a warning
    wait_for(lambda: "SIGUSR1" in mount.logs(), 60, "the stack dump")


def test_undeclared(mounter):
    dump_stacks(mounter.start(gc=False))


def test_declared_at_start(mounter):
    dump_stacks(mounter.start(gc=False, expect_logs=["SIGUSR1"]))


def test_declared_later(mounter):
    mount = mounter.start(gc=False)
    mount.expect_logs("SIGUSR1: what every task")
    dump_stacks(mount)
"""


def test_an_undeclared_warning_of_a_mount_fails_its_test(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_undeclared*"])
    result.stdout.fnmatch_lines(["*unexpected warnings or errors*", "*WARNING fsmount*SIGUSR1*"])


def test_records_at_warning_and_above_and_stray_tracebacks_are_unexpected() -> None:
    log = "\n".join(
        [
            "2025-01-01 10:00:00,000 INFO fsmount.mount: mounted at /m",
            "2025-01-01 10:00:01,000 WARNING fsmount.fs: read: storage HTTP 503",
            "2025-01-01 10:00:02,000 ERROR fsmount.fs: unexpected error in read; answering EIO",
            "Traceback (most recent call last):",  # part of the record above
            '  File "x.py", line 1, in <module>',
            "ValueError: a bug",
            "2025-01-01 10:00:03,000 INFO fsmount.mount: SIGTERM: unmounting",
            "Traceback (most recent call last):",  # nothing logged it: the process died
            "RuntimeError: boom",
            "WARNING fsmount.tree: skipping a value (no time: under systemd's journal)",
        ]
    )
    assert unexpected_logs(log) == [
        "2025-01-01 10:00:01,000 WARNING fsmount.fs: read: storage HTTP 503",
        "2025-01-01 10:00:02,000 ERROR fsmount.fs: unexpected error in read; answering EIO",
        "Traceback (most recent call last):",
        "WARNING fsmount.tree: skipping a value (no time: under systemd's journal)",
    ]
    assert unexpected_logs(log, ["HTTP 503", "answering EIO", "^Traceback", "skipping"]) == []
