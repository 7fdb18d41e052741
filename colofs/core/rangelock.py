"""A reader/writer lock over block ranges.

It serialises exactly the requests that must not interleave (DESIGN.md,
invariant 1): an SVM read falling through to base against the
copy-before-write of the same block, read-modify-write of a partial block
against another write to it, a failover commit chunk against SVM I/O on it.
Requests on disjoint ranges never wait for each other, and an uncontended
acquire does not suspend, so the hot path pays a list scan, not a context
switch.
"""

from __future__ import annotations

import trio


class _Request:
    __slots__ = ("event", "exclusive", "granted", "hi", "lo")

    def __init__(self, lo: int, hi: int, exclusive: bool) -> None:
        self.lo = lo
        self.hi = hi
        self.exclusive = exclusive
        self.granted = False
        self.event: trio.Event | None = None

    def conflicts(self, other: _Request) -> bool:
        return (self.exclusive or other.exclusive) and self.lo < other.hi and other.lo < self.hi


class RangeLock:
    """Grants ``[lo, hi)`` shared or exclusive; conflicting requests are served first come, first served."""

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

    async def acquire(self, lo: int, hi: int, exclusive: bool) -> _Request:
        """Wait until the range is free; returns the token to pass to :meth:`release`."""
        req = _Request(lo, hi, exclusive)
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

    def release(self, req: _Request) -> None:
        self._held.remove(req)
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


class Locked:
    """``async with Locked(lock, lo, hi, exclusive):`` for one range."""

    __slots__ = ("_exclusive", "_hi", "_lo", "_lock", "_req")

    def __init__(self, lock: RangeLock, lo: int, hi: int, exclusive: bool) -> None:
        self._lock = lock
        self._lo = lo
        self._hi = hi
        self._exclusive = exclusive
        self._req: _Request | None = None

    async def __aenter__(self) -> None:
        self._req = await self._lock.acquire(self._lo, self._hi, self._exclusive)

    async def __aexit__(self, *exc: object) -> None:
        assert self._req is not None
        self._lock.release(self._req)
