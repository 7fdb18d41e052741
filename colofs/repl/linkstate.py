"""Where a primary VM's link stands: its states and one connection's state.

The link goes, per connection attempt::

    IDLE -> CONNECTING -> ATTACHING -> [RESYNCING ->] STREAMING <-> RESYNCING
                 \\______________\\_____________\\__________\\-> DISCONNECTED | REFUSED -> CONNECTING ...

and to STOPPED when replication of the VM stops. Only STREAMING carries
writes as they happen; RESYNCING catches the secondary up from the dirty
map. Status shows each state as one of the words in :data:`SHOWN`.
"""

from __future__ import annotations

from collections import deque
from enum import StrEnum

import trio

from colofs.repl.framing import FrameSender
from colofs.repl.util import Signal
from colofs.wire.messages import ResyncRequest
from colofs.wire.stream import FrameStream


class LinkState(StrEnum):
    """The link's state machine (a ``str``: status and logs show its value)."""

    IDLE = "idle"
    CONNECTING = "connecting"
    ATTACHING = "attaching"
    RESYNCING = "resyncing"
    STREAMING = "streaming"
    DISCONNECTED = "disconnected"
    REFUSED = "refused"
    STOPPED = "stopped"


SHOWN: dict[LinkState, str] = {
    LinkState.STREAMING: "connected",
    LinkState.RESYNCING: "resyncing",
    LinkState.REFUSED: "refused",
    LinkState.STOPPED: "stopped",
    LinkState.IDLE: "connecting",
    LinkState.CONNECTING: "connecting",
    LinkState.ATTACHING: "connecting",
    LinkState.DISCONNECTED: "connecting",
}
"""What status calls each state: an operator cares whether writes flow, not how far an attempt got."""

CONNECTED = frozenset({LinkState.RESYNCING, LinkState.STREAMING})


class Lifecycle:
    """Where one link stands, why, and a signal for whoever waits for it (or its parts) to change.

    The link's parts share this object and nothing else of each other's
    state: they move the state, announce what they changed with
    :meth:`announce`, and wait with :meth:`wait_changed`.
    """

    def __init__(self) -> None:
        self.state = LinkState.IDLE
        self.last_error: str | None = None
        self.ups = 0
        """How often the link came up (entered a connected state) and went down again: a watcher that
        looks late still sees every connection, even one that came and went before it looked."""
        self.downs = 0
        self._changed = Signal()

    def move(self, state: LinkState) -> None:
        if (state in CONNECTED) != (self.state in CONNECTED):
            if state in CONNECTED:
                self.ups += 1
            else:
                self.downs += 1
        self.state = state
        self._changed.fire()

    def announce(self) -> None:
        """Something a waiter may look at changed (an ACK, a checkpoint, a resync pass, ...)."""
        self._changed.fire()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    @property
    def connected(self) -> bool:
        return self.state in CONNECTED

    @property
    def streaming(self) -> bool:
        return self.state == LinkState.STREAMING


class Conn:
    """One connection's state; discarded when it ends."""

    def __init__(self, fs: FrameStream, sender: FrameSender, peer: str) -> None:
        self.fs = fs
        self.sender = sender
        self.peer = peer
        self.disk_index: dict[str, int] = {}
        self.next_seq: int | None = None
        """Next write to stream; None until the first resync has placed the secondary."""
        self.sent_upto = 0
        """Highest seq the secondary may acknowledge (last batch or RESYNC_DONE sent)."""
        self.inflight: deque[int] = deque()
        self.last_rx = trio.current_time()
        self.answers_tx, self.answers_rx = trio.open_memory_channel[ResyncRequest](1024)
        self.resync_done: int | None = None
        """The S0 the secondary echoed back once it finished a resync."""
        self.receipts = False
        """Both sides announced receipts at the handshake: the secondary sends RECEIPTs."""
        self.receipted = 0
        """The last RECEIPT's seq on this connection (where the secondary stood at ATTACH before one)."""
