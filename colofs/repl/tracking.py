"""What a primary VM's link keeps of its writes: the dirty map, the retained log, and the sink.

Every primary write lands here, in seq order and without an await (the
:class:`~colofs.core.forward.WriteSink` calls: :class:`Tracking` is the VM's
sink), in

* the dirty map (always: it is what a resync falls back on), and
* the retained log, while retaining (the writes the secondary may still
  need: since its last confirmed checkpoint, bounded by ``max_backlog_bytes``
  and the host-wide :class:`~colofs.repl.retained.RetainedBudget`).

When the log cannot hold a write, retention stops ("the stream breaks") and
the secondary is later caught up by a dirty-block resync: a write never
fails because of replication. The dirty map is saved at shutdown so a
restart resyncs only what changed.

:class:`Tracking` is a part of :class:`~colofs.repl.sender.VMLink`; it owns
everything above and what the secondary acknowledged of it. The link's
other parts change it only through the methods below.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from colofs.core.forward import ForwardedWrite
from colofs.core.vm import VM
from colofs.repl.blockset import BlockSet
from colofs.repl.config import SYNC, ReplConfig, load_mode
from colofs.repl.dirty import DirtyMap
from colofs.repl.linkstate import Lifecycle, LinkState
from colofs.repl.persist import PrimaryMeta, load_bitmaps, load_primary_meta, save_primary_state
from colofs.repl.resync import data_ranges
from colofs.repl.retained import RetainedBudget, RetainedLog

log = logging.getLogger("colofs.repl.sender")  # one logger name per side of the link, for log filters


class Tracking:
    """The dirty map, the retained log and the WriteSink calls of one primary VM."""

    def __init__(self, vm: VM, cfg: ReplConfig, life: Lifecycle, wake: Callable[[], None],
                 budget: RetainedBudget | None) -> None:
        self.vm = vm
        self.cfg = cfg
        self.life = life
        self._wake = wake  # the link's sender has something to do
        self.budget = budget
        self.mode = load_mode(vm)
        """``async`` or ``sync``: whether a writer waits for the secondary's ACK (:meth:`wait_acked`)."""
        self.acked = 0
        """The last write the secondary acknowledged: applied, durable (its ACK)."""
        self.received = 0
        """The last write the secondary has received and queued to apply (its RECEIPT); 0 without."""
        self.unacked_bytes = 0
        self.full_pending = False
        """The resync owed is a full one (every block compared)."""
        self._overflow_noted = False
        self.stats = {"full_syncs": 0, "stream_breaks": 0, "sync_degraded_writes": 0, "internal_errors": 0}
        self.dirty = DirtyMap(vm.state.last_checkpoint + 1)
        for n, d in vm.disks.items():
            self.dirty.add_disk(n, d.size, d.block_size)
        self.retained = RetainedLog(vm.state.last_applied + 1, budget, spill_dir=vm.path)
        if budget is not None:
            budget.join(self.retained, self._shed_acknowledged)
        self.retaining = True
        """Writes go to the retained log; False after a break, until the next resync."""
        self.resync_needed = False
        """The secondary cannot be caught up from the retained log: a digest-compared resync is owed."""
        self.known: set[str] = set()
        self._load()

    def _load(self) -> None:
        vm = self.vm
        st = vm.state
        meta = load_primary_meta(vm)
        why = None
        if meta is None:
            if st.last_applied == 0:
                return  # never written: new disks are found by discovery
            why = "no replication state was saved"
        elif vm.recovery.action != "clean":
            why = f"the VM was recovered ({vm.recovery.action})"
        elif meta.covered_seq != st.last_applied or meta.epoch != st.epoch:
            why = f"writes up to seq {st.last_applied} were not tracked (saved at {meta.covered_seq})"
        elif not load_bitmaps(vm, self.dirty, meta.known_disks, meta.covered_seq):
            why = "a dirty bitmap is missing or damaged"
        if why is None:
            assert meta is not None
            self.known = set(meta.known_disks) & set(vm.disks)
            self.resync_needed = meta.resync_needed
            log.info("VM %s: replication state loaded: %d dirty blocks since seq %d",
                     vm.name, self.dirty.count(), st.last_checkpoint)
            return
        self.known = set(vm.disks)
        log.warning("VM %s: %s; the secondary gets a full (digest-compared) sync", vm.name, why)
        self.owe_full_sync()

    # -- disks -----------------------------------------------------------------------------------

    def discover(self) -> None:
        """Disks created since we last looked: their existing data (an imported image) must be sent."""
        for name, disk in list(self.vm.disks.items()):
            if name in self.known:
                continue
            self.known.add(name)
            self.dirty.add_disk(name, disk.size, disk.block_size)
            try:
                ranges = data_ranges(disk.base_fd, 0, disk.size)
            except OSError:
                ranges = [(0, disk.size)]
            for lo, hi in ranges:
                self.dirty.mark(name, lo, hi - lo)
            if ranges:
                self.resync_needed = True
                self._wake()
            log.info("VM %s: replicating new disk %s (%d bytes of data to compare)",
                     self.vm.name, name, sum(hi - lo for lo, hi in ranges))

    def notice_disks(self) -> None:
        """Disks were created: announce them now (and send what they hold) instead of at the next write."""
        self.discover()
        self._wake()

    async def save(self) -> None:
        """Make the dirty map durable, valid for a restart that finds ``last_applied`` unchanged."""
        meta = PrimaryMeta(sorted(self.known), self.vm.state.last_applied, self.vm.state.epoch,
                           self.resync_needed)
        await save_primary_state(self.vm, self.dirty, meta)

    def leave_budget(self) -> None:
        if self.budget is not None:
            self.budget.leave(self.retained)

    # -- the WriteSink -------------------------------------------------------------------------

    async def wait_room(self, nbytes: int) -> None:
        """While streaming, hold writers back when too much is unacknowledged (flow control).

        Also while the retained log's spill lags (its memory bound; any state of the link)."""
        await self.retained.wait_resident()
        limit = self.cfg.effective_inflight
        while (self.life.streaming and self.retaining and self.unacked_bytes
               and self.unacked_bytes + nbytes > limit):
            await self.life.wait_changed()

    def put_nowait(self, item: ForwardedWrite) -> None:
        if item.disk not in self.known:
            self.discover()
        n = len(item.data)
        self.dirty.mark(item.disk, item.offset, n)
        if self.retaining:
            if n > self.cfg.max_write_bytes:
                self._break_stream(f"a write of {n} bytes is larger than max_write_bytes")
            elif item.seq != self.retained.end + 1:
                # Never fail the VM's write over our bookkeeping: fall back to the dirty map.
                self.stats["internal_errors"] += 1
                self._break_stream(f"internal error: write seq {item.seq} does not follow {self.retained.end}")
            else:
                self.retained.append(item)
                self.unacked_bytes += n
                if self.retained.nbytes > self.cfg.max_backlog_bytes:
                    self._overflow()
                elif self.budget is not None and self.budget.total > self.budget.limit:
                    self.budget.relieve()
        self._wake()

    async def wait_acked(self, seq: int) -> None:
        """Sync mode: return once the secondary has ``seq`` (received or applied), or at once while
        it cannot (degraded). Retention keeps the write until it is applied: a secondary that dies
        with it only received gets it again from the retained log."""
        if self.mode != SYNC:
            return
        while self.acked < seq and self.received < seq and self.life.streaming and self.retaining:
            await self.life.wait_changed()
        if self.acked < seq and self.received < seq:
            self.stats["sync_degraded_writes"] += 1

    def _overflow(self) -> None:
        self._shed_acknowledged(f"retained writes over {self.cfg.max_backlog_bytes} bytes")
        if self.retained.nbytes > self.cfg.max_backlog_bytes:
            self._break_stream(f"{self.retained.nbytes} unacknowledged bytes exceed max_backlog_bytes")

    def _shed_acknowledged(self, why: str = "") -> int:
        """Drop the retained writes the secondary acknowledged; returns the bytes freed."""
        freed = self.retained.drop_through(self.acked)
        if freed and not self._overflow_noted:  # once per checkpoint interval, not every few MiB
            self._overflow_noted = True
            why = why or f"the primary's retained writes over {self.budget.limit if self.budget else 0} bytes"
            log.info("VM %s: %s: dropped %d acknowledged bytes; a secondary crash now means a dirty-block resync",
                     self.vm.name, why, freed)
        return freed

    def _break_stream(self, why: str) -> None:
        """Stop retaining: the secondary will be caught up by a dirty-block resync."""
        log.warning("VM %s: %s; falling back to dirty-block tracking", self.vm.name, why)
        self.retained.reset(self.vm.state.last_applied + 1)
        self.retaining = False
        self.unacked_bytes = 0
        self.resync_needed = True
        self.stats["stream_breaks"] += 1
        if self.life.streaming:
            self.life.move(LinkState.RESYNCING)
        self._wake()

    # -- what the secondary holds --------------------------------------------------------------

    @property
    def retained_from(self) -> int | None:
        """The oldest write the log still holds, or None while not retaining."""
        return self.retained.start if self.retaining else None

    def can_stream_from(self, seq: int | None) -> bool:
        """The secondary can be caught up from write ``seq`` by the log alone, with no resync owed."""
        return (seq is not None and self.retaining and not self.resync_needed
                and self.retained.covers(seq))

    def placed(self, acked: int, *, streaming: bool) -> None:
        """A connection attached: the secondary holds writes up to ``acked``; streaming resumes after it."""
        self.acked = acked
        self.received = acked  # what an earlier connection's secondary only queued may be gone
        if streaming:
            self.unacked_bytes = self.retained.bytes_after(acked)

    def acknowledged(self, seq: int) -> None:
        """The secondary applied every write up to ``seq`` (an ACK, or the echo of a resync's end)."""
        if self.retaining and seq > self.acked:
            self.unacked_bytes -= self.retained.bytes_in(self.acked + 1, seq)
        self.acked = seq
        self.life.announce()

    def receipted(self, seq: int) -> None:
        """The secondary has every write up to ``seq`` queued to apply (a RECEIPT): sync writers go on.

        Nothing is dropped on it: the retained log and the flow control follow the ACK."""
        self.received = seq
        self.life.announce()

    def owe_resync(self) -> None:
        self.resync_needed = True

    def owe_full_sync(self) -> None:
        """Every block is compared at the next resync (the secondary's copy cannot be trusted)."""
        self.dirty.mark_all()
        self.resync_needed = True
        self.full_pending = True
        self.stats["full_syncs"] += 1

    def mark_for_repair(self, runs: dict[str, list[tuple[int, int]]]) -> None:
        """Have the next resync go over these ``(first, stop)`` block runs."""
        for name, spans in runs.items():
            if name in self.dirty.geometry:
                for first, stop in spans:
                    self.dirty.mark_blocks(name, first, stop)
        self.resync_needed = True

    # -- resync and checkpoints (no await in any of these) ----------------------------------------

    def cut_for_resync(self) -> int:
        """Start a resync at ``S0``, the last write now: the dirty map is cut and the log restarts after it."""
        s0 = self.vm.state.last_applied
        self.dirty.cut(s0)
        if self.retaining and self.retained.covers(s0 + 1):
            self.retained.drop_through(s0)
        else:
            self.retained.reset(s0 + 1)
            self.retaining = True
        self.acked = min(self.acked, s0)
        self.received = min(self.received, s0)
        self.unacked_bytes = self.retained.bytes_after(s0)
        return s0

    def pass_begins(self) -> None:
        """A resync pass goes over every block dirty so far: until it ends, none is owed."""
        self.resync_needed = False

    def dirty_since(self, seq: int) -> dict[str, BlockSet]:
        return self.dirty.union_since(seq)

    def restart_after_overflow(self) -> int:
        """The log overflowed during a pass: another goes over what changed since; returns its ``S0``."""
        s0 = self.vm.state.last_applied
        self.dirty.cut(s0)
        self.retained.reset(s0 + 1)
        self.retaining = True
        self.unacked_bytes = 0
        return s0

    def full_sync_done(self) -> None:
        self.full_pending = False

    @property
    def checkpointable(self) -> bool:
        """A marker may follow the last write: the stream carries every write, no resync is owed."""
        return self.retaining and not self.resync_needed

    def cut_at_checkpoint(self, seq: int) -> None:
        self.dirty.cut(seq)

    def checkpoint_confirmed(self, seq: int) -> None:
        """The secondary holds checkpoint ``seq``: what it makes unneeded is dropped."""
        self.retained.drop_through(min(seq, self.acked))
        self.dirty.drop_through(seq)
        self._overflow_noted = False

    def status(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "acked_seq": self.acked,
            "received_seq": self.received,
            "backlog_bytes": self.unacked_bytes if self.retaining else None,
            "backlog_writes": max(0, self.vm.state.last_applied - self.acked),
            "retained_bytes": self.retained.nbytes,
            "retained_resident_bytes": self.retained.resident,
            "retained_from": self.retained_from,
            "dirty_blocks": self.dirty.count(),
            "resync_needed": self.resync_needed,
        }
