"""The primary's forwarding queue: every local write, in sequence order, for the replicator.

It is bounded in bytes and in writes, so a replicator that falls behind
slows the producer down instead of growing memory without limit (the
replication layer decides what to do when it stays full for long).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

import trio

from colofs.core.fileio import Buffer


@dataclass(frozen=True, slots=True)
class ForwardedWrite:
    seq: int
    disk: str
    offset: int
    data: Buffer


class WriteSink(Protocol):
    """Where a primary disk hands its writes (the replication layer implements it).

    ``wait_room`` and ``put_nowait`` run while the written blocks are locked,
    so writes to one block reach the sink in the order they reached base;
    ``wait_acked`` runs after the lock is released and returns at once in
    asynchronous mode, or once the peer acknowledged ``seq`` in sync mode.
    """

    async def wait_room(self, nbytes: int) -> None: ...

    def put_nowait(self, item: ForwardedWrite) -> None: ...

    async def wait_acked(self, seq: int) -> None: ...


class ForwardQueue:
    """FIFO of :class:`ForwardedWrite`, bounded by ``max_bytes`` and ``max_writes``."""

    def __init__(self, max_bytes: int = 64 << 20, max_writes: int = 65536) -> None:
        self.max_bytes = max_bytes
        self.max_writes = max_writes
        self._items: deque[ForwardedWrite] = deque()
        self._bytes = 0
        self._space = trio.Condition()
        self._ready = trio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes_queued(self) -> int:
        return self._bytes

    def has_room(self, nbytes: int) -> bool:
        # A write larger than the whole bound still passes once the queue is empty.
        if not self._items:
            return True
        return len(self._items) < self.max_writes and self._bytes + nbytes <= self.max_bytes

    async def wait_room(self, nbytes: int) -> None:
        """Wait until a write of ``nbytes`` fits; writers are served in arrival order."""
        if self.has_room(nbytes) and not self._space.statistics().tasks_waiting:
            return
        async with self._space:
            while not self.has_room(nbytes):
                await self._space.wait()

    def put_nowait(self, item: ForwardedWrite) -> None:
        """Enqueue; the caller made sure there is room (no await between check and put)."""
        if self._closed:
            return
        self._items.append(item)
        self._bytes += len(item.data)
        self._ready.set()

    async def wait_acked(self, seq: int) -> None:
        """The queue alone acknowledges nothing: asynchronous mode."""

    async def get_batch(self, max_bytes: int, max_writes: int = 1 << 16) -> list[ForwardedWrite]:
        """Wait for at least one write, then take as many as fit the limits."""
        while not self._items:
            if self._closed:
                return []
            self._ready = trio.Event()
            await self._ready.wait()
        out: list[ForwardedWrite] = []
        size = 0
        while self._items and len(out) < max_writes:
            nxt = self._items[0]
            if out and size + len(nxt.data) > max_bytes:
                break
            out.append(self._items.popleft())
            size += len(nxt.data)
        self._bytes -= size
        async with self._space:
            self._space.notify_all()
        return out

    def close(self) -> None:
        self._closed = True
        self._ready.set()
