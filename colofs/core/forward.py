"""What a primary disk hands on: every local write, in sequence order, to its write sink.

The replication layer implements the sink (one per primary VM);
the core only knows this protocol, so it holds writers back or waits for an
acknowledgement without knowing what is on the other side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

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

