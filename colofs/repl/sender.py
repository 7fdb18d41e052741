"""The primary side of one VM: its write sink, retained writes, and the connection to the secondary.

:class:`VMLink` is the VM's :class:`~colofs.core.forward.WriteSink`. Every
primary write lands, in seq order and without an await, in

* the dirty map (always: it is what a resync falls back on), and
* the retained log, while retaining (the writes the secondary may still
  need: since its last confirmed checkpoint, bounded by ``max_backlog_bytes``).

One task per VM keeps a connection to the secondary, reconnecting with a
bounded, jittered backoff. On each connection:

    HELLO/AUTH -> ATTACH(epoch, disks) -> ATTACHED(where the secondary is)
    -> resync (if the retained log does not reach back, a resync is owed, or a
       full sync is asked for) -> stream BATCHes, CHECKPOINT markers, DISK_ADDs

A sender task streams batches (whatever is queued, up to ``batch_max_bytes``,
at most ``window`` unacknowledged); a reader task takes ACKs,
CHECKPOINT_DONEs and resync digests; a keepalive task pings and drops a
silent peer. Writes never fail because the secondary is gone: the stream
falls back to the dirty map and a resync when it has to.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count as _counter

import trio

from colofs.core.errors import ColofsError
from colofs.core.forward import ForwardedWrite
from colofs.core.vm import VM
from colofs.repl.blockset import BlockSet
from colofs.repl.config import ASYNC, SYNC, ReplConfig, load_mode
from colofs.repl.dirty import DirtyMap
from colofs.repl.errors import (
    CheckpointError,
    CheckpointTimeout,
    PeerRefused,
    PeerTimeout,
    ReplError,
    ReplProtocolError,
)
from colofs.repl.framing import FrameSender
from colofs.repl.handshake import handshake, wrap_transport
from colofs.repl.persist import PrimaryMeta, load_bitmaps, load_primary_meta, save_primary_state
from colofs.repl.resync import ResyncProgress, chunk_runs, data_ranges, read_and_digest
from colofs.repl.retained import RetainedBudget, RetainedLog
from colofs.repl.session import ResumePlan, plan_resume
from colofs.repl.util import Signal, first_error
from colofs.wire.auth import NonceRegistry
from colofs.wire.errors import ConnectionClosed, ProtocolError, WrongKey
from colofs.wire.messages import (
    Ack,
    Attach,
    Attached,
    Batch,
    Checkpoint,
    CheckpointDone,
    DiskAdd,
    DiskInfo,
    Error,
    Ping,
    Pong,
    ResyncBlock,
    ResyncData,
    ResyncDone,
    ResyncQuery,
    ResyncRequest,
    Role,
    VerifyDigests,
    Write,
)
from colofs.wire.messages import _trusted_write as trusted_write
from colofs.wire.stream import FrameStream

log = logging.getLogger(__name__)

IDLE = "idle"
CONNECTING = "connecting"
ATTACHING = "attaching"
RESYNCING = "resyncing"
STREAMING = "streaming"
DISCONNECTED = "disconnected"
REFUSED = "refused"
STOPPED = "stopped"


@dataclass(frozen=True)
class CheckpointResult:
    """A confirmed checkpoint: after write ``seq``, ``latency_s`` from the call to its return."""

    seq: int
    latency_s: float


class _Marker:
    __slots__ = ("done", "error", "id", "sent", "seq")

    def __init__(self, seq: int, ident: int) -> None:
        self.seq = seq
        self.id = ident
        self.sent = False
        self.done = trio.Event()
        self.error: str | None = None


class _Conn:
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


class VMLink:
    """Replication of one primary VM to its secondary (a WriteSink plus a reconnect loop)."""

    def __init__(
        self,
        vm: VM,
        peer: tuple[str, int],
        key: bytes | None,
        *,
        node_id: str,
        config: ReplConfig,
        nonces: NonceRegistry | None,
        budget: RetainedBudget | None = None,
    ) -> None:
        self.vm = vm
        self.budget = budget
        self.peer = peer
        self.key = key
        self.node_id = node_id
        self.cfg = config
        self.nonces = nonces
        self.mode = load_mode(vm)
        self.state = IDLE
        self.last_error: str | None = None
        self.acked = 0
        self.unacked_bytes = 0
        self.markers: list[_Marker] = []
        self._ids = _counter(1)
        self._changed = Signal()
        self._work = trio.Event()
        self._conn: _Conn | None = None
        self._streamed = False
        self._full_pending = False
        self._last_put = vm.state.last_applied
        self.progress = ResyncProgress()
        self.verify_sink: Callable[[object, VerifyDigests], None] | None = None
        """Where VERIFY_DIGESTS go while an online verify runs (:mod:`colofs.repl.verifier`)."""
        self.stats = {
            "connects": 0, "disconnects": 0, "batches": 0, "writes_sent": 0, "bytes_sent": 0,
            "checkpoints": 0, "checkpoint_failures": 0, "resyncs": 0, "full_syncs": 0,
            "stream_breaks": 0, "sync_degraded_writes": 0, "internal_errors": 0,
        }
        self._bulk = [0, 0]  # raw and wire bytes of bulk frames over all connections
        self._overflow_noted = False
        self._load_tracking()

    # -- tracking state ----------------------------------------------------------------

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

    # -- the WriteSink --------------------------------------------------------------------

    async def wait_room(self, nbytes: int) -> None:
        """While streaming, hold writers back when too much is unacknowledged (flow control)."""
        limit = self.cfg.effective_inflight
        while (self.state == STREAMING and self.retaining and self.unacked_bytes
               and self.unacked_bytes + nbytes > limit):
            await self._changed.wait()

    def put_nowait(self, item: ForwardedWrite) -> None:
        self._last_put = item.seq
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
        while self.acked < seq and self.state == STREAMING and self.retaining:
            await self._changed.wait()
        if self.acked < seq:
            self.stats["sync_degraded_writes"] += 1

    # -- retention bounds -------------------------------------------------------------------

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
        if self.state == STREAMING:
            self._set_state(RESYNCING)
        self._wake()

    # -- small helpers ----------------------------------------------------------------------

    def _wake(self) -> None:
        if not self._work.is_set():
            self._work.set()

    def _set_state(self, state: str) -> None:
        self.state = state
        self._changed.fire()

    @property
    def connected(self) -> bool:
        return self.state in (RESYNCING, STREAMING)

    # -- checkpoint -------------------------------------------------------------------------

    async def checkpoint(self, timeout: float | None = None) -> CheckpointResult:
        """Put a marker after the last write, wait for the secondary's CHECKPOINT_DONE, record it."""
        timeout = self.cfg.checkpoint_timeout if timeout is None else timeout
        if self.state == STOPPED:
            raise CheckpointError(f"VM {self.vm.name}: replication is stopped")
        t0 = trio.current_time()
        marker: _Marker | None = None
        try:
            with trio.fail_after(timeout):
                while True:
                    self._discover()
                    if self.state == STREAMING and self.retaining and not self.resync_needed:
                        break
                    await self._changed.wait()
                # No await from reading the seq to queueing the marker: it sits right after write seq.
                seq = self.vm.state.last_applied
                marker = _Marker(seq, next(self._ids))
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

    def _fail_marker(self, m: _Marker, why: str) -> None:
        m.error = why
        m.done.set()
        if m in self.markers:
            self.markers.remove(m)

    async def _confirm(self, seq: int) -> None:
        """The secondary holds checkpoint ``seq`` durably: record it, free what it makes unneeded."""
        vm = self.vm
        with trio.CancelScope(shield=True):
            if seq > vm.state.last_checkpoint:
                await vm.checkpoint(seq)
        self.retained.drop_through(min(seq, self.acked))
        self.dirty.drop_through(seq)
        self._overflow_noted = False
        self.stats["checkpoints"] += 1

    # -- the connection loop ---------------------------------------------------------------

    async def run(self) -> None:
        """Keep a connection to the secondary until cancelled."""
        attempt = 0
        while True:
            self._streamed = False
            refused = False
            try:
                await self._connect_and_serve()
            except (PeerRefused, WrongKey) as e:
                # A refusal (failed over, stale epoch, another key) will not change by retrying soon.
                refused = True
                self._record_error(str(e), warn=True)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
                    ProtocolError, ColofsError) as e:
                self._record_error(_describe(e), warn=self._streamed)
            except Exception as e:  # a bug: keep serving the VM, say so loudly
                self.stats["internal_errors"] += 1
                self._record_error(f"internal error: {e!r}", warn=True)
                log.exception("VM %s: replication session failed", self.vm.name)
            streamed = self._streamed
            self._after_session(refused)
            attempt = 0 if streamed else attempt + 1
            base = self.cfg.reconnect_max if refused else min(
                self.cfg.reconnect_max, self.cfg.reconnect_min * (2 ** min(attempt, 16)))
            await trio.sleep(base * random.uniform(0.5, 1.0))

    def _record_error(self, text: str, *, warn: bool) -> None:
        if text != self.last_error or warn:
            (log.warning if warn else log.info)("VM %s: replication to %s:%d: %s",
                                                self.vm.name, self.peer[0], self.peer[1], text)
        self.last_error = text

    def _after_session(self, refused: bool) -> None:
        if self.state not in (IDLE, STOPPED):
            self.stats["disconnects"] += 1
        self._set_state(REFUSED if refused else DISCONNECTED)
        for m in list(self.markers):
            m.sent = False
        if self.progress.active:
            self.progress.active = False

    async def _connect_and_serve(self) -> None:
        self._set_state(CONNECTING)
        host, port = self.peer
        with trio.fail_after(self.cfg.connect_timeout):
            tcp = await trio.open_tcp_stream(host, port)
        try:
            stream = await wrap_transport(tcp, server_side=False, tls=self.cfg.tls, peer=f"{host}:{port}")
            fs = FrameStream(stream, max_wire_len=self.cfg.max_wire_len, max_raw_len=self.cfg.max_raw_len)
            sender = FrameSender(fs)
            self._set_state(ATTACHING)
            hello = await handshake(fs, self.key, self.node_id, Role.PRIMARY, initiator=True,
                                    nonces=self.nonces, timeout=self.cfg.handshake_timeout)
            conn = _Conn(fs, sender, hello.node_id)
            self._conn = conn
            self.stats["connects"] += 1
            try:
                plan, to_confirm = await self._attach(conn)
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._reader, conn)
                        nursery.start_soon(self._keepalive, conn)
                        await self._sender_loop(conn, plan, to_confirm)
                except BaseExceptionGroup as eg:
                    raise first_error(eg) from None
            finally:
                self._conn = None
                self._bulk[0] += sender.bulk_raw
                self._bulk[1] += sender.bulk_wire
        finally:
            await trio.aclose_forcefully(tcp)

    async def _attach(self, conn: _Conn) -> tuple[ResumePlan, list[_Marker]]:
        vm = self.vm
        self._discover()
        names = sorted(vm.disks)
        conn.disk_index = {n: i for i, n in enumerate(names)}
        st = vm.state
        await conn.sender.send(Attach(vm.name, st.epoch, st.last_applied + 1,
                                      tuple(DiskInfo(n, vm.disks[n].size, vm.disks[n].block_size) for n in names)))
        with trio.fail_after(self.cfg.handshake_timeout):
            msg = await conn.fs.receive()
        if isinstance(msg, Error):
            raise PeerRefused(msg.code, f"the secondary refused VM {vm.name}: {msg.message}")
        if not isinstance(msg, Attached):
            raise ReplProtocolError(f"expected ATTACHED, got {msg.TYPE.name}")
        conn.last_rx = trio.current_time()
        # From here to the end of this method there is no await: the plan matches the log.
        st = vm.state
        if msg.last_applied == 0 and msg.last_checkpoint == 0 and not self.dirty.empty():
            # A secondary at seq 0 holds nothing of this VM (it made the VM empty, owing no full
            # sync): it gets every block the dirty map ever marked, imported data included.
            self.resync_needed = True
        plan = plan_resume(
            msg, vm=vm.name, epoch=st.epoch, last_applied=st.last_applied,
            last_checkpoint=st.last_checkpoint,
            retained_from=self.retained.start if self.retaining else None,
            resync_needed=self.resync_needed,
        )
        log.info("VM %s: attached to %s (%s): secondary at seq %d, checkpoint %d; %s",
                 vm.name, conn.peer, f"{self.peer[0]}:{self.peer[1]}", msg.last_applied,
                 msg.last_checkpoint, plan.reason)
        to_confirm = []
        for m in list(self.markers):
            if m.seq <= msg.last_checkpoint:
                to_confirm.append(m)
            elif plan.stream_from is None or m.seq < plan.stream_from - 1:
                self._fail_marker(m, "the connection was lost before the secondary took it")
        if plan.full:
            self.dirty.mark_all()
            self.resync_needed = True
            self._full_pending = True
            self.stats["full_syncs"] += 1
        self.acked = msg.last_applied
        if plan.stream_from is not None:
            conn.next_seq = plan.stream_from
            conn.sent_upto = msg.last_applied
            self.unacked_bytes = self.retained.bytes_after(self.acked)
        return plan, to_confirm

    # -- sending -----------------------------------------------------------------------------

    async def _sender_loop(self, conn: _Conn, plan: ResumePlan, to_confirm: list[_Marker]) -> None:
        for m in to_confirm:
            await self._confirm(m.seq)
            self._complete_marker(m)
        if plan.stream_from is None:
            await self._resync(conn)
        self._set_state(STREAMING)
        self._streamed = True
        while True:
            self._work = trio.Event()
            self._discover()
            if (self.resync_needed or not self.retaining or conn.next_seq is None
                    or not self.retained.covers(conn.next_seq)):
                await self._resync(conn)
                self._set_state(STREAMING)
                continue
            await self._sync_disks(conn)  # a new disk appears there even before its first write
            if not await self._send_ready(conn, None):
                await self._work.wait()

    def _complete_marker(self, m: _Marker) -> None:
        m.done.set()
        if m in self.markers:
            self.markers.remove(m)

    async def _sync_disks(self, conn: _Conn) -> None:
        """DISK_ADD for every disk the secondary has not been told about on this connection."""
        for name in sorted(self.vm.disks):
            if name not in conn.disk_index:
                idx = len(conn.disk_index)
                d = self.vm.disks[name]
                await conn.sender.send(DiskAdd(idx, DiskInfo(name, d.size, d.block_size)))
                conn.disk_index[name] = idx

    async def _send_due_markers(self, conn: _Conn) -> None:
        assert conn.next_seq is not None
        for m in list(self.markers):
            if not m.sent and m.seq <= conn.next_seq - 1:
                await conn.sender.send(Checkpoint(m.seq, m.id))
                m.sent = True

    async def _window(self, conn: _Conn) -> None:
        while len(conn.inflight) >= self.cfg.window:
            await self._changed.wait()

    async def _send_ready(self, conn: _Conn, upto: int | None) -> bool:
        """Send queued writes (up to ``upto`` if given) and due markers; False if there was nothing."""
        sent = False
        delayed = False
        while True:
            assert conn.next_seq is not None
            await self._send_due_markers(conn)
            end = self.retained.end if upto is None else min(upto, self.retained.end)
            if conn.next_seq > end or not self.retained.covers(conn.next_seq):
                return sent
            await self._sync_disks(conn)
            await self._window(conn)
            if not self.retained.covers(conn.next_seq):
                return sent
            end = self.retained.end if upto is None else min(upto, self.retained.end)
            writes, size, full = self._collect(conn, end)
            if not writes:
                return sent
            if not full and not delayed and upto is None and self._may_wait(conn):
                delayed = True
                await trio.sleep(self.cfg.batch_delay)
                continue
            delayed = False
            first = conn.next_seq
            await conn.sender.send(Batch(first, tuple(writes)))
            last = first + len(writes) - 1
            conn.next_seq = last + 1
            conn.sent_upto = last
            conn.inflight.append(last)
            self.stats["batches"] += 1
            self.stats["writes_sent"] += len(writes)
            self.stats["bytes_sent"] += size
            sent = True

    def _may_wait(self, conn: _Conn) -> bool:
        """Whether a batch that is not full may wait ``batch_delay`` for more writes.

        It may while batches are in flight anyway; in async mode also when
        none are, since no writer waits for it, and every batch costs both
        loops a send, a decode, an apply and an ACK. Never while a
        checkpoint marker waits to go out behind it.
        """
        if conn.inflight:
            return True
        return self.mode == ASYNC and not any(not m.sent for m in self.markers)

    def _collect(self, conn: _Conn, end: int) -> tuple[list[Write], int, bool]:
        """Writes from ``next_seq`` for one batch; ``full`` if a limit (size, marker) ended it."""
        assert conn.next_seq is not None
        limit = end
        for m in self.markers:
            if not m.sent and conn.next_seq <= m.seq < limit:
                limit = m.seq
                break
        writes: list[Write] = []
        size = 0
        seq = conn.next_seq
        cap = self.cfg.batch_max_bytes
        get = self.retained.get
        index = conn.disk_index
        while seq <= limit:
            fw = get(seq)
            idx = index.get(fw.disk)
            n = len(fw.data)
            if idx is None or (writes and size + n > cap):
                return writes, size, True
            writes.append(trusted_write(idx, fw.offset, fw.data))  # the core checked the range
            size += n
            seq += 1
        return writes, size, limit < end

    # -- resync --------------------------------------------------------------------------------

    async def _resync(self, conn: _Conn) -> None:
        """Bring the secondary to ``S0`` (now) by comparing dirty blocks, then stream from ``S0 + 1``."""
        self._set_state(RESYNCING)
        vm = self.vm
        try:
            for _ in range(3):
                if conn.next_seq is None or not self.retaining or not self.retained.covers(conn.next_seq):
                    break
                # Still in the stream: send what is queued first, markers included.
                await self._send_ready(conn, vm.state.last_applied)
                if conn.next_seq > vm.state.last_applied:
                    break
            # No await from reading S0 to resetting the log: the cut and the log agree on S0.
            s0 = vm.state.last_applied
            self.dirty.cut(s0)
            for m in list(self.markers):
                if not m.sent and m.seq <= s0:
                    self._fail_marker(m, "a resync started before the secondary took it")
            if self.retaining and self.retained.covers(s0 + 1):
                self.retained.drop_through(s0)
            else:
                self.retained.reset(s0 + 1)
                self.retaining = True
            self.acked = min(self.acked, s0)
            self.unacked_bytes = self.retained.bytes_after(s0)
            full = self._full_pending
            since = vm.state.last_checkpoint
            self.stats["resyncs"] += 1
            while True:
                self.resync_needed = False
                await self._sync_disks(conn)
                await self._resync_pass(conn, self.dirty.union_since(since), s0, full)
                if self.retaining:
                    break
                # The retained log overflowed during the pass: go over what changed since s0.
                since, s0 = s0, vm.state.last_applied
                self.dirty.cut(s0)
                self.retained.reset(s0 + 1)
                self.retaining = True
                self.unacked_bytes = 0
                full = False
            conn.resync_done = None
            await conn.sender.send(ResyncDone(s0))
            conn.next_seq = s0 + 1
            conn.sent_upto = max(conn.sent_upto, s0)
            while conn.resync_done != s0:
                await self._changed.wait()
            self._full_pending = False
            self.progress.finish()
            log.info("VM %s: resync done up to seq %d: %d of %d blocks differed (%d bytes)",
                     vm.name, s0, self.progress.blocks_sent, self.progress.blocks_total,
                     self.progress.bytes_sent)
        except BaseException:
            self.resync_needed = True
            raise

    async def _resync_pass(self, conn: _Conn, bits: dict[str, BlockSet], s0: int, full: bool) -> None:
        vm = self.vm
        queries: list[tuple[str, int, int, int]] = []
        total = 0
        for name in sorted(bits):
            disk = vm.disks.get(name)
            if disk is None:
                continue
            per = max(1, self.cfg.resync_chunk_bytes // disk.block_size)
            runs = bits[name].runs()
            for first, cnt in chunk_runs(runs, per):
                queries.append((name, conn.disk_index[name], first, cnt))
                total += cnt
        if not queries and vm.disks:
            # Nothing dirty: one comparison still tells the secondary a resync took place.
            name = min(vm.disks)
            queries.append((name, conn.disk_index[name], 0, 1))
        self.progress.start(total, full, s0)
        log.info("VM %s: %s resync of %d blocks (%d dirty) up to seq %d", vm.name,
                 "full" if full else "dirty-block", total, sum(b.count() for b in bits.values()), s0)
        if not queries:
            return
        window = trio.Semaphore(self.cfg.resync_window)
        pending: deque[tuple[str, int, int, int]] = deque()

        async def ask() -> None:
            for q in queries:
                await window.acquire()
                pending.append(q)
                await conn.sender.send(ResyncQuery(q[1], q[2], q[3]))

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)
                for _ in queries:
                    ans = await conn.answers_rx.receive()
                    if not pending:
                        raise ReplProtocolError("RESYNC_REQUEST without a RESYNC_QUERY")
                    name, idx, first, cnt = pending.popleft()
                    if (ans.disk, ans.first_block, len(ans.digests)) != (idx, first, cnt):
                        raise ReplProtocolError(
                            f"RESYNC_REQUEST for disk {ans.disk} blocks {ans.first_block}+{len(ans.digests)} "
                            f"does not answer the query for disk {idx} blocks {first}+{cnt}")
                    await self._send_differing(conn, name, idx, first, cnt, ans.digests)
                    window.release()
        except BaseExceptionGroup as eg:
            raise first_error(eg) from None

    async def _send_differing(self, conn: _Conn, name: str, idx: int, first: int, cnt: int,
                              theirs: tuple[int, ...]) -> None:
        disk = self.vm.disks[name]
        bs = disk.block_size
        ours, buf = await trio.to_thread.run_sync(read_and_digest, disk.base_fd, disk.size, bs, first, cnt)
        mv = memoryview(buf)
        blocks: list[ResyncBlock] = []
        size = 0
        cap = self.cfg.resync_chunk_bytes
        for i in range(cnt):
            if ours[i] == theirs[i]:
                continue
            data = bytes(mv[i * bs : (i + 1) * bs])
            if blocks and size + len(data) > cap:
                await conn.sender.send(ResyncData(idx, bs, tuple(blocks)))
                blocks, size = [], 0
            blocks.append(ResyncBlock(first + i, data))
            size += len(data)
            self.progress.blocks_sent += 1
            self.progress.bytes_sent += len(data)
        if blocks:
            await conn.sender.send(ResyncData(idx, bs, tuple(blocks)))
        self.progress.blocks_checked += cnt

    # -- receiving -----------------------------------------------------------------------------

    async def _reader(self, conn: _Conn) -> None:
        while True:
            try:
                msg = await conn.fs.receive()
            except ConnectionClosed:
                raise ReplError("the secondary closed the connection") from None
            conn.last_rx = trio.current_time()
            if isinstance(msg, Ack):
                self._on_ack(conn, msg.seq)
            elif isinstance(msg, CheckpointDone):
                await self._on_checkpoint_done(msg)
            elif isinstance(msg, ResyncRequest):
                try:
                    conn.answers_tx.send_nowait(msg)
                except trio.WouldBlock:
                    raise ReplProtocolError("unsolicited RESYNC_REQUEST frames") from None
            elif isinstance(msg, ResyncDone):
                if msg.seq != conn.sent_upto:
                    raise ReplProtocolError(f"RESYNC_DONE echo for seq {msg.seq}, the resync was up to {conn.sent_upto}")
                self.acked = msg.seq
                conn.resync_done = msg.seq
                self._changed.fire()
            elif isinstance(msg, VerifyDigests):
                if self.verify_sink is None:
                    raise ReplProtocolError("VERIFY_DIGESTS, but no verify is running")
                self.verify_sink(conn, msg)
                self._changed.fire()
            elif isinstance(msg, Pong):
                pass
            elif isinstance(msg, Ping):
                await conn.sender.send(Pong(msg.token))
            elif isinstance(msg, Error):
                raise ReplError(f"the secondary dropped VM {self.vm.name}: {msg.message} (error {msg.code})")
            else:
                raise ReplProtocolError(f"unexpected {msg.TYPE.name} from the secondary")

    def _on_ack(self, conn: _Conn, seq: int) -> None:
        if seq > conn.sent_upto or seq < self.acked:
            raise ReplProtocolError(
                f"ACK of seq {seq} outside what was sent (acknowledged {self.acked}, sent {conn.sent_upto})")
        while conn.inflight and conn.inflight[0] <= seq:
            conn.inflight.popleft()
        if self.retaining and seq > self.acked:
            lo = max(self.acked + 1, self.retained.start)
            hi = min(seq, self.retained.end)
            get = self.retained.get
            self.unacked_bytes -= sum(len(get(s).data) for s in range(lo, hi + 1))
        self.acked = seq
        self._changed.fire()

    async def _on_checkpoint_done(self, msg: CheckpointDone) -> None:
        m = next((m for m in self.markers if m.id == msg.id and m.sent), None)
        if m is None or m.seq != msg.seq:
            raise ReplProtocolError(f"CHECKPOINT_DONE for checkpoint {msg.id} at seq {msg.seq}, which was not sent")
        await self._confirm(m.seq)
        self._complete_marker(m)
        self._changed.fire()  # a verify waits for the next confirmed checkpoint

    async def _keepalive(self, conn: _Conn) -> None:
        token = 0
        while True:
            await trio.sleep(self.cfg.ping_interval)
            idle = trio.current_time() - conn.last_rx
            if idle > self.cfg.peer_timeout:
                raise PeerTimeout(f"no frame from the secondary for {idle:.1f} s")
            token += 1
            with trio.move_on_after(max(0.1, self.cfg.peer_timeout - idle)) as scope:
                await conn.sender.send(Ping(token))
            if scope.cancelled_caught:
                raise PeerTimeout("the secondary stopped reading (a ping could not be sent)")

    # -- online verify (driven by colofs.repl.verifier) -------------------------------------------

    def verify_conn(self) -> _Conn | None:
        """The connection a verify may query on now: streaming, with no resync owed."""
        conn = self._conn
        if conn is None or self.state != STREAMING or self.resync_needed:
            return None
        return conn

    async def wait_changed(self) -> None:
        """Until the link's state, an acknowledgement, a checkpoint or a verify answer changes."""
        await self._changed.wait()

    def repair(self, runs: dict[str, list[tuple[int, int]]]) -> None:
        """Have the digest-compared resync go over these ``(first, stop)`` block runs now."""
        for name, spans in runs.items():
            if name in self.dirty.geometry:
                for first, stop in spans:
                    self.dirty.mark_blocks(name, first, stop)
        self.resync_needed = True
        if self.state == STREAMING:
            self._set_state(RESYNCING)
        self._wake()

    # -- shutdown and status ---------------------------------------------------------------------

    async def stop(self) -> None:
        """Detach from the VM and save the dirty map; pending checkpoints fail."""
        if self.vm.forward is self:
            self.vm.forward = None
        self._set_state(STOPPED)
        if self.budget is not None:
            self.budget.leave(self.retained)
        for m in list(self.markers):
            self._fail_marker(m, "replication stopped")
        if not self.vm.closed:
            with trio.CancelScope(shield=True):
                try:
                    await self.save_tracking()
                except OSError as e:
                    log.warning("VM %s: could not save the dirty bitmap: %s", self.vm.name, e)

    def status(self) -> dict[str, object]:
        st = self.vm.state
        conn = self._conn
        raw = self._bulk[0] + (conn.sender.bulk_raw if conn else 0)
        wire = self._bulk[1] + (conn.sender.bulk_wire if conn else 0)
        return {
            "vm": self.vm.name,
            "role": st.role,
            "peer": f"{self.peer[0]}:{self.peer[1]}",
            "peer_node": conn.peer if conn else None,
            "state": self.state,
            "mode": self.mode,
            "degraded": self.mode == SYNC and self.state != STREAMING,
            "epoch": st.epoch,
            "last_seq": st.last_applied,
            "acked_seq": self.acked,
            "sent_seq": conn.sent_upto if conn else None,
            "confirmed_checkpoint": st.last_checkpoint,
            "backlog_bytes": self.unacked_bytes if self.retaining else None,
            "backlog_writes": max(0, st.last_applied - self.acked),
            "retained_bytes": self.retained.nbytes,
            "retained_from": self.retained.start if self.retaining else None,
            "dirty_blocks": self.dirty.count(),
            "resync_needed": self.resync_needed,
            "resync": self.progress.as_dict(),
            "lz4_ratio": round(wire / raw, 4) if raw else None,
            "pending_checkpoints": len(self.markers),
            "last_error": self.last_error,
            **self.stats,
        }


def _describe(e: BaseException) -> str:
    name = type(e).__name__
    text = str(e) or name
    return text if isinstance(e, ColofsError | ProtocolError) else f"{name}: {text}"


__all__ = ["ASYNC", "SYNC", "CheckpointResult", "VMLink"]
