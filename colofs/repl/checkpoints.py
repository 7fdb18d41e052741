"""Checkpoints on a replicating primary: a marker in the stream, confirmed by the secondary.

A checkpoint waits until the link streams with nothing owed, then puts a
marker right after the VM's last write (no await between reading that seq
and queueing the marker) and cuts the dirty map there. The marker goes out
as CHECKPOINT behind exactly that write; the secondary's CHECKPOINT_DONE
makes the primary record the checkpoint as confirmed and free the retained
writes and dirty bits it makes unneeded. A marker that cannot go out (a
resync overtook it, the connection was lost before the secondary took it,
replication stopped) fails with the reason.

:class:`Checkpoints` is a part of :class:`~colofs.repl.sender.VMLink`: it owns
the markers; the stream (:mod:`~colofs.repl.batching`) sends them, a resync
or a lost connection fails them, through the methods below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import count

import trio

from colofs.core.vm import VM
from colofs.repl.config import ReplConfig
from colofs.repl.errors import CheckpointError, CheckpointTimeout, ReplProtocolError
from colofs.repl.linkstate import Lifecycle, LinkState
from colofs.repl.tracking import Tracking
from colofs.wire.messages import CheckpointDone


@dataclass(frozen=True)
class CheckpointResult:
    """A confirmed checkpoint: after write ``seq``, ``latency_s`` from the call to its return."""

    seq: int
    latency_s: float


class Marker:
    """A checkpoint waiting for the secondary: it goes out right after write ``seq``."""

    __slots__ = ("done", "error", "id", "sent", "seq")

    def __init__(self, seq: int, ident: int) -> None:
        self.seq = seq
        self.id = ident
        self.sent = False
        self.done = trio.Event()
        self.error: str | None = None


class Checkpoints:
    """The markers of one primary VM, from the checkpoint call to the secondary's confirmation."""

    def __init__(self, vm: VM, cfg: ReplConfig, life: Lifecycle, tracking: Tracking,
                 wake: Callable[[], None]) -> None:
        self.vm = vm
        self.cfg = cfg
        self.life = life
        self.tracking = tracking
        self._wake = wake  # the link's sender has a marker to send
        self.markers: list[Marker] = []
        """Markers not yet confirmed, in seq order."""
        self._ids = count(1)
        self.stats = {"checkpoints": 0, "checkpoint_failures": 0}

    async def replicate_checkpoint(self, timeout: float | None = None) -> CheckpointResult:
        """The replicating primary's checkpoint: the secondary takes it, then this host records it.

        Puts a marker after the last write, waits for the secondary's
        CHECKPOINT_DONE and records it (``VM.record_confirmed_checkpoint``).
        """
        timeout = self.cfg.checkpoint_timeout if timeout is None else timeout
        life = self.life
        if life.state == LinkState.STOPPED:
            raise CheckpointError(f"VM {self.vm.name}: replication is stopped")
        t0 = trio.current_time()
        marker: Marker | None = None
        try:
            with trio.fail_after(timeout):
                while True:
                    self.tracking.discover()
                    if life.streaming and self.tracking.checkpointable:
                        break
                    await life.wait_changed()
                # No await from reading the seq to queueing the marker: it sits right after write seq.
                seq = self.vm.state.last_applied
                marker = Marker(seq, next(self._ids))
                self.tracking.cut_at_checkpoint(seq)
                self.markers.append(marker)
                self._wake()
                await marker.done.wait()
        except trio.TooSlowError:
            self.stats["checkpoint_failures"] += 1
            if marker is not None and not marker.sent and marker in self.markers:
                self.markers.remove(marker)
            where = "was not acknowledged" if marker is not None else "could not start"
            raise CheckpointTimeout(
                f"VM {self.vm.name}: checkpoint {where} within {timeout:g} s "
                f"(secondary {life.state}; last error: {life.last_error or 'none'})"
            ) from None
        if marker.error is not None:
            self.stats["checkpoint_failures"] += 1
            raise CheckpointError(f"VM {self.vm.name}: checkpoint at seq {marker.seq} failed: {marker.error}")
        return CheckpointResult(marker.seq, trio.current_time() - t0)

    # -- for the stream ------------------------------------------------------------------------

    def due(self, upto: int) -> list[Marker]:
        """Markers not sent yet that go out once every write up to ``upto`` went out."""
        return [m for m in self.markers if not m.sent and m.seq <= upto]

    def sent(self, m: Marker) -> None:
        """``m`` went out behind its write: the secondary's CHECKPOINT_DONE may now confirm it."""
        m.sent = True

    def first_unsent(self, lo: int, hi: int) -> int | None:
        """The seq of the first unsent marker in ``[lo, hi)``: a batch stops there."""
        return next((m.seq for m in self.markers if not m.sent and lo <= m.seq < hi), None)

    def waiting(self) -> bool:
        """A marker waits to go out."""
        return any(not m.sent for m in self.markers)

    # -- for a resync and the connection ----------------------------------------------------------

    def fail_unsent_through(self, seq: int, why: str) -> None:
        for m in list(self.markers):
            if not m.sent and m.seq <= seq:
                self._fail(m, why)

    def reconnected(self, held: int, stream_from: int | None) -> list[Marker]:
        """A connection attached, the secondary holding checkpoint ``held``: the markers it confirms.

        Markers past ``held`` that the stream cannot carry again (it resumes
        at ``stream_from``, or a resync comes first) fail.
        """
        held_now = []
        for m in list(self.markers):
            if m.seq <= held:
                held_now.append(m)
            elif stream_from is None or m.seq < stream_from - 1:
                self._fail(m, "the connection was lost before the secondary took it")
        return held_now

    async def confirm_held(self, markers: list[Marker]) -> None:
        """Markers the secondary took before the last connection was lost."""
        for m in markers:
            await self._confirm(m.seq)
            self._complete(m)

    def connection_lost(self) -> None:
        """Every marker is sent again on the next connection (or fails there)."""
        for m in self.markers:
            m.sent = False

    def fail_all(self, why: str) -> None:
        for m in list(self.markers):
            self._fail(m, why)

    async def on_checkpoint_done(self, msg: CheckpointDone) -> None:
        m = next((m for m in self.markers if m.id == msg.id and m.sent), None)
        if m is None or m.seq != msg.seq:
            raise ReplProtocolError(f"CHECKPOINT_DONE for checkpoint {msg.id} at seq {msg.seq}, which was not sent")
        await self._confirm(m.seq)
        self._complete(m)
        self.life.announce()  # a verify waits for the next confirmed checkpoint

    def _fail(self, m: Marker, why: str) -> None:
        m.error = why
        m.done.set()
        if m in self.markers:
            self.markers.remove(m)

    def _complete(self, m: Marker) -> None:
        m.done.set()
        if m in self.markers:
            self.markers.remove(m)

    async def _confirm(self, seq: int) -> None:
        """The secondary holds checkpoint ``seq`` durably: record it, free what it makes unneeded."""
        vm = self.vm
        with trio.CancelScope(shield=True):
            if seq > vm.state.last_checkpoint:
                await vm.record_confirmed_checkpoint(seq)
        self.tracking.checkpoint_confirmed(seq)
        self.stats["checkpoints"] += 1
