"""The official scenario-sdk and the mount agree on the assets and their bytes."""

from __future__ import annotations

import pytest
import trio
from conftest import Mount
from test_scenario_sdk import compare_with_mount, sdk_snapshot

pytestmark = [pytest.mark.conformance, pytest.mark.fuse]


def test_the_official_sdk_sees_what_the_mount_serves(shared_mount: Mount, services) -> None:
    sc = services.scenario

    async def snapshot():
        return await sdk_snapshot(
            sc.api_url,
            sc.key,
            sc.secret,
            project_id=sc.project_id,
            fetch=lambda asset: asset.kind in ("3d", "video") or asset.id.endswith(("a", "b")),
        )

    assert compare_with_mount(trio.run(snapshot), shared_mount.path / "scenario") == []
