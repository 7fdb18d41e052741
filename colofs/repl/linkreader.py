"""What a primary VM's link reads from the secondary on one connection, and its keepalive.

:func:`read_replies` takes ACKs, RECEIPTs, CHECKPOINT_DONEs, resync and
verify answers, PINGs and ERRORs, checks each against what was sent on the
connection and hands it to the part of :class:`~colofs.repl.sender.VMLink`
that owns it; :func:`keepalive` pings and drops a silent peer. Both run as
tasks of the link's connection, beside its sender.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

from colofs.core.vm import VM
from colofs.repl.checkpoints import Checkpoints
from colofs.repl.config import ReplConfig
from colofs.repl.errors import PeerTimeout, ReplError, ReplProtocolError
from colofs.repl.linkstate import Conn, Lifecycle
from colofs.repl.tracking import Tracking
from colofs.wire.errors import ConnectionClosed
from colofs.wire.messages import (
    Ack,
    CheckpointDone,
    Error,
    Ping,
    Pong,
    Receipt,
    ResyncDone,
    ResyncRequest,
    VerifyDigests,
)


class VMLink(Protocol):
    """The parts of :class:`colofs.repl.sender.VMLink` the replies go to."""

    vm: VM
    tracking: Tracking
    checkpoints: Checkpoints
    life: Lifecycle
    verify_sink: Callable[[object, VerifyDigests], None] | None

    @property
    def acked(self) -> int: ...


async def read_replies(link: VMLink, conn: Conn) -> None:
    """Read the secondary's frames on ``conn`` until it fails; a frame out of place is a protocol error."""
    while True:
        try:
            msg = await conn.fs.receive()
        except ConnectionClosed:
            raise ReplError("the secondary closed the connection") from None
        conn.last_rx = trio.current_time()
        if isinstance(msg, Receipt):
            on_receipt(link, conn, msg.seq)
        elif isinstance(msg, Ack):
            on_ack(link, conn, msg.seq)
        elif isinstance(msg, CheckpointDone):
            await link.checkpoints.on_checkpoint_done(msg)
        elif isinstance(msg, ResyncRequest):
            try:
                conn.answers_tx.send_nowait(msg)
            except trio.WouldBlock:
                raise ReplProtocolError("unsolicited RESYNC_REQUEST frames") from None
        elif isinstance(msg, ResyncDone):
            if msg.seq != conn.sent_upto:
                raise ReplProtocolError(f"RESYNC_DONE echo for seq {msg.seq}, the resync was up to {conn.sent_upto}")
            conn.resync_done = msg.seq
            link.tracking.acknowledged(msg.seq)  # announces it
        elif isinstance(msg, VerifyDigests):
            if link.verify_sink is None:
                raise ReplProtocolError("VERIFY_DIGESTS, but no verify is running")
            link.verify_sink(conn, msg)
            link.life.announce()
        elif isinstance(msg, Pong):
            pass
        elif isinstance(msg, Ping):
            await conn.sender.send(Pong(msg.token))
        elif isinstance(msg, Error):
            raise ReplError(f"the secondary dropped VM {link.vm.name}: {msg.message} (error {msg.code})")
        else:
            raise ReplProtocolError(f"unexpected {msg.TYPE.name} from the secondary")


def on_ack(link: VMLink, conn: Conn, seq: int) -> None:
    """An ACK: every write up to ``seq`` is applied; batches up to it leave the window."""
    if seq > conn.sent_upto or seq < link.acked:
        raise ReplProtocolError(
            f"ACK of seq {seq} outside what was sent (acknowledged {link.acked}, sent {conn.sent_upto})")
    while conn.inflight and conn.inflight[0] <= seq:
        conn.inflight.popleft()
    link.tracking.acknowledged(seq)


def on_receipt(link: VMLink, conn: Conn, seq: int) -> None:
    """A RECEIPT: checked like an ACK, it lets sync writers up to ``seq`` go on, and changes nothing else."""
    if not conn.receipts:
        raise ReplProtocolError("RECEIPT from a secondary this connection did not ask for receipts")
    if seq > conn.sent_upto or seq <= conn.receipted:
        raise ReplProtocolError(
            f"RECEIPT of seq {seq} outside what was sent and not yet receipted "
            f"(receipted {conn.receipted}, sent {conn.sent_upto})")
    conn.receipted = seq
    link.tracking.receipted(seq)


async def keepalive(cfg: ReplConfig, conn: Conn) -> None:
    """Ping every ``ping_interval``; a peer silent for ``peer_timeout``, or not reading, ends the connection."""
    token = 0
    while True:
        await trio.sleep(cfg.ping_interval)
        idle = trio.current_time() - conn.last_rx
        if idle > cfg.peer_timeout:
            raise PeerTimeout(f"no frame from the secondary for {idle:.1f} s")
        token += 1
        with trio.move_on_after(max(0.1, cfg.peer_timeout - idle)) as scope:
            await conn.sender.send(Ping(token))
        if scope.cancelled_caught:
            raise PeerTimeout("the secondary stopped reading (a ping could not be sent)")
