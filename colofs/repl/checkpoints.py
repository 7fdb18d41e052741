"""Checkpoints on a replicating primary: a marker in the stream, confirmed by the secondary.

A checkpoint waits until the link streams with nothing owed, then puts a
marker right after the VM's last write (no await between reading that seq
and queueing the marker) and cuts the dirty map there. The marker goes out
as CHECKPOINT behind exactly that write; the secondary's CHECKPOINT_DONE
makes the primary record the checkpoint as confirmed and free the retained
writes and dirty bits it makes unneeded. A marker that cannot go out (a
resync overtook it, the connection was lost before the secondary took it,
replication stopped) fails with the reason.

:class:`Checkpoints` is a part of :class:`~colofs.repl.sender.VMLink`.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import count
from typing import TYPE_CHECKING

import trio

from colofs.core.vm import VM
from colofs.repl.config import ReplConfig
from colofs.repl.dirty import DirtyMap
from colofs.repl.errors import CheckpointError, CheckpointTimeout, ReplProtocolError
from colofs.repl.linkstate import LinkState
from colofs.repl.retained import RetainedLog
from colofs.repl.util import Signal
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

    vm: VM
    cfg: ReplConfig
    state: LinkState
    last_error: str | None
    dirty: DirtyMap
    retained: RetainedLog
    retaining: bool
    resync_needed: bool
    acked: int
    stats: dict[str, int]
    markers: list[Marker]
    _ids: count[int]
    _overflow_noted: bool
    _changed: Signal

    if TYPE_CHECKING:  # provided by VMLink and its other parts
        def _discover(self) -> None: ...
        def _wake(self) -> None: ...

    async def replicate_checkpoint(self, timeout: float | None = None) -> CheckpointResult:
        """The replicating primary's checkpoint: the secondary takes it, then this host records it.

        Puts a marker after the last write, waits for the secondary's
        CHECKPOINT_DONE and records it (``VM.record_confirmed_checkpoint``).
        """
        timeout = self.cfg.checkpoint_timeout if timeout is None else timeout
        if self.state == LinkState.STOPPED:
            raise CheckpointError(f"VM {self.vm.name}: replication is stopped")
        t0 = trio.current_time()
        marker: Marker | None = None
        try:
            with trio.fail_after(timeout):
                while True:
                    self._discover()
                    if self.state == LinkState.STREAMING and self.retaining and not self.resync_needed:
                        break
                    await self._changed.wait()
                # No await from reading the seq to queueing the marker: it sits right after write seq.
                seq = self.vm.state.last_applied
                marker = Marker(seq, next(self._ids))
                self.dirty.cut(seq)
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
                f"(secondary {self.state}; last error: {self.last_error or 'none'})"
            ) from None
        if marker.error is not None:
            self.stats["checkpoint_failures"] += 1
            raise CheckpointError(f"VM {self.vm.name}: checkpoint at seq {marker.seq} failed: {marker.error}")
        return CheckpointResult(marker.seq, trio.current_time() - t0)

    def _fail_marker(self, m: Marker, why: str) -> None:
        m.error = why
        m.done.set()
        if m in self.markers:
            self.markers.remove(m)

    def _complete_marker(self, m: Marker) -> None:
        m.done.set()
        if m in self.markers:
            self.markers.remove(m)

    async def _confirm(self, seq: int) -> None:
        """The secondary holds checkpoint ``seq`` durably: record it, free what it makes unneeded."""
        vm = self.vm
        with trio.CancelScope(shield=True):
            if seq > vm.state.last_checkpoint:
                await vm.record_confirmed_checkpoint(seq)
        self.retained.drop_through(min(seq, self.acked))
        self.dirty.drop_through(seq)
        self._overflow_noted = False
        self.stats["checkpoints"] += 1

    async def _on_checkpoint_done(self, msg: CheckpointDone) -> None:
        m = next((m for m in self.markers if m.id == msg.id and m.sent), None)
        if m is None or m.seq != msg.seq:
            raise ReplProtocolError(f"CHECKPOINT_DONE for checkpoint {msg.id} at seq {msg.seq}, which was not sent")
        await self._confirm(m.seq)
        self._complete_marker(m)
        self._changed.fire()  # a verify waits for the next confirmed checkpoint
