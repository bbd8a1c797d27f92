"""What every command says when it fails: one line on stderr, and an exit code.

Exit codes: 0 done; 1 the command failed; 2 bad arguments (also argparse's own code); 130
interrupted (Ctrl-C).
"""

from __future__ import annotations

import sys

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def error(message: str) -> None:
    print(f"fsmount: {message}", file=sys.stderr)


def warn(message: str) -> None:
    print(f"fsmount: warning: {message}", file=sys.stderr)
