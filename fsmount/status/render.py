"""The status document shown: a table for people (`fsmount status`), Prometheus text for
scrapers (`/metrics`). Both read every counter through `document.METRICS`, so a counter is
named once for both."""

from __future__ import annotations

import io
import time
from collections.abc import Iterable, Mapping
from typing import Any

from fsmount.status.document import (
    METRICS,
    METRICS_BY_KEY,
    is_number,
    metric_value,
    responses_by_status,
)

SECTION_TITLES = {"cache": "disk cache", "http": "HTTP", "fuse": "readers"}


def format_size(n: float) -> str:
    """Binary units, as the cache size is given (`10G` is 10 GiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s"


def _summary_rows(status: Mapping[str, Any], now: float) -> Iterable[tuple[str, str]]:
    if "pid" in status:
        yield "pid", str(status["pid"])
    if is_number(status.get("started")):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status["started"]))
        yield "up", f"{format_duration(now - status['started'])} (since {started})"
    for service in status.get("services") or ():
        yield str(service.get("name", "?")), str(service.get("api", ""))
    cache = status.get("cache")
    if isinstance(cache, Mapping) and cache.get("dir"):
        yield "cache directory", str(cache["dir"])


def _section_rows(status: Mapping[str, Any], section: str) -> Iterable[tuple[str, str]]:
    for metric in METRICS:
        if metric.section != section:
            continue
        value = metric_value(status, metric)
        if value is not None:
            yield metric.help, format_size(value) if metric.unit == "bytes" else f"{value:,}"
    if section == "cache":
        hits = metric_value(status, METRICS_BY_KEY["cache", "hits"])
        misses = metric_value(status, METRICS_BY_KEY["cache", "misses"])
        if hits is not None and misses is not None and hits + misses:
            yield "hit rate", f"{100 * hits / (hits + misses):.1f}%"
    if section == "http" and (codes := responses_by_status(status)):
        yield "responses by status", ", ".join(f"{code}: {n:,}" for code, n in codes.items())


def render(status: Mapping[str, Any], *, now: float | None = None, width: int = 100) -> str:
    """The status document as a table for people (plain text: no colour codes to paste)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    now = time.time() if now is None else now
    table = Table(
        title=f"fsmount at {status.get('mountpoint', '?')}",
        title_justify="left",
        show_header=False,
        box=box.SIMPLE,
    )
    table.add_column("what", no_wrap=True)
    table.add_column("value", overflow="fold")
    for label, value in _summary_rows(status, now):
        table.add_row(label, value)
    for section, title in SECTION_TITLES.items():
        rows = list(_section_rows(status, section))
        if rows:
            table.add_section()
            table.add_row(f"[bold]{title}[/bold]", "")
            for label, value in rows:
                table.add_row(f"  {label}", value)
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None, force_terminal=False).print(table)
    return "".join(line.rstrip() + "\n" for line in buffer.getvalue().splitlines())


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _sample(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


def _family(
    name: str, kind: str, help_text: str, samples: Iterable[tuple[str, float]]
) -> list[str]:
    """One metric family: HELP, TYPE and its samples (`labels` already formatted)."""
    lines = [f"# HELP {name} {_escape_help(help_text)}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{labels} {_sample(value)}" for labels, value in samples]
    return lines


def prometheus(status: Mapping[str, Any]) -> str:
    """The status document in the Prometheus text exposition format, version 0.0.4."""
    lines: list[str] = []
    if "mountpoint" in status:
        labels = f'{{mountpoint="{_escape_label(str(status["mountpoint"]))}"}}'
        lines += _family("fsmount_info", "gauge", "the mount this process serves", [(labels, 1)])
    if is_number(status.get("started")):
        lines += _family(
            "fsmount_start_time_seconds",
            "gauge",
            "when the mount came up, in seconds since the epoch",
            [("", status["started"])],
        )
    services = [
        (
            f'{{service="{_escape_label(str(s.get("name", "")))}",'
            f'api="{_escape_label(str(s.get("api", "")))}"}}',
            1,
        )
        for s in status.get("services") or ()
        if isinstance(s, Mapping)
    ]
    if services:
        lines += _family("fsmount_service_info", "gauge", "a service this mount shows", services)
    for metric in METRICS:
        value = metric_value(status, metric)
        if value is not None:
            lines += _family(metric.name, metric.kind, metric.help, [("", value)])
    codes = responses_by_status(status)
    if codes:
        lines += _family(
            "fsmount_http_responses_total",
            "counter",
            "HTTP responses received, by status code",
            [(f'{{code="{_escape_label(code)}"}}', n) for code, n in codes.items()],
        )
    return "\n".join(lines) + "\n" if lines else ""
