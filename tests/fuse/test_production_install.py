"""A production install (`pip install .`, no extras) brings none of the fake services'
packages, and the mount works without them; `fsmount demo` then says what to install.

What `pip install .` resolves is pyproject's `dependencies` and, in turn, what those require:
read from pyproject.toml itself (never a stale install of it) and from the metadata of the
packages installed here. "Without them" is this interpreter with the `demo` extra's modules
shadowed by stubs that fail as a missing package does, through PYTHONPATH, so every process
the mount starts inherits it.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from conftest import Mounter
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
FAKE_SERVICE_PACKAGES = {"starlette", "hypercorn", "pillow", "pillow-heif", "pydicom"}


def project() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text())["project"]


def pulled_in(requirements: list[str]) -> set[str]:
    """The distributions `requirements` bring, transitively, without any extra."""
    seen: set[str] = set()
    todo = [Requirement(text) for text in requirements]
    while todo:
        requirement = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        if name not in seen:
            seen.add(name)
            todo += [Requirement(text) for text in importlib.metadata.requires(name) or []]
    return seen


def demo_extra() -> set[str]:
    return {
        canonicalize_name(Requirement(text).name)
        for text in project()["optional-dependencies"]["demo"]
    }


def test_a_production_install_pulls_no_fake_service_package() -> None:
    assert demo_extra() >= FAKE_SERVICE_PACKAGES
    production = pulled_in(project()["dependencies"])
    assert {"pyfuse3", "trio", "httpx", "rich"} <= production
    assert not production & demo_extra(), "a production install would pull these"


def without_demo_packages(tmp_path: Path) -> dict[str, str]:
    """PYTHONPATH for a Python that lacks the `demo` extra's modules."""
    stubs = tmp_path / "no-demo-extra"
    by_module = importlib.metadata.packages_distributions()
    modules = {
        m for m, dists in by_module.items() if demo_extra() & set(map(canonicalize_name, dists))
    }
    assert {"starlette", "PIL", "pydicom"} <= modules
    for module in modules:
        (stubs / module).mkdir(parents=True)
        message = f"No module named {module!r}"
        (stubs / module / "__init__.py").write_text(
            f"raise ModuleNotFoundError({message!r}, name={module!r})\n"
        )
    path = os.pathsep.join(filter(None, [str(stubs), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path}


@pytest.mark.fuse
def test_the_mount_works_without_the_fake_services_packages(
    mounter: Mounter, services, tmp_path: Path
) -> None:
    stubs = without_demo_packages(tmp_path)
    env = mounter.env(stubs)
    blocked = subprocess.run(
        [sys.executable, "-c", "import PIL"], env=env, capture_output=True, text=True
    )
    assert "ModuleNotFoundError: No module named 'PIL'" in blocked.stderr, blocked.stderr

    every_module = (
        "import importlib, pkgutil, fsmount\n"
        "for module in pkgutil.walk_packages(fsmount.__path__, 'fsmount.'):\n"
        "    if not module.name.startswith(('fsmount.demo', 'fsmount.__main__')):\n"
        "        importlib.import_module(module.name)\n"
    )
    subprocess.run([sys.executable, "-c", every_module], env=env, check=True)

    mount = mounter.start(env=stubs)
    archive = mount.path / "grand-challenge" / "demo-medical"
    for path, payload in services.gc.expected_archive("demo-medical").items():
        assert (archive / path).read_bytes() == payload.bytes(), path
    assets = [p for p in services.scenario.expected_tree().items() if p[0].startswith("assets/")]
    for path, expected in assets[:3]:
        assert (mount.path / "scenario" / path).read_bytes() == expected.data, path

    demo = subprocess.run(
        [sys.executable, "-m", "fsmount", "demo", str(tmp_path / "demo-mnt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert demo.returncode == 1
    assert demo.stderr.count("\n") == 1, demo.stderr
    assert "pip install 'fsmount[demo]'" in demo.stderr
    assert not (tmp_path / "demo-mnt").exists(), "nothing is started without the packages"
