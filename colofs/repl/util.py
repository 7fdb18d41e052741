"""Small trio helpers shared by both sides."""

from __future__ import annotations

import trio

from colofs.core.together import first_error

__all__ = ["Signal", "first_error"]


class Signal:
    """A level-triggered "something changed": waiters wake on the next :meth:`fire`."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = trio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()
