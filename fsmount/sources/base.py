"""What a service must offer to be mounted, and what every service does the same way.

`mount.py` goes through the services it knows in order; each one's `from_config` returns None
when it is not configured, else a `Source` built on the API client `connect` makes (closed
with the mount). The mount then asks it to `check` itself before anything is mounted, and
shows its `directory()` at the top of the tree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from fsmount.blob import SignedUrl
from fsmount.config import Config
from fsmount.errors import FetchError, StartupError
from fsmount.transfer import ApiClient, redact, url_expiry
from fsmount.tree import Directory, TreeContext

STARTUP_DEADLINE = 10.0  # seconds: a mount that cannot work must say so quickly

Connect = Callable[[str, Callable[[], dict[str, str]], str], ApiClient]
"""Makes the client of one API: its URL, the headers that authenticate a request (asked for
each request, so secrets rotated on disk are picked up), its name in logs and status."""


class Source(Protocol):
    """One service, shown as one directory at the top of the mount."""

    async def check(self) -> None:
        """Fail before mounting, with a StartupError of one line, when the service cannot
        work: wrong credentials, an unreachable API, something asked for that is not there."""
        ...

    def directory(self) -> Directory: ...


class SourceFactory(Protocol):
    def __call__(self, cfg: Config, connect: Connect, ctx: TreeContext) -> Source | None: ...


async def startup_get(api: ApiClient, service: str, path: str, params: Mapping[str, Any]) -> Any:
    """A GET of `check`: within STARTUP_DEADLINE, and any failure the one line the mount
    prints before giving up."""
    try:
        return await api.get_json(path, params, deadline=STARTUP_DEADLINE)
    except FetchError as exc:
        raise StartupError(f"cannot use the {service} API: {exc}") from None


def signed_url(url: str) -> SignedUrl:
    """A signed URL a service handed out, used until the expiry it carries."""
    return SignedUrl(url, url_expiry(url))


def source_xattrs(source: str, api: ApiClient) -> dict[str, str]:
    """The attributes of a service's top directory (the API URL without its secrets)."""
    return {"source": source, "api": redact(api.base_url)}
