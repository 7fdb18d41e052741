"""Running a few core operations at once, with the error of the one that failed.

A trio nursery reports its tasks' errors as an exception group; the core's
callers (the mount, the wire, recovery) expect the core's own errors
(``DiskIOError`` and the like), as when the same work ran one piece after
another. :func:`together` runs the pieces and raises the first real error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio


async def together(*jobs: Callable[[], Awaitable[object]]) -> None:
    """Run ``jobs`` concurrently; if any fails, the others are cancelled and the first real error is raised."""
    try:
        async with trio.open_nursery() as nursery:
            for job in jobs:
                nursery.start_soon(job)
    except BaseExceptionGroup as group:
        raise first_error(group) from None


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The first leaf of a nursery's group that is not a cancellation (the group itself if all are)."""
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
