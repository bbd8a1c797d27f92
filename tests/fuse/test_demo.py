"""`fsmount demo`: the built-in services, mounted and shown, gone again on Ctrl-C or when its
terminal closes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_for, watch_log

pytestmark = pytest.mark.fuse


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, str]]:
    """`fsmount demo` running, its tour shown: (process, mount point, tour)."""
    mnt = tmp_path / "demo-mnt"
    out = tmp_path / "demo.out"
    watch_log(out)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRAND_", "SCENARIO_"))}
    with open(out, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fsmount", "demo", str(mnt)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_for(lambda: b"Press Ctrl-C" in out.read_bytes() or proc.poll() is not None, 90, "tour")
        tour = out.read_text()
        assert proc.poll() is None, tour
        yield proc, mnt, tour
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_demo_mounts_shows_a_tour_and_unmounts_on_ctrl_c(demo) -> None:
    proc, mnt, tour = demo
    assert "grand-challenge/" in tour and "scenario/" in tour
    assert "demo-medical/" in tour and "assets/" in tour
    assert "a DICOM image set" in tour and tour.count(".dcm  (") == 4  # the CT series
    assert sorted(os.listdir(mnt)) == ["grand-challenge", "scenario"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    assert not os.path.ismount(mnt)


def test_closing_the_demos_terminal_unmounts_it(demo) -> None:
    """A closed terminal sends SIGHUP: the interactive demo goes, as on Ctrl-C (a mount
    keeps SIGHUP as "refresh")."""
    proc, mnt, _ = demo
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=30) == 0
    assert not os.path.ismount(mnt)
