"""A count of running work that can be waited on until none is left, for the store's writes
(the instance lock outlives them) and its background downloads (`drain`)."""

from __future__ import annotations

import trio


class Running:
    """How many of some kind of work are running, and a way to wait until none is."""

    __slots__ = ("_none", "count")

    def __init__(self) -> None:
        self.count = 0
        self._none = trio.Event()
        self._none.set()

    def enter(self) -> None:
        self.count += 1
        if self.count == 1:
            self._none = trio.Event()

    def leave(self) -> None:
        self.count -= 1
        if not self.count:
            self._none.set()

    async def wait_none(self) -> None:
        while self.count:  # another may have started between the event and this check
            await self._none.wait()
