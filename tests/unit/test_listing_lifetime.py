"""A listed directory's lifetime, in process: what a reader gets when its TTL is up, after
SIGHUP, and when the service fails meanwhile."""

from __future__ import annotations

import trio
import trio.testing

from fsmount.tree import Directory, File, ListedDirectory, Node, TreeContext


class Service:
    """A loader whose answers the test controls: each call waits until `release`d."""

    def __init__(self) -> None:
        self.calls = 0
        self.names = ["a"]
        self.fail = False
        self.gate = trio.Event()

    async def load(self, directory: ListedDirectory) -> list[Node]:
        self.calls += 1
        await self.gate.wait()
        if self.fail:
            raise OSError("the service is down")
        return [File(name) for name in self.names]

    def release(self) -> None:
        self.gate.set()
        self.gate = trio.Event()


def mounted(ttl: float) -> tuple[TreeContext, ListedDirectory, Service]:
    ctx = TreeContext(lambda keys: dict.fromkeys(keys, 1.0), listing_ttl=ttl)
    service = Service()
    listed = ListedDirectory("archive", ctx, loader=service.load)
    Directory("", ctx, children=[listed])
    return ctx, listed, service


def names(listing) -> list[str]:
    return [n.name for n in listing.nodes]


async def released(directory: ListedDirectory, service: Service) -> list[str]:
    """The listing a reader waits for, once the service answers."""
    got: list[list[str]] = []

    async def reader() -> None:
        got.append(names(await directory.children()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []  # waiting for the service
        service.release()
    return got[0]


async def listed_now(directory: ListedDirectory) -> list[str]:
    """The listing a reader gets, failing if it had to wait for the service."""
    with trio.fail_after(1):
        return names(await directory.children())


def test_when_the_ttl_is_up_readers_get_the_last_listing_while_a_new_one_comes() -> None:
    async def main() -> None:
        _, listed, service = mounted(ttl=0.0)  # up at once
        assert await released(listed, service) == ["a"]  # the first listing is waited for
        service.names = ["a", "b"]
        assert await listed_now(listed) == ["a"]  # stale, at once; one refresh behind it
        await trio.testing.wait_all_tasks_blocked()
        assert await listed_now(listed) == ["a"]  # still one refresh, not one per reader
        await trio.testing.wait_all_tasks_blocked()
        assert service.calls == 2
        service.release()
        await trio.testing.wait_all_tasks_blocked()
        assert names(listed.cached()) == ["a", "b"]

    trio.run(main)


def test_after_sighup_readers_wait_for_the_new_listing() -> None:
    async def main() -> None:
        ctx, listed, service = mounted(ttl=300.0)
        assert await released(listed, service) == ["a"]
        service.names = ["a", "b"]
        ctx.invalidate_all()
        assert await released(listed, service) == ["a", "b"]

    trio.run(main)


def test_a_refresh_behind_readers_that_fails_keeps_the_last_listing() -> None:
    async def main() -> None:
        _, listed, service = mounted(ttl=0.0)
        assert await released(listed, service) == ["a"]
        service.fail = True
        assert await listed_now(listed) == ["a"]
        await trio.testing.wait_all_tasks_blocked()
        service.release()  # the refresh fails, as a task of its own: nothing is raised
        await trio.testing.wait_all_tasks_blocked()
        service.fail = False
        assert await listed_now(listed) == ["a"]  # and the next one is asked for
        await trio.testing.wait_all_tasks_blocked()
        service.release()
        await trio.testing.wait_all_tasks_blocked()
        assert service.calls == 3

    trio.run(main)
