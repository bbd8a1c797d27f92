"""The official Grand Challenge client (gcapi 0.16.1) against the fake, over HTTPS.

If gcapi can walk the fake and download what the oracle predicts, the fake is faithful where it
matters, and the oracle (`expected_archive`) really is what the official recipe writes, up to
the recipe's known deviations. Those deviations are asserted one by one, so a gcapi release
that stops making them fails here instead of silently changing what "matches" means.

`assert_matches_recipe` and `run_recipe` are meant for reuse: the kernel tests compare a
mounted `grand-challenge/<slug>/` (read with `read_tree`) with the recipe's output the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fsmount.demo.grand_challenge import GrandChallengeFake
from fsmount.demo.services import start_demo_services

pytestmark = pytest.mark.conformance

SCRIPT = Path(__file__).with_name("gcapi_download.py")
# Archives the recipe can be run on: demo-edge-cases would write outside its output directory
# (absolute and `..` relative_paths), and demo-large would hold 3 GiB in gcapi's memory.
RECIPE_ARCHIVES = ("demo-medical", "demo-private", "demo-empty", "demo-cohort", "demo-dicom")


@dataclass
class Tree:
    """Files (path -> bytes) and directories of one archive directory; paths use '/'."""

    files: dict[str, bytes]
    dirs: set[str]


def read_tree(root: Path) -> Tree:
    """Read a directory tree (a recipe output, or a mounted `grand-challenge/<slug>`)."""
    files, dirs = {}, set()
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_dir():
            dirs.add(relative)
        else:
            files[relative] = path.read_bytes()
    return Tree(files, dirs)


def expected_tree(gc: GrandChallengeFake, slug: str) -> Tree:
    """The oracle's tree for `slug`, with contents."""
    return Tree(
        {path: payload.bytes() for path, payload in gc.expected_archive(slug).items()},
        gc.expected_dirs(slug),
    )


def run_recipe(
    gcapi_python: str, gc: GrandChallengeFake, slug: str, output: Path, *, image: str = ""
) -> Tree:
    """Run the official download recipe on one archive of a TLS fake (or `images.download` on
    one image); return what it wrote.

    One failure is gcapi 0.16.1's own and is let through, as a known deviation: it downloads a
    DICOM image set's instances as listed, once per frame, 10 at once, and refuses to write a
    file twice, so a multi-frame instance ends the recipe with FileExistsError, after its file
    was written whole (the pool finishes every download before the error is raised).
    """
    env = dict(
        os.environ,
        GRAND_CHALLENGE_AUTHORIZATION=gc.token,
        SSL_CERT_FILE=str(gc.ca_file),
    )
    command = [gcapi_python, str(SCRIPT), "--base-url", gc.api_url]
    command += ["--image", image] if image else ["--archive", slug]
    command += ["--output", str(output)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 or _repeated_instance(gc, done.stderr), done.stderr
    output.mkdir(exist_ok=True)  # an empty archive leaves nothing behind
    return read_tree(output)


def _repeated_instance(gc: GrandChallengeFake, stderr: str) -> bool:
    """Whether gcapi stopped on a multi-frame instance's second entry (FileExistsError)."""
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if not last.startswith("FileExistsError:"):
        return False
    repeated = {
        instance.sop_instance_uid
        for archive in gc.data.archives
        for item in archive.items
        for civ in item.values
        if civ.image is not None and civ.image.image_set is not None
        for instance in civ.image.image_set.entries
        if instance.frames > 1
    }
    return any(f"{uid}.dcm already exists" in last for uid in repeated)


def assert_matches_recipe(recipe: Tree, shown: Tree, gc: GrandChallengeFake, slug: str) -> int:
    """Assert that `shown` is the recipe's output except for its known, lossy deviations.

    The deviations, each checked as such:
    - a JSON file served as application/json is re-serialised by gcapi (`json.dumps(obj)`),
      while the mount serves the stored bytes;
    - the recipe writes `<image-pk>.dzi` descriptors, which the mount hides;
    - the recipe renames legacy `.mhd`/`.zraw` to `<image-pk>.<ext>`, while the mount keeps the
      stored basenames the header refers to.
    Returns how many deviations were found, so callers can assert they were exercised.
    """
    recipe_files, shown_files = dict(recipe.files), dict(shown.files)
    deviations = 0
    for item in gc.data.items(gc.data.archive(slug)):
        for civ in item.values:
            path = f"{item.pk}/{civ.socket.relative_path}"
            if civ.file is not None and civ.file.content_type == "application/json":
                stored = civ.file.payload.bytes()
                assert shown_files.pop(path) == stored, f"{path}: not the stored bytes"
                assert recipe_files.pop(path) == json.dumps(json.loads(stored)).encode(), path
                deviations += 1
            for image_file in civ.image.files if civ.image is not None else ():
                directory = path if civ.socket.relative_path else item.pk
                suffix = image_file.basename.rsplit(".", 1)[-1]
                renamed = f"{directory}/{civ.image.pk}.{suffix}"
                stored = image_file.stored.payload.bytes()
                if image_file.image_type == "DZI":
                    assert recipe_files.pop(renamed) == stored, renamed
                    assert renamed not in shown_files, f"{renamed}: DZI must be hidden"
                    deviations += 1
                elif suffix in ("mhd", "zraw", "raw"):
                    assert recipe_files.pop(renamed) == stored, renamed
                    kept = f"{directory}/{image_file.basename}"
                    assert shown_files.pop(kept) == stored, f"{kept}: stored name not kept"
                    deviations += 1
    assert sorted(shown_files) == sorted(recipe_files)
    for path, data in recipe_files.items():
        assert shown_files[path] == data, f"{path}: bytes differ"
    assert shown.dirs == recipe.dirs
    return deviations


@pytest.fixture(scope="module")
def gcapi_python() -> str:
    python = os.environ.get("GCAPI_PYTHON")
    if not python:
        pytest.skip("GCAPI_PYTHON is not set (make setup creates .venv-gcapi with gcapi 0.16.1)")
    if not os.access(python, os.X_OK):
        pytest.skip(f"GCAPI_PYTHON={python} is not an executable interpreter")
    return python


@pytest.fixture(scope="module")
def tls_gc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrandChallengeFake]:
    workdir = tmp_path_factory.mktemp("gc-tls")
    with start_demo_services(scenario=False, tls=True, workdir=workdir) as services:
        assert services.gc is not None
        yield services.gc


@pytest.mark.parametrize("slug", RECIPE_ARCHIVES)
def test_official_recipe_writes_the_expected_tree_up_to_known_deviations(
    gcapi_python: str, tls_gc: GrandChallengeFake, slug: str, tmp_path: Path
) -> None:
    recipe = run_recipe(gcapi_python, tls_gc, slug, tmp_path / "recipe")
    deviations = assert_matches_recipe(recipe, expected_tree(tls_gc, slug), tls_gc, slug)
    if slug == "demo-medical":
        # one JSON file, two DZI descriptors, one .mhd/.zraw pair
        assert deviations == 5


def test_official_client_never_sends_the_token_to_storage(
    gcapi_python: str, tls_gc: GrandChallengeFake, tmp_path: Path
) -> None:
    tls_gc.reset_counters()
    run_recipe(gcapi_python, tls_gc, "demo-private", tmp_path / "recipe")
    storage = tls_gc.log.entries("storage")
    assert storage, "the recipe downloaded nothing from storage"
    for entry in storage:
        assert "authorization" not in entry.headers
        assert tls_gc.token not in json.dumps(entry.headers) + entry.url
    assert tls_gc.log.count("media") == len(storage)
