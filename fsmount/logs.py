"""Where fsmount logs and how much: one setup for every command that logs."""

from __future__ import annotations

import logging
import os
import sys

from fsmount import config


def setup_logging(level: str, verbosity: int = 0) -> None:
    """Log to stderr; journald adds its own timestamps, so none under systemd."""
    levels = config.LOG_LEVELS
    index = min(max(levels.index(level) - verbosity, 0), len(levels) - 1)
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=levels[index].upper(), format=fmt, stream=sys.stderr, force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
