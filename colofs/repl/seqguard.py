"""Whether a sequence number a primary sends fits where its session stands, checked before anything is recorded.

A secondary records what the primary's seqs say (``last_applied``, a
checkpoint), and a primary can only resume a secondary whose checkpoint is
not beyond its own last write. So every seq-carrying message of a session is
held against what the session knows:

* the primary's last seq: announced in ATTACH (its ``next_seq - 1``), raised
  by each batch it streams and each resync it completes. A primary never
  goes back, so neither may RESYNC_DONE; a checkpoint can only be at a seq
  the primary has shown. A batch shows its seqs itself: it must continue
  exactly where the secondary stands.
* how far the primary can have got since then: it writes at most
  ``max_rate`` writes a second, so a RESYNC_DONE (whose ``S0`` may include
  writes the stream has not carried yet) is bounded by that rate times the
  time since the seq was last learnt, plus a second of slack.
* whether a resync started: RESYNC_DATA and RESYNC_DONE follow a
  RESYNC_QUERY. Only a primary with no disks to compare ends a resync
  without one, and then at the secondary's own last seq.
* a VERIFY_LIVE_QUERY's seq (the secondary waits until it has applied it)
  is bounded like RESYNC_DONE's: a seq no primary can have reached would
  only hold a query up. It records nothing.
"""

from __future__ import annotations

from colofs.repl.errors import ReplProtocolError


class SeqGuard:
    """One session's sequence state; ``check_*`` raise :class:`ReplProtocolError`, ``took_*`` record."""

    def __init__(self, *, announced: int, last_applied: int, max_rate: int, now: float) -> None:
        self.next_seq = last_applied + 1
        """The next write this secondary takes from the stream."""
        self.primary_seq = announced
        """The highest seq the primary has shown it holds (ATTACH, a batch, a finished resync)."""
        self.max_rate = max_rate
        self._learnt = now
        self.resyncing = False
        """A RESYNC_QUERY came and its RESYNC_DONE has not."""

    def ceiling(self, now: float) -> int:
        """The highest seq the primary can have reached by ``now``."""
        return self.primary_seq + int((max(0.0, now - self._learnt) + 1.0) * self.max_rate)

    def _learn(self, seq: int, now: float) -> None:
        if seq > self.primary_seq:
            self.primary_seq = seq
            self._learnt = now

    def check_batch(self, first: int) -> None:
        if first != self.next_seq:
            what = "replays or goes backwards" if first < self.next_seq else "skips ahead"
            raise ReplProtocolError(f"BATCH at seq {first} {what}: the next seq is {self.next_seq}")

    def took_batch(self, last: int, now: float) -> None:
        self.next_seq = last + 1
        self._learn(last, now)

    def check_checkpoint(self, seq: int, last_applied: int) -> None:
        if seq != last_applied:
            raise ReplProtocolError(f"CHECKPOINT after seq {seq}, but the last applied seq is {last_applied}")
        if seq > self.primary_seq:
            raise ReplProtocolError(
                f"CHECKPOINT at seq {seq}, beyond the primary's last seq {self.primary_seq} "
                f"(announced at ATTACH or streamed since)")

    def took_query(self) -> None:
        self.resyncing = True

    def check_data(self) -> None:
        if not self.resyncing:
            raise ReplProtocolError("RESYNC_DATA without a resync (no RESYNC_QUERY came)")

    def check_done(self, seq: int, last_applied: int, *, has_disks: bool, now: float) -> None:
        if not self.resyncing:
            if has_disks:
                raise ReplProtocolError(f"RESYNC_DONE at seq {seq} without a resync (no RESYNC_QUERY came)")
            if seq != last_applied:
                raise ReplProtocolError(
                    f"RESYNC_DONE at seq {seq} without a resync (the last applied seq is {last_applied})")
            return
        if seq < self.primary_seq:
            raise ReplProtocolError(
                f"RESYNC_DONE at seq {seq} goes back behind seq {self.primary_seq}, which the primary "
                f"already announced or streamed")
        top = self.ceiling(now)
        if seq > top:
            raise ReplProtocolError(
                f"RESYNC_DONE at seq {seq} is beyond any seq the primary can have reached: it was at "
                f"{self.primary_seq} {max(0.0, now - self._learnt):.1f} s ago, and writes at most "
                f"{self.max_rate} a second (seq {top} at most)")

    def check_verify(self, seq: int, now: float) -> None:
        top = self.ceiling(now)
        if seq > top:
            raise ReplProtocolError(
                f"VERIFY_LIVE_QUERY at seq {seq} is beyond any seq the primary can have reached (seq {top} "
                f"at most)")

    def took_done(self, seq: int, now: float) -> None:
        self.resyncing = False
        self.next_seq = seq + 1
        self._learn(seq, now)
