"""What a primary VM's link keeps of its writes: the dirty map, the retained log, and the sink.

Every primary write lands here, in seq order and without an await (the
:class:`~colofs.core.forward.WriteSink` calls), in

* the dirty map (always: it is what a resync falls back on), and
* the retained log, while retaining (the writes the secondary may still
  need: since its last confirmed checkpoint, bounded by ``max_backlog_bytes``
  and the host-wide :class:`~colofs.repl.retained.RetainedBudget`).

When the log cannot hold a write, retention stops ("the stream breaks") and
the secondary is later caught up by a dirty-block resync: a write never
fails because of replication. The dirty map is saved at shutdown so a
restart resyncs only what changed.

:class:`Tracking` is a part of :class:`~colofs.repl.sender.VMLink`; the
attributes it reads from the rest of the link are declared below.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from colofs.core.forward import ForwardedWrite
from colofs.core.vm import VM
from colofs.repl.config import SYNC, ReplConfig
from colofs.repl.dirty import DirtyMap
from colofs.repl.linkstate import LinkState
from colofs.repl.persist import PrimaryMeta, load_bitmaps, load_primary_meta, save_primary_state
from colofs.repl.resync import data_ranges
from colofs.repl.retained import RetainedBudget, RetainedLog
from colofs.repl.util import Signal

log = logging.getLogger("colofs.repl.sender")  # one logger name per side of the link, for log filters


class Tracking:
    """The dirty map, the retained log and the WriteSink calls of one primary VM."""

    vm: VM
    cfg: ReplConfig
    budget: RetainedBudget | None
    mode: str
    state: LinkState
    acked: int
    stats: dict[str, int]
    _changed: Signal
    dirty: DirtyMap
    retained: RetainedLog
    retaining: bool
    """Writes go to the retained log; False after a break, until the next resync."""
    resync_needed: bool
    """The secondary cannot be caught up from the retained log: a digest-compared resync is owed."""
    known: set[str]
    unacked_bytes: int
    _full_pending: bool
    _overflow_noted: bool

    if TYPE_CHECKING:  # provided by VMLink and its other parts
        def _wake(self) -> None: ...
        def _set_state(self, state: LinkState) -> None: ...

    def _load_tracking(self) -> None:
        vm = self.vm
        st = vm.state
        self.dirty = DirtyMap(st.last_checkpoint + 1)
        for n, d in vm.disks.items():
            self.dirty.add_disk(n, d.size, d.block_size)
        self.retained = RetainedLog(st.last_applied + 1, self.budget)
        if self.budget is not None:
            self.budget.join(self.retained, self._shed_acknowledged)
        self.retaining = True
        meta = load_primary_meta(vm)
        why = None
        if meta is None:
            if st.last_applied == 0:
                self.known: set[str] = set()  # never written: new disks are found by discovery
                self.resync_needed = False
                return
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
        self.dirty.mark_all()
        self.resync_needed = True
        self._full_pending = True
        self.stats["full_syncs"] += 1
        log.warning("VM %s: %s; the secondary gets a full (digest-compared) sync", vm.name, why)

    def _discover(self) -> None:
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
        self._discover()
        self._wake()

    async def save_tracking(self) -> None:
        """Make the dirty map durable, valid for a restart that finds ``last_applied`` unchanged."""
        meta = PrimaryMeta(sorted(self.known), self.vm.state.last_applied, self.vm.state.epoch,
                           self.resync_needed)
        await save_primary_state(self.vm, self.dirty, meta)

    async def wait_room(self, nbytes: int) -> None:
        """While streaming, hold writers back when too much is unacknowledged (flow control)."""
        limit = self.cfg.effective_inflight
        while (self.state == LinkState.STREAMING and self.retaining and self.unacked_bytes
               and self.unacked_bytes + nbytes > limit):
            await self._changed.wait()

    def put_nowait(self, item: ForwardedWrite) -> None:
        if item.disk not in self.known:
            self._discover()
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
        """Sync mode: return once the secondary applied ``seq``, or at once while it cannot (degraded)."""
        if self.mode != SYNC:
            return
        while self.acked < seq and self.state == LinkState.STREAMING and self.retaining:
            await self._changed.wait()
        if self.acked < seq:
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
        if self.state == LinkState.STREAMING:
            self._set_state(LinkState.RESYNCING)
        self._wake()
