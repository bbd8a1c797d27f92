"""`fsmount demo`: the fake services on loopback, mounted, with a short tour of the result.

Everything runs in this one process: the fake services on threads of their own, the mount on
the main thread (signals need it), and the tour on a helper thread that reads the mount like
any other program would, while trio serves its requests.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path

import trio

from fsmount import config
from fsmount.demo.services import start_demo_services
from fsmount.logs import setup_logging


def _write_secret(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


def _tour(mountpoint: Path) -> None:
    """List what is mounted, two levels deep, and suggest what to try."""
    out: list[str] = [f"\nfsmount demo: the demo services are mounted at {mountpoint}\n"]
    try:
        for service in sorted(os.listdir(mountpoint)):
            out.append(f"  {service}/")
            base = mountpoint / service
            for entry in sorted(os.listdir(base)):
                count = len(os.listdir(base / entry))
                out.append(f"    {entry}/  ({count} entries)")
        gc = mountpoint / "grand-challenge"
        sample = _first(gc / "demo-medical", 2, _small_json) or _first(gc, 4, _small_json)
        if sample is not None:
            out.append(f"\n  {sample.relative_to(mountpoint.parent)}:")
            out.append(
                "    " + sample.read_bytes()[:300].decode(errors="replace").replace("\n", "\n    ")
            )
        image_set = _first(gc / "demo-dicom", 2, _image_set)
        if image_set is not None:
            names = os.listdir(image_set)
            out.append(
                f"\n  {image_set.relative_to(mountpoint.parent)}/: a DICOM image set (AWS"
                f" HealthImaging), one file per instance:"
            )
            out += [f"    {name}  ({(image_set / name).stat().st_size:,} bytes)" for name in names]
    except OSError as exc:
        out.append(f"  (could not list the mount: {exc})")
    rel = os.path.relpath(mountpoint)
    if rel.startswith(".."):
        rel = str(mountpoint)
    out += [
        "\nTry, in another terminal:",
        f"  ls -lR {rel}/grand-challenge | head -40",
        f"  find {rel}/grand-challenge -name '*.mha'",
        f"  ls -l {rel}/grand-challenge/demo-dicom/*/images/dicom-image-set",
        f"  cp {rel}/scenario/assets/*.webp /tmp/",
        f"  getfattr -d {rel}/scenario/assets/*.glb | head",
        "\nPress Ctrl-C to unmount and exit.",
    ]
    print("\n".join(out), flush=True)


def _first(directory: Path, depth: int, match: Callable[[Path], bool]) -> Path | None:
    """The first entry that `match`es, `depth` levels down at most, without walking big
    directories."""
    if depth < 0 or not directory.is_dir():
        return None
    entries = sorted(directory.iterdir())[:20]
    for entry in entries:
        if match(entry):
            return entry
    for entry in entries:
        found = _first(entry, depth - 1, match) if entry.is_dir() else None
        if found is not None:
            return found
    return None


def _small_json(entry: Path) -> bool:
    return entry.is_file() and entry.suffix == ".json" and entry.stat().st_size < 4096


def _image_set(entry: Path) -> bool:
    """A directory of `.dcm` files (listing it asks for its instances, nothing more)."""
    return entry.is_dir() and any(name.endswith(".dcm") for name in os.listdir(entry))


def run_demo(mountpoint: Path) -> int:
    from fsmount.mount import serve

    setup_logging("warning")
    mountpoint.mkdir(exist_ok=True)
    mountpoint = mountpoint.absolute()
    with (
        tempfile.TemporaryDirectory(prefix="fsmount-demo-") as tmp,
        start_demo_services(workdir=Path(tmp)) as services,
    ):
        work = Path(tmp)
        (work / "config.toml").write_text("")
        argv = ["--config", str(work / "config.toml"), "--cache-dir", str(work / "cache")]
        if services.gc is not None:
            token = _write_secret(work / "gc-token", services.gc.token)
            argv += ["--grand-challenge-url", services.gc.api_url]
            argv += ["--grand-challenge-token-file", token]
        if services.scenario is not None:
            creds = _write_secret(
                work / "scenario-credentials",
                f"{services.scenario.key}\n{services.scenario.secret}\n",
            )
            argv += ["--scenario-url", services.scenario.api_url]
            argv += ["--scenario-credentials-file", creds]
        options = argparse.ArgumentParser()  # the options of `fsmount mount`, as it parses them
        config.add_arguments(options)
        cfg = config.load(options.parse_args(argv), environ={})

        def ready() -> None:
            threading.Thread(target=_tour, args=(mountpoint,), daemon=True).start()

        # The demo is interactive: closing its terminal (SIGHUP) unmounts it, as Ctrl-C does.
        trio.run(partial(serve, hangup_unmounts=True), cfg, mountpoint, ready)
    with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
        print("fsmount demo: unmounted.", file=sys.stderr)
    return 0
