"""Timeouts, the retry budget and what a response says about trying again."""

from __future__ import annotations

import calendar
import dataclasses
import email.utils
import errno
import logging
import math
import random
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import trio

from fsmount.errors import FetchError

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 507})


@dataclass(frozen=True)
class HttpPolicy:
    """Timeouts and retry budget; one instance per mount, from the configuration."""

    deadline: float = 60.0  # a whole operation (with its retries) never takes longer
    connect_timeout: float = 10.0
    stall_timeout: float = 20.0  # no byte received for this long counts as a failure
    base_delay: float = 0.25
    max_delay: float = 10.0
    max_connections: int = 32

    @classmethod
    def within(cls, deadline: float) -> HttpPolicy:
        """The policy for an overall deadline (`--timeout`): a stall or a connection attempt
        may use up a third of it at most, so that at least one retry always fits."""
        return cls(
            deadline=deadline,
            connect_timeout=min(cls.connect_timeout, max(0.5, deadline / 3)),
            stall_timeout=min(cls.stall_timeout, max(0.5, deadline / 3)),
        )


@dataclass
class TransferStats:
    """Counters for `fsmount status`; plain ints bumped inline (one thread)."""

    requests: int = 0
    retries: int = 0
    bytes_fetched: int = 0
    url_resolves: int = 0
    errors: int = 0
    by_status: Counter[int] = dataclasses.field(default_factory=Counter)


def status_errno(status: int) -> int:
    """Errno a reader sees for a final HTTP status (never ENOENT for a transient error)."""
    if status == 404 or status == 410:
        return errno.ENOENT
    if status in (401, 403):
        return errno.EACCES
    if status == 429:
        return errno.EAGAIN
    return errno.EIO


def http_date(value: str) -> float | None:
    """An HTTP date as seconds since the epoch, or None when it is not one.

    Every form HTTP allows means GMT, the asctime form too, though it writes no zone: the
    zone-less result of `email.utils` must not be read as local time.
    """
    try:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        return float(calendar.timegm((*parsed[:6], 0, 0, 0)) - (parsed[9] or 0))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def retry_after(response: httpx.Response) -> float | None:
    """Seconds the server asked us to wait (`Retry-After`, or a `remainingSeconds` body).

    Anything else than a finite number of seconds or an HTTP date is no hint: the caller
    backs off as usual rather than failing a read over a header.
    """
    wait: float | None = None
    value = response.headers.get("Retry-After")
    if value:
        try:
            wait = float(value)
        except ValueError:
            when = http_date(value)
            wait = None if when is None else when - time.time()
    elif response.headers.get("Content-Type", "").startswith("application/json"):
        try:
            body = response.json()
        except ValueError:
            return None
        seconds = body.get("remainingSeconds") if isinstance(body, dict) else None
        if isinstance(seconds, int | float) and not isinstance(seconds, bool):
            wait = float(seconds)
    if wait is None or not math.isfinite(wait):
        return None
    return max(0.0, wait)


def error_reason(response: httpx.Response) -> str:
    """A short, secret-free reason from an error body (`detail`, `reason`, `message`)."""
    try:
        body = response.json()
    except ValueError:
        return ""
    if isinstance(body, dict):
        for field in ("detail", "reason", "message", "error"):
            if isinstance(body.get(field), str):
                return f"({body[field][:200]})"
    return ""


class Attempts:
    """Backoff bookkeeping for one operation: decides whether another try fits the deadline."""

    def __init__(self, policy: HttpPolicy, what: str, stats: TransferStats) -> None:
        self.policy = policy
        self.what = what
        self.stats = stats
        self.started = time.monotonic()
        self.count = 0

    def restart(self) -> None:
        """The operation made progress: its budget (time and backoff) starts again."""
        self.started = time.monotonic()
        self.count = 0

    def remaining(self) -> float:
        return self.policy.deadline - (time.monotonic() - self.started)

    async def backoff(self, reason: str, err: int, wait: float | None = None) -> None:
        """Sleep before the next try, or raise FetchError(err) when the budget is spent."""
        self.count += 1
        delay = min(self.policy.max_delay, self.policy.base_delay * 2 ** (self.count - 1))
        delay *= 1 - 0.25 * random.random()
        if wait is not None:
            delay = max(delay, wait)
        if delay >= self.remaining():
            self.stats.errors += 1
            raise FetchError(err, f"{self.what}: {reason}; giving up after {self.count} tries")
        self.stats.retries += 1
        log.debug("%s: %s; retry %d in %.2fs", self.what, reason, self.count, delay)
        await trio.sleep(delay)
