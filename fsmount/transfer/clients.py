"""The httpx clients every request goes through: trust store, timeouts, pooled connections."""

from __future__ import annotations

import itertools
import logging
import os
import ssl
import zlib
from typing import Any

import httpcore
import httpx

from fsmount.transfer.policy import HttpPolicy

log = logging.getLogger(__name__)

_POOL_SHARDS = 4  # httpx clients per service and for storage (see Clients)
_READ_CEILING = 1 << 20  # bytes one socket read may hand over (see raise_read_size)


def raise_read_size() -> None:
    """Let one socket read hand over whatever has arrived, up to 1 MiB (httpcore: 64 KiB).

    Each read costs a trip through h11, httpcore and httpx in Python, which was a large share
    of the mount's CPU on a fast sequential read; recv never waits to fill the ceiling, so a
    4 MiB range takes a few reads instead of sixty-four. httpcore has no setting for it, only
    the class attribute changed here: a version without it is a warning at mount, never a
    silent slowdown (and tests/unit/test_transfer_policy.py fails on it).
    """
    connection = httpcore.AsyncHTTP11Connection
    if isinstance(getattr(connection, "READ_NUM_BYTES", None), int):
        connection.READ_NUM_BYTES = _READ_CEILING
    else:
        log.warning(
            "httpcore %s has no AsyncHTTP11Connection.READ_NUM_BYTES: downloads read 64 KiB at"
            " a time and cost more CPU (see fsmount/transfer/clients.py)",
            httpcore.__version__,
        )


def tls_context() -> ssl.SSLContext:
    """The system trust store, or the CA bundle `SSL_CERT_FILE` names (as curl and git do)."""
    return ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE") or None)


class Clients:
    """A few httpx clients sharing a connection budget, one picked per request.

    httpcore's pool does work proportional to the square of its connections on every request
    it queues or releases; at 32 connections that was most of the mount's CPU while listing a
    directory of 10,000 files (two requests per size). Four pools of eight keep the same
    parallelism at a sixteenth of that cost.
    """

    def __init__(self, policy: HttpPolicy, **options: Any) -> None:
        shards = min(_POOL_SHARDS, policy.max_connections)
        per_shard = max(1, policy.max_connections // shards)
        tls = tls_context()  # the trust store is read once, not once per client
        self._clients = [
            httpx.AsyncClient(
                timeout=httpx.Timeout(policy.stall_timeout, connect=policy.connect_timeout),
                limits=httpx.Limits(max_connections=per_shard, max_keepalive_connections=per_shard),
                verify=tls,
                **options,
            )
            for _ in range(shards)
        ]
        self._turn = itertools.cycle(self._clients)

    def pick(self, key: str | None = None) -> httpx.AsyncClient:
        """The client for `key` (one object's requests share connections), or the next one."""
        if key is None:
            return next(self._turn)
        return self._clients[zlib.crc32(key.encode("utf-8", "surrogatepass")) % len(self._clients)]

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()
