"""Signed URLs: when one expires, the book that reuses it until shortly before, and the form a
URL takes in logs."""

from __future__ import annotations

import base64
import calendar
import json
import logging
import time
from urllib.parse import parse_qs, urlsplit, urlunsplit

import trio
from cachetools import TLRUCache

from fsmount.blob import RemoteBlob, SignedUrl

log = logging.getLogger(__name__)

DEFAULT_URL_TTL = 60.0
_URL_BOOK_SIZE = 100_000  # signed URLs remembered at once (a URL is a few hundred bytes)


def redact(url: str) -> str:
    """A URL fit for logs: no query string (signatures) and no userinfo."""
    parts = urlsplit(str(url))
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def url_expiry(url: str, now: float | None = None) -> float:
    """When a signed URL stops working: `Expires=` (canned), or a CloudFront custom `Policy`."""
    now = time.time() if now is None else now
    query = parse_qs(urlsplit(url).query)
    try:
        if "Expires" in query:
            return float(query["Expires"][0])
        if "X-Amz-Expires" in query and "X-Amz-Date" in query:
            start = calendar.timegm(time.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ"))
            return start + float(query["X-Amz-Expires"][0])
        if "Policy" in query:
            raw = query["Policy"][0].replace("-", "+").replace("_", "=").replace("~", "/")
            policy = json.loads(base64.b64decode(raw + "=" * (-len(raw) % 4)))
            condition = policy["Statement"][0]["Condition"]["DateLessThan"]
            return float(condition["AWS:EpochTime"])
    except (ValueError, KeyError, IndexError, TypeError):
        log.warning("cannot read the expiry of signed URL %s", redact(url))
    return now + DEFAULT_URL_TTL


class UrlBook:
    """The signed URL of each blob, resolved at most once at a time and reused until near its
    expiry; expired ones drop out, so the book stays bounded."""

    def __init__(self) -> None:
        # blob key -> (signed URL, reuse until)
        self._urls: TLRUCache[str, tuple[SignedUrl, float]] = TLRUCache(
            maxsize=_URL_BOOK_SIZE, ttu=lambda _key, value, _now: value[1], timer=time.time
        )
        self._resolving: dict[str, trio.Event] = {}

    async def signed(self, blob: RemoteBlob, *, fresh: bool = False) -> SignedUrl:
        """The blob's signed URL; with `fresh`, a new one unless somebody just resolved it."""
        while True:
            current = self._urls.get(blob.key)
            if current is not None and not fresh and time.time() < current[1]:
                return current[0]
            pending = self._resolving.get(blob.key)
            if pending is None:
                break
            await pending.wait()
            fresh = False  # somebody just resolved it for us
        done = self._resolving[blob.key] = trio.Event()
        try:
            signed = await blob.resolve()
            self._urls[blob.key] = (signed, _reuse_until(signed))
            return signed
        finally:
            del self._resolving[blob.key]
            done.set()

    def forget(self, blob: RemoteBlob) -> None:
        self._urls.pop(blob.key, None)


def _reuse_until(signed: SignedUrl) -> float:
    """Stop using a URL shortly before it expires: a fifth of its life early, at most 30 s."""
    now = time.time()
    return signed.expires_at - min(30.0, max(0.0, signed.expires_at - now) / 5)
