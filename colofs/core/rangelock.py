"""A reader/writer lock over block ranges.

It serialises exactly the requests that must not interleave (docs/design.md,
invariant 1): an SVM read falling through to base against the
copy-before-write of the same block, read-modify-write of a partial block
against another write to it, a failover commit chunk against SVM I/O on it.
Requests on disjoint ranges never wait for each other, and an uncontended
acquire does not suspend, so the hot path pays a list scan, not a context
switch.

``async with lock.range(lo, hi, exclusive=...)`` holds a span for a block
of code; the FUSE read and write paths spell out ``try_acquire`` and
``release`` instead, to spare the hot path the context manager's calls.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager

import trio


class _Request:
    __slots__ = ("event", "exclusive", "granted", "spans")

    def __init__(self, spans: list[tuple[int, int]], exclusive: bool) -> None:
        self.spans = spans
        self.exclusive = exclusive
        self.granted = False
        self.event: trio.Event | None = None

    def conflicts(self, other: _Request) -> bool:
        if not (self.exclusive or other.exclusive):
            return False
        for lo, hi in self.spans:
            for olo, ohi in other.spans:
                if lo < ohi and olo < hi:
                    return True
        return False


class RangeLock:
    """Grants sets of ``[lo, hi)`` spans shared or exclusive; conflicting requests go first come, first served.

    A request for several spans is granted all at once or not at all: taking
    them one by one could deadlock against a queued request that overlaps
    two of them.
    """

    def __init__(self) -> None:
        self._held: list[_Request] = []
        self._waiting: list[_Request] = []

    def _free_for(self, req: _Request, waiting: list[_Request]) -> bool:
        for other in self._held:
            if req.conflicts(other):
                return False
        for other in waiting:
            if req.conflicts(other):
                return False
        return True

    def try_acquire(self, lo: int, hi: int, exclusive: bool) -> _Request | None:
        """Hold ``[lo, hi)`` now if it is free (no coroutine, no wait); None if it is not.

        The per-request fast path: an idle lock grants without scanning anything.
        """
        req = _Request([(lo, hi)], exclusive)
        if (not self._held and not self._waiting) or self._free_for(req, self._waiting):
            req.granted = True
            self._held.append(req)
            return req
        return None

    async def acquire(self, lo: int, hi: int, exclusive: bool) -> _Request:
        """Wait until ``[lo, hi)`` is free; returns the token to pass to :meth:`release`."""
        return await self.acquire_spans([(lo, hi)], exclusive)

    async def acquire_spans(self, spans: list[tuple[int, int]], exclusive: bool) -> _Request:
        """Wait until every span is free, then hold them all."""
        req = _Request(spans, exclusive)
        if self._free_for(req, self._waiting):
            req.granted = True
            self._held.append(req)
            return req
        req.event = trio.Event()
        self._waiting.append(req)
        try:
            await req.event.wait()
        except BaseException:
            if req.granted:
                self.release(req)
            else:
                self._waiting.remove(req)
                self._wake()
            raise
        return req

    @asynccontextmanager
    async def range(self, lo: int, hi: int, *, exclusive: bool) -> AsyncIterator[None]:
        """Hold ``[lo, hi)`` for the body of an ``async with``; released however the body ends."""
        req = self.try_acquire(lo, hi, exclusive) or await self.acquire(lo, hi, exclusive)
        try:
            yield
        finally:
            self.release(req)

    @asynccontextmanager
    async def spans(self, spans: list[tuple[int, int]], *, exclusive: bool) -> AsyncIterator[None]:
        """Hold every span at once (see :meth:`acquire_spans`) for the body of an ``async with``."""
        req = await self.acquire_spans(spans, exclusive)
        try:
            yield
        finally:
            self.release(req)

    def release(self, req: _Request) -> None:
        self._held.remove(req)
        if self._waiting:  # nobody to wake on the hot path
            self._wake()

    def _wake(self) -> None:
        still: list[_Request] = []
        for req in self._waiting:
            if self._free_for(req, still):
                req.granted = True
                self._held.append(req)
                assert req.event is not None
                req.event.set()
            else:
                still.append(req)
        self._waiting = still

    def held(self) -> int:
        """Number of granted requests (for tests and status)."""
        return len(self._held)


@asynccontextmanager
async def holding(locks: Iterable[tuple[RangeLock, int, int]]) -> AsyncIterator[None]:
    """Hold ``[lo, hi)`` of each lock exclusively, taken one after another in the order given.

    Everyone who holds several at once takes them in one global order (a
    VM's disks by name, a disk before its snapshots), so two holders never
    wait for each other in a circle.
    """
    async with AsyncExitStack() as stack:
        for lock, lo, hi in locks:
            await stack.enter_async_context(lock.range(lo, hi, exclusive=True))
        yield
