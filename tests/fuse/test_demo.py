"""`fsmount demo`: the built-in services, mounted and shown, gone again on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from conftest import wait_for

pytestmark = pytest.mark.fuse


def test_demo_mounts_shows_a_tour_and_unmounts_on_ctrl_c(tmp_path) -> None:
    mnt = tmp_path / "demo-mnt"
    out = tmp_path / "demo.out"
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
        assert "grand-challenge/" in tour and "scenario/" in tour
        assert "demo-medical/" in tour and "assets/" in tour
        assert "a DICOM image set" in tour and tour.count(".dcm  (") == 4  # the CT series
        assert sorted(os.listdir(mnt)) == ["grand-challenge", "scenario"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert not os.path.ismount(mnt)
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
