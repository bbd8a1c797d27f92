"""Scenario through the kernel: per-format virtual files resolved to signed CDN URLs on read."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import pytest
from conftest import Mount, Mounter, wait_for
from PIL import Image

from fsmount.demo.scenario_samples import PILLOW_FORMAT

pytestmark = pytest.mark.fuse


def walk(root) -> tuple[dict[str, int], set[str]]:
    files: dict[str, int] = {}
    dirs: set[str] = set()
    for current, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(current, root)
        dirs.update(os.path.normpath(os.path.join(rel, d)) for d in dirnames)
        for name in filenames:
            files[os.path.normpath(os.path.join(rel, name))] = os.stat(
                os.path.join(current, name)
            ).st_size
    return files, dirs


def test_tree_and_sizes_equal_the_contract(shared_mount: Mount, services) -> None:
    expected = services.scenario.expected_tree()
    files, dirs = walk(shared_mount.path / "scenario")
    assert files == {path: e.size for path, e in expected.items()}
    assert dirs == services.scenario.expected_dirs()


def test_hidden_pending_and_deleted_assets_are_absent(shared_mount: Mount, services) -> None:
    visible = services.scenario.visible_asset_ids()
    shown = {name.split(".")[0] for name in os.listdir(shared_mount.path / "scenario/assets")}
    assert shown == set(visible)
    every_asset = {a.id for a in services.scenario.samples.assets}
    assert every_asset - shown, "the samples must include invisible assets"


@pytest.mark.parametrize("where", ["assets", "collections/Sprites", "models/Stone Golem v2"])
def test_every_file_equals_what_the_cdn_serves(shared_mount: Mount, services, where) -> None:
    expected = services.scenario.expected_tree()
    prefix = f"{where}/"
    paths = [p for p in expected if p.startswith(prefix) and "/" not in p[len(prefix) :]]
    assert paths
    for path in paths:
        data = (shared_mount.path / "scenario" / path).read_bytes()
        assert data == expected[path].data, path
        assert os.stat(shared_mount.path / "scenario" / path).st_mtime == pytest.approx(
            expected[path].mtime
        )


def test_every_image_format_opens_with_pillow(shared_mount: Mount) -> None:
    pytest.importorskip("pillow_heif").register_heif_opener()
    assets = shared_mount.path / "scenario/assets"
    for name in sorted(os.listdir(assets)):
        ext = name.rsplit(".", 1)[1]
        if ext in PILLOW_FORMAT:
            with Image.open(io.BytesIO((assets / name).read_bytes())) as image:
                assert image.format == PILLOW_FORMAT[ext], name
        elif ext == "glb":
            assert (assets / name).read_bytes()[:4] == b"glTF"


def test_cp_of_all_webp_copies_complete_valid_files(shared_mount: Mount, services, tmp_path):
    assets = shared_mount.path / "scenario/assets"
    sources = sorted(str(assets / n) for n in os.listdir(assets) if n.endswith(".webp"))
    subprocess.run(["cp", *sources, str(tmp_path)], check=True)
    expected = services.scenario.expected_tree()
    copied = sorted(os.listdir(tmp_path))
    assert len(copied) == len(sources) > 100
    for name in copied:
        assert (tmp_path / name).read_bytes() == expected[f"assets/{name}"].data
        with Image.open(tmp_path / name) as image:
            assert image.format == "WEBP"


def poster(services) -> tuple[str, int]:
    """The largest image asset's native file: big enough to be read in many ranges."""
    expected = services.scenario.expected_tree()
    path = max(
        (p for p in expected if p.startswith("assets/") and p.endswith(".png")),
        key=lambda p: expected[p].size,
    )
    return path, expected[path].size


def test_one_signed_url_serves_many_ranges_and_is_asked_again_after_expiry(
    mounter: Mounter, services
) -> None:
    sc = services.scenario
    mount = mounter.start(gc=False)
    png, _ = poster(services)
    webp, avif = png.replace(".png", ".webp"), png.replace(".png", ".avif")
    expected = sc.expected_tree()
    sc.log.reset()
    # The size probe and every range of the read share one signed URL.
    target = mount.path / "scenario" / webp
    assert os.stat(target).st_size == expected[webp].size
    data = expected[webp].data
    with open(target, "rb", buffering=0) as f:
        for offset in reversed(range(0, len(data), 16 * 1024)):
            assert os.pread(f.fileno(), 4096, offset) == data[offset : offset + 4096]
    assert sc.log.count("download") == 1
    assert sc.log.count("cdn") >= 2
    assert all("authorization" not in e.headers for e in sc.log.entries("cdn"))

    # Links now expire after a second: once expired, the next read asks again and succeeds.
    sc.url_expiry = 1
    try:
        target = mount.path / "scenario" / avif
        assert os.stat(target).st_size == expected[avif].size  # asks for a 1-second link
        asked = sc.log.count("download")
        issued = time.time()
        wait_for(lambda: time.time() > issued + 2, 10, "the signed URL to expire")
        assert target.read_bytes() == expected[avif].data
        assert sc.log.count("download") == asked + 1
    finally:
        sc.url_expiry = 86400


def test_cdn_redirects_are_followed(mounter: Mounter, services) -> None:
    sc = services.scenario
    sc.redirect_first_hit = True
    try:
        mount = mounter.start(gc=False)
        expected = sc.expected_tree()
        glbs = [p for p in expected if p.startswith("assets/") and p.endswith(".obj")]
        for path in glbs:
            assert (mount.path / "scenario" / path).read_bytes() == expected[path].data
    finally:
        sc.redirect_first_hit = False


def test_wrong_credentials_fail_before_mounting(mounter: Mounter, tmp_path) -> None:
    mnt = tmp_path / "bad"
    mnt.mkdir()
    creds = tmp_path / "wrong"
    creds.write_text("demo-key-wrong\nnot-the-secret\n")
    args = mounter.args(gc=False)
    args[args.index("--scenario-credentials-file") + 1] = str(creds)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fsmount",
            "mount",
            str(mnt),
            "--cache-dir",
            str(tmp_path / "c"),
            *args,
        ],
        capture_output=True,
        text=True,
        env=mounter.env(),
        timeout=60,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "401" in lines[0], result.stderr
    assert "not-the-secret" not in result.stderr
    assert not os.path.ismount(mnt)


def test_credentials_from_the_sdk_environment_variables(mounter: Mounter, services) -> None:
    sc = services.scenario
    env = {
        "SCENARIO_SDK_API_KEY": sc.key,
        "SCENARIO_SDK_API_SECRET": sc.secret,
        "SCENARIO_BASE_URL": sc.api_url,
        "SCENARIO_PROJECT_ID": sc.project_id,
    }
    mount = mounter.start(gc=False, scenario=False, env=env)
    assert os.listdir(mount.path) == ["scenario"]
    assert len(os.listdir(mount.path / "scenario/assets")) > 100


def test_both_services_show_in_one_mount(shared_mount: Mount) -> None:
    assert sorted(os.listdir(shared_mount.path)) == ["grand-challenge", "scenario"]
    assert sorted(os.listdir(shared_mount.path / "scenario")) == [
        "assets",
        "collections",
        "models",
    ]
