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
    if services.scenario is not None:
        scenario = services.scenario
        lines += [
            f"# Scenario API {scenario.api_url} (CDN {scenario.cdn_url})",
            f"export SCENARIO_BASE_URL={scenario.api_url}",
            f"export SCENARIO_SDK_API_KEY={scenario.key}",
            f"export SCENARIO_SDK_API_SECRET={scenario.secret}",
            f"export SCENARIO_PROJECT_ID={scenario.project_id}",
        ]
    # Both fakes share one throwaway CA (start_demo_services makes a single set of TLS files).
    ca_files = {fake.ca_file for fake in (services.gc, services.scenario) if fake is not None}
    lines += [f"export SSL_CERT_FILE={ca}" for ca in ca_files if ca is not None]
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
