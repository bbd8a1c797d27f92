"""What an operator can ask a running mount: attributes, refreshes, and stacks."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from conftest import Mount, Mounter, wait_for

pytestmark = pytest.mark.fuse


def xattrs(path) -> dict[str, str]:
    return {name: os.getxattr(path, name).decode() for name in os.listxattr(path)}


def test_extended_attributes_say_where_a_file_comes_from(shared_mount: Mount, services) -> None:
    root = shared_mount.path
    gc_dir = xattrs(root / "grand-challenge")
    assert gc_dir["user.fsmount.source"] == "grand-challenge"
    assert gc_dir["user.fsmount.api"] == services.gc.api_url.rstrip("/") + "/"
    item = next(p for p in (root / "grand-challenge/demo-medical").iterdir() if p.is_dir())
    value = xattrs(item / "results.json")
    assert value["user.fsmount.archive"] == "demo-medical"
    assert value["user.fsmount.item"] == item.name
    assert value["user.fsmount.socket"] == "results-json-file"
    assert value["user.fsmount.super-kind"] == "Value"
    glb = next((root / "scenario/assets").glob("*.glb"))
    asset = xattrs(glb)
    assert asset["user.fsmount.asset"] == glb.name.split(".")[0]
    assert asset["user.fsmount.format"] == "glb" and asset["user.fsmount.kind"] == "3d"
    assert "user.fsmount.prompt" in asset and "user.fsmount.model" in asset
    for attrs in (gc_dir, value, asset):
        for text in attrs.values():
            assert services.gc.token not in text and services.scenario.secret not in text
    assert xattrs(root)["user.fsmount.services"] == "grand-challenge, scenario"
    for name in ("assets", "collections", "models"):
        listing = xattrs(root / "scenario" / name)
        assert listing["user.fsmount.source"] == "scenario"
        assert listing["user.fsmount.listing"] == name
    # Every directory and file says something about where it comes from; a directory made of
    # a nested relative path names its item and the path.
    nested = []
    for directory, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            attrs = xattrs(os.path.join(directory, name))
            assert any(k.startswith("user.fsmount.") for k in attrs), (directory, name)
            if "user.fsmount.relative-path" in attrs:
                nested.append(attrs)
    assert nested and all("user.fsmount.item" in attrs for attrs in nested)
    getfattr = subprocess.run(["getfattr", "-d", str(glb)], capture_output=True, text=True)
    if getfattr.returncode == 0:
        assert "user.fsmount.asset" in getfattr.stdout
    with pytest.raises(OSError):
        os.getxattr(glb, "user.fsmount.nothing")


def test_sighup_makes_a_new_archive_item_visible(mounter: Mounter, services) -> None:
    gc = services.gc
    mount = mounter.start("--archive", "demo-empty", scenario=False)
    archive = mount.path / "grand-challenge" / "demo-empty"
    assert os.listdir(archive) == []
    pk = gc.add_item("demo-empty")
    try:
        assert os.listdir(archive) == []  # the listing is cached...
        mount.proc.send_signal(signal.SIGHUP)  # ...until SIGHUP drops it
        wait_for(lambda: os.listdir(archive) == [pk], 30, "the new item to show")
        assert os.listdir(archive / pk)
    finally:
        gc.data.archive("demo-empty").items.clear()


def test_sigusr1_logs_every_task_and_the_mount_goes_on(mounter: Mounter) -> None:
    mount = mounter.start(gc=False, expect_logs=[r"SIGUSR1: what every task is waiting on"])
    mount.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: "SIGUSR1" in mount.logs(), 30, "the stack dump")
    wait_for(lambda: "pyfuse" in mount.logs().split("SIGUSR1", 1)[1], 30, "task names")
    assert os.listdir(mount.path / "scenario")
