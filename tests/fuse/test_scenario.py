"""Scenario through the kernel: per-format virtual files resolved to signed CDN URLs on read."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs, urlsplit

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


def signature(url: str) -> str:
    """The signature of a signed CDN URL (a redirect's target carries one of its own)."""
    return parse_qs(urlsplit(url).query)["Signature"][0]


def test_a_403_from_the_cdn_asks_for_a_new_url_once_and_the_read_succeeds(
    mounter: Mounter, services
) -> None:
    sc = services.scenario
    mount = mounter.start(gc=False)
    png, _ = poster(services)
    path = png.replace(".png", ".gif")
    expected = sc.expected_tree()[path]
    target = mount.path / "scenario" / path
    sc.log.reset()
    assert os.stat(target).st_size == expected.size  # the probe: a URL valid for a day
    downloads, cdn = sc.log.count("download"), sc.log.count("cdn")
    assert downloads == 1
    sc.cdn_faults.configure(fail_next=1, error_statuses=(403,))
    try:
        assert target.read_bytes() == expected.data
        assert sc.cdn_faults.faults.fail_next == 0, "the 403 was never served"
    finally:
        sc.reset_faults()
    assert sc.log.count("download") == downloads + 1  # asked again once, after the 403
    assert sc.log.count("cdn") > cdn  # the refused request never reached the app's log


def test_many_ranges_of_one_file_ask_for_its_url_once(mounter: Mounter, services) -> None:
    sc = services.scenario
    expected = sc.expected_tree()
    # The largest file of the samples (one 1 MiB block at most): its first download is cut
    # half-way, so its bytes come in two CDN ranges, after the size probe's.
    path = max((p for p in expected if p.startswith("assets/")), key=lambda p: expected[p].size)
    data = expected[path].data
    assert len(data) > 512 * 1024
    mount = mounter.start(gc=False)
    sc.log.reset()
    target = mount.path / "scenario" / path
    assert os.stat(target).st_size == len(data)

    def read_in_ranges() -> dict[int, bytes]:
        step = 24 * 1024 + 7  # not aligned with pages or blocks
        with open(target, "rb", buffering=0) as f:
            return {
                offset: os.pread(f.fileno(), step, offset)
                for offset in reversed(range(0, len(data), step))
            }

    sc.cdn_faults.configure(cut_rate=1.0)
    try:
        with ThreadPoolExecutor(1) as pool:
            reading = pool.submit(read_in_ranges)
            wait_for(lambda: sc.cdn_faults.injected["cut"] >= 1 or reading.done(), 60, "a cut body")
            sc.cdn_faults.configure(cut_rate=0.0)  # the resumes go through
            pieces = reading.result(timeout=120)
        assert sc.cdn_faults.injected["cut"] >= 1
    finally:
        sc.reset_faults()
    for offset, piece in pieces.items():
        assert piece == data[offset : offset + len(piece)] and piece, offset
    assert b"".join(pieces[o] for o in sorted(pieces)) == data
    cdn = sc.log.entries("cdn")
    assert len(cdn) >= 3, [e.headers.get("range") for e in cdn]
    assert sc.log.count("download") == 1
    assert len({signature(e.url) for e in cdn}) == 1  # one signed URL for every range
    assert all("authorization" not in e.headers for e in cdn)


def test_native_sizes_come_from_the_listing_without_any_download(
    mounter: Mounter, services
) -> None:
    sc = services.scenario
    expected = sc.expected_tree()
    natives: dict[str, str] = {}  # one native file per extension: png, jpg, glb, mp4
    for path, e in expected.items():
        if path.startswith("assets/") and e.target_format is None:
            natives.setdefault(path.rsplit(".", 1)[1], path)
    assert {"png", "jpg", "glb", "mp4"} <= set(natives), natives
    mount = mounter.start(gc=False)
    sc.log.reset()
    for path in natives.values():  # looked up by name, the directory never listed first
        assert os.stat(mount.path / "scenario" / path).st_size == expected[path].size, path
    assert sc.log.count("assets") >= 1  # the lookups did go to the API: listing pages
    assert sc.log.count("download") == 0 and sc.log.count("cdn") == 0, sc.log.counts()


def test_ls_l_gives_exact_sizes_and_converts_each_file_once(mounter: Mounter, services) -> None:
    sc = services.scenario
    expected = sc.expected_tree()
    assets = {p: e for p, e in expected.items() if p.startswith("assets/")}
    converted = [p for p, e in assets.items() if e.target_format is not None]
    mount = mounter.start(gc=False)
    sc.log.reset()
    listing = subprocess.run(
        ["ls", "-l", str(mount.path / "scenario/assets")],
        capture_output=True,
        text=True,
        check=True,
        timeout=240,
    )
    sizes = {
        f"assets/{line.split()[-1]}": int(line.split()[4])
        for line in listing.stdout.splitlines()
        if line.startswith("-")
    }
    assert sizes == {p: e.size for p, e in assets.items()}
    # A converted format's size costs a conversion, so it is only learned for a file a program
    # asks about (never guessed ahead, see test_lazy_walks): `ls -l` asked about each once.
    assert sc.log.count("cdn") == len(converted), sc.log.counts()
    assert sc.log.count("download") == len(converted), sc.log.counts()


def test_cdn_redirects_are_followed(mounter: Mounter, services) -> None:
    sc = services.scenario
    sc.redirect_first_hit = True
    try:
        mount = mounter.start(gc=False)
        expected = sc.expected_tree()
        objs = [p for p in expected if p.startswith("assets/") and p.endswith(".obj")]
        assert objs
        sc.log.reset()
        for path in objs:
            assert (mount.path / "scenario" / path).read_bytes() == expected[path].data
    finally:
        sc.redirect_first_hit = False
    # Every file's first CDN hit was answered with a 302, whose target (it carries `hop`) the
    # client then fetched.
    hops = [e for e in sc.log.entries("cdn") if "hop" in parse_qs(urlsplit(e.url).query)]
    for path in objs:
        asset_id = expected[path].asset_id
        assert any(f"/{asset_id}" in e.url for e in hops), path
    assert all("authorization" not in e.headers for e in sc.log.entries("cdn"))


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
