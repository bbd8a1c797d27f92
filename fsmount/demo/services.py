"""Start the fake services together, for `fsmount demo`, `python -m fsmount.demo` and the tests."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from fsmount.demo.grand_challenge import GrandChallengeFake
from fsmount.demo.httpcommon import make_tls
from fsmount.demo.scenario import ScenarioFake


@dataclass
class DemoServices:
    """The running fakes; a service that was not asked for is None."""

    gc: GrandChallengeFake | None
    scenario: ScenarioFake | None
    workdir: Path
    _owns_workdir: bool = False

    def stop(self) -> None:
        """Stop every server and remove the working directory if it was created here."""
        if self.gc is not None:
            self.gc.stop()
        if self.scenario is not None:
            self.scenario.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_demo_services(
    *,
    grand_challenge: bool = True,
    scenario: bool = True,
    tls: bool = False,
    workdir: Path | None = None,
) -> DemoServices:
    """Start the requested fakes on loopback and return once they all listen.

    `workdir` receives the throwaway TLS files (the CA is `gc.ca_file`); a temporary directory
    is used, and removed on `stop()`, when none is given.
    """
    owns = workdir is None
    directory = Path(tempfile.mkdtemp(prefix="fsmount-demo-")) if workdir is None else workdir
    tls_files = make_tls(directory / "tls") if tls else None
    services = DemoServices(None, None, directory, owns)
    try:
        if grand_challenge:
            services.gc = GrandChallengeFake(tls=tls_files)
        if scenario:
            services.scenario = ScenarioFake(tls=tls_files)
    except BaseException:
        services.stop()
        raise
    return services
