"""Deterministic, position-dependent byte streams for large sample files.

Large sample files are never stored: byte `i` of stream `seed` is a function of `(seed, i)`, so
any range can be produced (and checked by the tests) cheaply. The period is a prime, so a read at
a wrong offset never matches by accident, and a whole period sits in memory once per seed.
"""

from __future__ import annotations

import functools
import random

PERIOD = 1_048_573  # a prime just below 1 MiB


@functools.lru_cache(maxsize=8)
def _period(seed: int) -> bytes:
    block = random.Random(seed).randbytes(PERIOD)
    return block + block  # doubled so any window of up to PERIOD bytes is one slice


def pattern(seed: int, offset: int, length: int) -> bytes:
    """Return bytes `[offset, offset + length)` of the stream named by `seed`."""
    if length <= 0:
        return b""
    doubled = _period(seed)
    parts = []
    pos = offset % PERIOD
    remaining = length
    while remaining > 0:
        take = min(remaining, PERIOD)
        parts.append(doubled[pos : pos + take])
        remaining -= take
        pos = (pos + take) % PERIOD
    return b"".join(parts)
