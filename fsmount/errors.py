"""The few exception types that cross module boundaries.

Each layer raises these instead of its library's own exceptions, so the FUSE layer can turn
any failure into an errno without knowing about HTTP, and the CLI can print one clear line.
"""

from __future__ import annotations

import errno


class FetchError(Exception):
    """A remote object could not be listed or read; `errno` is what the reader should see.

    The message must never contain a secret or a signed URL's query string: it is logged.
    """

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err

    @classmethod
    def eio(cls, message: str) -> FetchError:
        return cls(errno.EIO, message)


class ContentChanged(FetchError):
    """The remote bytes changed version while being read: nothing mixed was served."""


class StartupError(Exception):
    """Mounting cannot start (bad credentials, unreachable API, unknown archive...).

    Its message is the one line printed on stderr, so it must be clear and secret-free.
    """
