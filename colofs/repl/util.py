"""Small trio helpers shared by both sides."""

from __future__ import annotations

import trio


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The first leaf of a nursery's exception group that is not a cancellation.

    A session's tasks fail together; the first real error says why. A group
    made only of cancellations is returned whole so the cancel scope that
    caused it can catch it.
    """
    for exc in _leaves(group):
        if not isinstance(exc, trio.Cancelled):
            return exc
    return group


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for e in exc.exceptions:
            out += _leaves(e)
        return out
    return [exc]


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
