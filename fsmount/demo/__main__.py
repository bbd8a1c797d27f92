"""`python -m fsmount.demo`: run the fake services until Ctrl-C, for benchmarks and manual use.

It prints everything needed to point fsmount (or the official clients) at them, as shell
`export` lines, so `eval` of the output configures a shell.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType

from fsmount.demo.services import DemoServices, start_demo_services


def describe(services: DemoServices) -> list[str]:
    """The lines printed at startup; comments for humans, `export` lines for shells."""
    lines = []
    if services.gc is not None:
        gc = services.gc
        lines += [
            f"# Grand Challenge API {gc.api_url} (storage {gc.storage_url})",
            f"# archives: {', '.join(gc.archive_slugs())} (demo-private needs the token)",
            f"export GRAND_CHALLENGE_API_URL={gc.api_url}",
            f"export GRAND_CHALLENGE_AUTHORIZATION={gc.token}",
        ]
        if gc.ca_file is not None:
            lines.append(f"export SSL_CERT_FILE={gc.ca_file}")
    # >>> Scenario wiring: describe services.scenario here. <<<
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fsmount.demo", description=__doc__)
    parser.add_argument("--tls", action="store_true", help="serve HTTPS with a throwaway CA")
    parser.add_argument("--no-grand-challenge", action="store_true")
    parser.add_argument("--no-scenario", action="store_true")
    parser.add_argument("--workdir", type=Path, help="where TLS files go (default: a temp dir)")
    args = parser.parse_args(argv)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: shells ignore it for `cmd &`
        signal.signal(signum, stop)
    with start_demo_services(
        grand_challenge=not args.no_grand_challenge,
        scenario=not args.no_scenario,
        tls=args.tls,
        workdir=args.workdir,
    ) as services:
        print("\n".join(describe(services)), flush=True)
        print("# serving until Ctrl-C", file=sys.stderr, flush=True)
        try:
            while True:
                signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
