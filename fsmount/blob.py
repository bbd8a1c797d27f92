"""Blobs: the small objects that name one remote (or inline) byte sequence.

Both services produce Blobs; the cache and the transfer layer never look inside a service.
A remote blob knows how to obtain a fresh signed URL for its bytes (`resolve`), never the URL
itself, because signed URLs expire and resolving one may cost an audited API request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SignedUrl:
    """A URL that grants access to one object's bytes until `expires_at` (Unix time).

    Most are presigned: the signature is in the query. Some services sign the request instead
    (AWS SigV4 headers, for HealthImaging): then `method` and `headers` are part of it, sent
    exactly as given (the signature covers them), and `refused`, if set, is told when storage
    refuses the request, before a new one is asked for: one signer may have signed many
    objects' requests at once, and must sign them all again, once.
    """

    url: str
    expires_at: float
    method: str = "GET"
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)  # signatures: secret
    refused: Callable[[], None] | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class BlobStat:
    """What must be known before the first byte is served: exact size, time, version."""

    size: int
    mtime: float
    etag: str | None = None


@dataclass(eq=False, slots=True)
class RemoteBlob:
    """Bytes fetched over HTTP from a signed URL.

    `key` identifies the object on its service (never a URL). `version` is set when the
    service itself names the content version (Scenario's `updatedAt`); otherwise the storage
    ETag learned on the first probe serves. `size`/`mtime` are set when the API gives them, which
    spares a probe. `description` is a secret-free label for logs. `costly_probe` marks
    bytes the service makes on demand (a format conversion): their size is never probed before
    a program asks for it.

    `whole_fetch` marks bytes whose storage tells no size (HealthImaging: no size anywhere,
    maybe no Range, maybe no Content-Length): the size is learned by fetching the whole object
    into the block cache, which is then its probe, so later reads are cache hits. Its blocks
    are kept before any ETag is seen, under `version`, which such a blob should name.
    """

    key: str
    resolve: Callable[[], Awaitable[SignedUrl]]
    description: str
    size: int | None = None
    mtime: float | None = None
    version: str | None = None
    xattrs: Mapping[str, str] | None = None
    costly_probe: bool = False
    whole_fetch: bool = False


@dataclass(eq=False)
class InlineBlob:
    """Bytes the API already sent (a JSON value): served from memory, never cached on disk."""

    data: bytes


@dataclass(eq=False, slots=True)
class RenderedBlob:
    """Bytes made from what the API sent when a program asks for them (a JSON value shown
    with `indent=2`): a walk of 100,000 items renders none of them."""

    render: Callable[[], bytes]


Blob = RemoteBlob | InlineBlob | RenderedBlob
