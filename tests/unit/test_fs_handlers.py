"""The FUSE adapter's safety net, in process: a bug or a hang answers one request, not all."""

from __future__ import annotations

import errno
import time

import pyfuse3
import pytest
import trio

from fsmount.fs import Operations
from fsmount.tree import Directory, ListedDirectory, Node, TreeContext


def make_ops(loader, deadline: float = 5.0) -> Operations:
    ctx = TreeContext(lambda keys: {k: 1.0 for k in keys})
    child = ListedDirectory("broken", ctx, loader=loader)
    root = Directory("", ctx, children=[child])
    return Operations(root, content=None, request_deadline=deadline)  # type: ignore[arg-type]


async def lookup_then_list(ops: Operations) -> None:
    attrs = await ops.lookup(pyfuse3.ROOT_INODE, b"broken", None)  # type: ignore[arg-type]
    await ops.lookup(attrs.st_ino, b"anything", None)  # type: ignore[arg-type]


def test_unexpected_error_in_a_handler_becomes_eio_and_the_next_request_works() -> None:
    calls = 0

    async def loader(parent: Directory) -> list[Node]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("a bug")
        return []

    ops = make_ops(loader)
    with pytest.raises(pyfuse3.FUSEError) as err:
        trio.run(lookup_then_list, ops)
    assert err.value.errno == errno.EIO
    with pytest.raises(pyfuse3.FUSEError) as err:
        trio.run(lookup_then_list, ops)
    assert err.value.errno == errno.ENOENT  # the listing now works and has no such entry


def test_a_hung_request_ends_with_etimedout_at_its_deadline() -> None:
    async def loader(parent: Directory) -> list[Node]:
        await trio.sleep_forever()
        raise AssertionError

    ops = make_ops(loader, deadline=0.2)
    started = time.monotonic()
    with pytest.raises(pyfuse3.FUSEError) as err:
        trio.run(lookup_then_list, ops)
    assert err.value.errno == errno.ETIMEDOUT
    assert time.monotonic() - started < 5
