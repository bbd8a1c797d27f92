"""The status document: what a mount reports of itself, and the counters named in it.

`collect()` returns it; the status socket sends it as one JSON object per connection, and
`/metrics` turns it into Prometheus text::

    {
      "mountpoint": "/mnt/fsmount/lab",        # as the mount process was given it
      "pid": 1234,
      "started": 1700000000.0,                  # time.time() when the mount came up
      "services": [{"name": "grand-challenge", "api": "https://grand-challenge.org/api/v1/"}],
                                                # API URLs without userinfo or query strings
      "cache": {"dir": str, "bytes": int, "blocks": int, "budget": int, "hits": int,
                "misses": int, "bytes_fetched": int, "downloads_in_flight": int},
      "http": {"requests": int, "retries": int, "errors": int, "bytes_fetched": int,
               "url_resolves": int, "by_status": {"200": int, "206": int, ...}},
      "fuse": {"bytes_served": int, "reads": int, "errors": int, "xattr_requests": int,
               "entries": int}
    }

Every section and counter is optional for its readers (the table and the Prometheus text of
`render.py`): a missing one is left out rather than shown as 0, so a partial `collect()` is
never mistaken for an idle mount. Secrets never appear in it: it is readable by whoever can
reach the socket.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)

Collect = Callable[[], dict[str, Any]]
"""Returns the status document above; called once per status or metrics request, so it
takes a snapshot of counters and does no I/O: neither server may ever block the filesystem."""


def snapshot(collect: Collect) -> dict[str, Any]:
    """collect()'s answer, or an error document: a bug there must not kill the server."""
    try:
        return collect()
    except Exception as exc:
        log.exception("cannot collect the status")
        return {"error": f"cannot collect the status: {exc!r}"}


@dataclass(frozen=True, slots=True)
class Metric:
    """One counter of the status document, named once for both the table and Prometheus."""

    section: str  # "cache", "http" or "fuse"
    key: str
    name: str  # the Prometheus name
    kind: Literal["counter", "gauge"]
    help: str  # Prometheus HELP, and the row's label in the table
    unit: Literal["", "bytes"] = ""


METRICS: tuple[Metric, ...] = (
    Metric(
        "cache", "bytes", "fsmount_cache_bytes", "gauge", "bytes held in the disk cache", "bytes"
    ),
    Metric("cache", "blocks", "fsmount_cache_blocks", "gauge", "blocks held in the disk cache"),
    Metric("cache", "budget", "fsmount_cache_budget_bytes", "gauge", "disk cache budget", "bytes"),
    Metric(
        "cache", "hits", "fsmount_cache_hits_total", "counter", "block reads served from the cache"
    ),
    Metric(
        "cache",
        "misses",
        "fsmount_cache_misses_total",
        "counter",
        "block reads that waited for a download",
    ),
    Metric(
        "cache",
        "bytes_fetched",
        "fsmount_cache_fetched_bytes_total",
        "counter",
        "bytes downloaded into the cache",
        "bytes",
    ),
    Metric(
        "cache",
        "downloads_in_flight",
        "fsmount_cache_downloads_in_flight",
        "gauge",
        "downloads in progress",
    ),
    Metric("http", "requests", "fsmount_http_requests_total", "counter", "HTTP requests sent"),
    Metric(
        "http",
        "retries",
        "fsmount_http_retries_total",
        "counter",
        "HTTP requests retried after a transient failure",
    ),
    Metric(
        "http",
        "errors",
        "fsmount_http_errors_total",
        "counter",
        "HTTP operations that failed for good",
    ),
    Metric(
        "http",
        "bytes_fetched",
        "fsmount_http_fetched_bytes_total",
        "counter",
        "bytes received over HTTP",
        "bytes",
    ),
    Metric(
        "http",
        "url_resolves",
        "fsmount_http_url_resolves_total",
        "counter",
        "signed download URLs obtained",
    ),
    Metric(
        "fuse",
        "bytes_served",
        "fsmount_fuse_served_bytes_total",
        "counter",
        "bytes returned to readers",
        "bytes",
    ),
    Metric("fuse", "reads", "fsmount_fuse_reads_total", "counter", "read requests answered"),
    Metric(
        "fuse",
        "errors",
        "fsmount_fuse_errors_total",
        "counter",
        "requests answered with an error",
    ),
    Metric(
        "fuse",
        "entries",
        "fsmount_fuse_entries",
        "gauge",
        "files and directories the kernel holds",
    ),
    Metric(
        "fuse",
        "xattr_requests",
        "fsmount_fuse_xattr_requests_total",
        "counter",
        "extended attribute requests answered",
    ),
)

METRICS_BY_KEY = {(m.section, m.key): m for m in METRICS}


def metric_value(status: Mapping[str, Any], metric: Metric) -> int | float | None:
    section = status.get(metric.section)
    value = section.get(metric.key) if isinstance(section, Mapping) else None
    return value if is_number(value) else None


def responses_by_status(status: Mapping[str, Any]) -> dict[str, int]:
    http = status.get("http")
    by_status = http.get("by_status") if isinstance(http, Mapping) else None
    if not isinstance(by_status, Mapping):
        return {}
    return {str(code): count for code, count in sorted(by_status.items()) if is_number(count)}


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
