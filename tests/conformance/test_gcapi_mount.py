"""The official client's download recipe and the mount agree, path for path, byte for byte.

Both read the same HTTPS fake: the recipe through gcapi 0.16.1, the mount through the kernel.
Where the recipe is lossy (re-serialised JSON, `.dzi` files, renamed `.mhd`/`.zraw`), the mount
serves the stored bytes and names, and each such deviation is asserted as such.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mount, Mounter
from test_gcapi import RECIPE_ARCHIVES, assert_matches_recipe, gcapi_python, read_tree, run_recipe

from fsmount.demo.services import DemoServices, start_demo_services

pytestmark = [pytest.mark.conformance, pytest.mark.fuse]
__all__ = ["gcapi_python"]  # the fixture, shared with test_gcapi


@pytest.fixture(scope="module")
def tls_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoServices]:
    with start_demo_services(
        scenario=False, tls=True, workdir=tmp_path_factory.mktemp("tls")
    ) as running:
        yield running


@pytest.fixture(scope="module")
def tls_mount(
    tmp_path_factory: pytest.TempPathFactory, tls_services: DemoServices
) -> Iterator[Mount]:
    mounter = Mounter(tmp_path_factory.mktemp("tls-mount"), tls_services)
    try:
        assert tls_services.gc is not None
        yield mounter.start(scenario=False, env={"SSL_CERT_FILE": str(tls_services.gc.ca_file)})
    finally:
        mounter.cleanup()


@pytest.mark.parametrize("slug", RECIPE_ARCHIVES)
def test_mount_equals_the_official_recipe_up_to_its_known_deviations(
    gcapi_python: str, tls_services: DemoServices, tls_mount: Mount, slug: str, tmp_path: Path
) -> None:
    gc = tls_services.gc
    assert gc is not None
    recipe = run_recipe(gcapi_python, gc, slug, tmp_path / "recipe")
    shown = read_tree(tls_mount.path / "grand-challenge" / slug)
    deviations = assert_matches_recipe(recipe, shown, gc, slug)
    if slug == "demo-medical":
        assert deviations == 5  # one JSON file, two DZI descriptors, one .mhd/.zraw pair
    if slug == "demo-dicom":
        assert sum(path.endswith(".dcm") for path in shown.files) == 6


def test_images_download_writes_the_dcm_files_the_mount_shows(
    gcapi_python: str, tls_services: DemoServices, tls_mount: Mount, tmp_path: Path
) -> None:
    gc = tls_services.gc
    assert gc is not None
    archive = tls_mount.path / "grand-challenge" / "demo-dicom"
    sets = 0
    for item in gc.data.items(gc.data.archive("demo-dicom")):
        for civ in item.values:
            if civ.image is None or civ.image.image_set is None:
                continue
            output = tmp_path / civ.image.pk
            written = run_recipe(gcapi_python, gc, "", output, image=civ.image.pk)
            shown = read_tree(archive / item.pk / civ.socket.relative_path)
            assert sorted(shown.files) == sorted(written.files)
            assert len(shown.files) == len(civ.image.image_set.instances())
            for name, data in written.files.items():
                assert shown.files[name] == data, name
            sets += 1
    assert sets == 2
