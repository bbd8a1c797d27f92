"""`fsmount cache prefetch --batch`: ask the mount to bring Scenario native files through
batch export jobs, and show what it answers.

The mount does the work (fsmount/export.py), asked over its control socket; its events are
shown on the same progress bar as a plain prefetch, then the files the export could not bring
are read through the mount one by one.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fsmount.commands.output import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, error, warn
from fsmount.commands.progress import progress_bar
from fsmount.mountinfo import mount_point
from fsmount.status.client import StatusError, control
from fsmount.status.render import format_size

_CONTROL_IDLE = 300.0  # seconds a mount may go silent during a batch prefetch

ReadFiles = Callable[[list[Path]], int]
"""Reads files through their mount, as a plain prefetch does; the exit code."""


def batch_prefetch(roots: list[Path], args: argparse.Namespace, read_files: ReadFiles) -> int:
    """Ask each mount the roots are on to export their Scenario native files (all roots are
    checked first, as for a plain prefetch)."""
    from fsmount.sources.scenario import ROOT

    by_mount: dict[Path, list[str]] = {}
    for root in roots:
        mountpoint = mount_point(root)
        relative = root.relative_to(mountpoint).as_posix()
        if relative.split("/")[0] != ROOT:
            error(f"{root} is not under {mountpoint / ROOT}: --batch exports Scenario files only")
            return EXIT_USAGE
        by_mount.setdefault(mountpoint, []).append(relative)
    return max(
        _BatchClient(mountpoint, args, read_files).run(paths)
        for mountpoint, paths in by_mount.items()
    )


class _BatchClient:
    """One `batch-prefetch` request to one mount: shows its events, then reads through the
    mount the native files the export could not bring."""

    def __init__(self, mountpoint: Path, args: argparse.Namespace, read_files: ReadFiles) -> None:
        self._mountpoint = mountpoint
        self._args = args
        self._read_files = read_files
        self._plan: dict[str, Any] = {}
        self._warnings: list[str] = []

    def run(self, paths: list[str]) -> int:
        started = time.monotonic()
        request: dict[str, Any] = {"command": "batch-prefetch", "paths": paths}
        request["yes"] = self._args.yes
        if self._args.batch_size is not None:
            request["batch_size"] = self._args.batch_size
        try:
            outcome = self._follow(request)
        except StatusError as exc:
            error(str(exc))
            return EXIT_FAILED
        except KeyboardInterrupt:  # hanging up cancels the export in the mount
            error("interrupted")
            return EXIT_INTERRUPTED
        for warning in self._warnings:
            warn(warning)
        if outcome.get("event") == "refused":
            error(
                f"exporting {self._plan.get('export', 0):,} files costs"
                f" {outcome.get('cost', 0):g} creative units: run again with --yes to accept"
            )
            return EXIT_FAILED
        if outcome.get("event") != "done":
            error(str(outcome.get("message") or f"the mount at {self._mountpoint} gave up"))
            return EXIT_FAILED
        return self._report(outcome, time.monotonic() - started)

    def _follow(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send the request and show its events; the last one (`done`, `refused`, `error`)."""
        progress = progress_bar()
        with progress:
            task = progress.add_task("export: listing", total=None)
            job = ""
            for event in control(self._mountpoint, request, idle=_CONTROL_IDLE):
                kind = event.get("event")
                if kind == "plan":
                    self._plan = event
                    self._announce(event)
                elif kind == "cost":
                    jobs = self._plan.get("jobs", 0)
                    print(
                        f"export cost: {event.get('cost', 0):g} creative units for"
                        f" {self._plan.get('export', 0):,} files in {jobs:,} job{_s(jobs)}",
                        flush=True,
                    )
                elif kind == "job":
                    where = f"export {event.get('job')}/{event.get('jobs')}"
                    if where != job:  # a new job: a bar of its own (rich cannot unset a total)
                        job = where
                        progress.remove_task(task)
                        task = progress.add_task(where, total=None)
                    progress.update(task, description=f"{where}: {event.get('status')}")
                elif kind == "download":
                    where = f"export {event.get('job')}/{event.get('jobs')}"
                    progress.reset(task, description=f"{where}: zip", total=event.get("total"))
                elif kind == "bytes":
                    progress.advance(task, event.get("count", 0))
                elif kind == "warning":
                    self._warnings.append(str(event.get("message")))
                elif kind in ("done", "refused", "error"):
                    return event
        raise StatusError(f"the mount at {self._mountpoint} stopped answering")

    def _announce(self, plan: dict[str, Any]) -> None:
        if plan.get("bytes", 0) > plan.get("budget", float("inf")):
            self._warnings.append(
                f"the files take {format_size(plan['bytes'])}, more than the cache's budget"
                f" of {format_size(plan['budget'])}: the last ones evict the first"
            )

    def _report(self, done: dict[str, Any], elapsed: float) -> int:
        plan = self._plan
        jobs = plan.get("jobs", 0)
        stored = done.get("bytes", 0)
        print(
            f"exported {done.get('stored', 0):,} of {plan.get('export', 0):,} native files"
            f" in {jobs:,} job{_s(jobs)}: {format_size(stored)} in {elapsed:.1f} s"
            + (f"; {plan['cached']:,} were cached already" if plan.get("cached") else "")
        )
        if plan.get("converted"):
            print(
                f"left {plan['converted']:,} converted files to the per-file path"
                " (fsmount cache prefetch without --batch reads them)"
            )
        per_file = [self._mountpoint / path for path in done.get("per_file", [])]
        if not per_file:
            return 0
        print(f"reading {len(per_file):,} native file{_s(len(per_file))} one by one", flush=True)
        return self._read_files(per_file)


def _s(count: int) -> str:
    return "" if count == 1 else "s"
