"""A write sink for tests of the core's primary path, without a secondary.

It keeps what a primary disk forwards, in the order it arrives, and can be
bounded in bytes so a test can watch writers being held back in
``wait_room`` (the backpressure the replication layer applies).
"""

from __future__ import annotations

from collections import deque

import trio

from colofs.core.forward import ForwardedWrite


class RecordingSink:
    """A :class:`~colofs.core.forward.WriteSink` that queues writes until a test takes them."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.bytes_queued = 0
        self.waiting = 0
        """Writers held in :meth:`wait_room` now."""
        self._items: deque[ForwardedWrite] = deque()
        self._ready = trio.Event()
        self._room = trio.Condition()

    def _fits(self, nbytes: int) -> bool:
        # A write larger than the whole bound still passes once nothing is queued.
        return self.max_bytes is None or not self._items or self.bytes_queued + nbytes <= self.max_bytes

    async def wait_room(self, nbytes: int) -> None:
        """Hold the writer while ``nbytes`` more would pass ``max_bytes``; writers keep their order."""
        if self._fits(nbytes) and not self.waiting:
            return
        async with self._room:
            self.waiting += 1
            try:
                while not self._fits(nbytes):
                    await self._room.wait()
            finally:
                self.waiting -= 1

    def put_nowait(self, item: ForwardedWrite) -> None:
        self._items.append(item)
        self.bytes_queued += len(item.data)
        self._ready.set()

    async def wait_acked(self, seq: int) -> None:
        """Nothing acknowledges here: asynchronous mode."""

    async def get_batch(self, max_bytes: int) -> list[ForwardedWrite]:
        """Wait for at least one write, then take as many as fit ``max_bytes``."""
        while not self._items:
            self._ready = trio.Event()
            await self._ready.wait()
        out: list[ForwardedWrite] = []
        size = 0
        while self._items and (not out or size + len(self._items[0].data) <= max_bytes):
            w = self._items.popleft()
            out.append(w)
            size += len(w.data)
        self.bytes_queued -= size
        async with self._room:
            self._room.notify_all()
        return out
