"""The primary side of one VM: the link to the secondary, and where its parts meet.

:class:`VMLink` holds parts that each own one concern and its state:

* :class:`~colofs.repl.tracking.Tracking`: dirty map, retained log, and the
  VM's :class:`~colofs.core.forward.WriteSink` (``vm.forward``);
* :class:`~colofs.repl.batching.Batching`: batches, window, markers in the stream;
* :class:`~colofs.repl.resyncer.ResyncDriver`: the primary's side of a resync;
* :class:`~colofs.repl.checkpoints.Checkpoints`: checkpoint markers and their confirmation;
* :class:`~colofs.repl.linkstate.Lifecycle`: the state the link is in, and the
  signal every part announces its changes on.

They talk through their methods; the link wires them together and keeps the
connection itself.

One task per VM keeps a connection to the secondary, reconnecting with a
bounded, jittered backoff. On each connection:

    HELLO/AUTH -> ATTACH(epoch, disks) -> ATTACHED(where the secondary is)
    -> resync (if the retained log does not reach back, a resync is owed, or a
       full sync is asked for) -> stream BATCHes, CHECKPOINT markers, DISK_ADDs

A sender task streams batches; a reader task takes ACKs, CHECKPOINT_DONEs
and resync digests, and a keepalive task pings and drops a silent peer
(both in :mod:`~colofs.repl.linkreader`). Writes
never fail because the secondary is gone: the stream falls back to the
dirty map and a resync when it has to.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import trio

from colofs.core.errors import ColofsError
from colofs.core.vm import VM
from colofs.repl.batching import Batching
from colofs.repl.checkpoints import CheckpointResult, Checkpoints, Marker
from colofs.repl.config import ASYNC, SYNC, ReplConfig
from colofs.repl.dirty import DirtyMap
from colofs.repl.errors import (
    PeerRefused,
    ReplProtocolError,
)
from colofs.repl.framing import FrameSender
from colofs.repl.handshake import FEATURE_RECEIPTS, handshake, wrap_transport
from colofs.repl.linkreader import keepalive, read_replies
from colofs.repl.linkstate import Conn, Lifecycle, LinkState
from colofs.repl.resync import ResyncProgress
from colofs.repl.resyncer import ResyncDriver
from colofs.repl.retained import RetainedBudget
from colofs.repl.session import ResumePlan, plan_resume
from colofs.repl.tracking import Tracking
from colofs.repl.util import first_error
from colofs.wire.auth import NonceRegistry
from colofs.wire.errors import ProtocolError, WrongKey
from colofs.wire.messages import (
    Attach,
    Attached,
    DiskInfo,
    Error,
    Role,
    VerifyDigests,
)
from colofs.wire.route import encode_route
from colofs.wire.stream import FrameStream

log = logging.getLogger(__name__)


class VMLink:
    """Replication of one primary VM to its secondary: its parts, and a reconnect loop.

    The parts: :attr:`tracking` (the dirty map, the retained log, the VM's
    write sink), :attr:`batching` (batches, window, markers),
    :attr:`resyncer` (the primary's side of a resync), :attr:`checkpoints`
    (markers and their confirmation) and :attr:`life` (the
    :class:`LinkState` and its change signal). This class holds the
    connection loop, attach, the reader and status.
    """

    def __init__(
        self,
        vm: VM,
        peer: tuple[str, int],
        key: bytes | None,
        *,
        node_id: str,
        config: ReplConfig,
        nonces: NonceRegistry,
        budget: RetainedBudget | None = None,
    ) -> None:
        self.vm = vm
        self.peer = peer
        self.key = key
        self.node_id = node_id
        self.cfg = config
        self.nonces = nonces
        self._work = trio.Event()
        self.life = Lifecycle()
        self.tracking = Tracking(vm, config, self.life, self._wake, budget)
        self.checkpoints = Checkpoints(vm, config, self.life, self.tracking, self._wake_now)
        self.batching = Batching(vm, config, self.life, self.tracking, self.checkpoints)
        self.resyncer = ResyncDriver(vm, config, self.life, self.tracking, self.checkpoints, self.batching)
        self.replicate_checkpoint = self.checkpoints.replicate_checkpoint
        """The replicating primary's checkpoint (:meth:`Checkpoints.replicate_checkpoint`)."""
        self.wait_changed = self.life.wait_changed
        """Until the link's state, an acknowledgement, a checkpoint, a verify answer or a resync pass
        changes (a pass: when it begins and when it is done, not for each block)."""
        self._conn: Conn | None = None
        self._streamed = False
        self.verify_sink: Callable[[object, VerifyDigests], None] | None = None
        """Where VERIFY_DIGESTS go while an online verify runs (:mod:`colofs.repl.verifier`)."""
        self._stats = {"connects": 0, "disconnects": 0, "internal_errors": 0}
        self._bulk = [0, 0]  # raw and wire bytes of bulk frames over all connections

    def _wake(self) -> None:
        """Something was queued (a write, mostly): wake the sender; a batch waiting for company
        goes out once what is queued would fill it."""
        if not self._work.is_set():
            self._work.set()
        self.batching.written()

    def _wake_now(self) -> None:
        """A checkpoint marker is queued: wake the sender, and end a small batch's wait for company."""
        self._wake()
        self.batching.hurry()

    # -- what others read of the link --------------------------------------------------------

    @property
    def state(self) -> LinkState:
        return self.life.state

    @property
    def last_error(self) -> str | None:
        return self.life.last_error

    @property
    def ups(self) -> int:
        return self.life.ups

    @property
    def downs(self) -> int:
        return self.life.downs

    @property
    def connected(self) -> bool:
        return self.life.connected

    @property
    def acked(self) -> int:
        """The last write the secondary acknowledged."""
        return self.tracking.acked

    @property
    def dirty(self) -> DirtyMap:
        return self.tracking.dirty

    @property
    def progress(self) -> ResyncProgress:
        return self.resyncer.progress

    @property
    def stats(self) -> dict[str, int]:
        """Every part's counters, as status shows them."""
        out = {**self._stats, **self.tracking.stats, **self.batching.stats, **self.resyncer.stats,
               **self.checkpoints.stats}
        out["internal_errors"] = self._stats["internal_errors"] + self.tracking.stats["internal_errors"]
        return out

    # -- the connection loop ---------------------------------------------------------------

    async def run(self) -> None:
        """Keep a connection to the secondary until cancelled; the retained log spills meanwhile."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.tracking.retained.run_spill, name=f"colofs-retained-{self.vm.name}")
            await self._connect_loop()
            nursery.cancel_scope.cancel()

    async def _connect_loop(self) -> None:
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
                self._stats["internal_errors"] += 1
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
        self.life.last_error = text

    def _after_session(self, refused: bool) -> None:
        if self.state not in (LinkState.IDLE, LinkState.STOPPED):
            self._stats["disconnects"] += 1
        self.progress.active = False  # an interrupted pass ends before the state change announces it
        self.checkpoints.connection_lost()
        self.life.move(LinkState.REFUSED if refused else LinkState.DISCONNECTED)

    async def _connect_and_serve(self) -> None:
        self.life.move(LinkState.CONNECTING)
        host, port = self.peer
        with trio.fail_after(self.cfg.connect_timeout):
            tcp = await trio.open_tcp_stream(host, port)
        try:
            await tcp.send_all(encode_route(self.vm.name))  # in clear, first: picks the secondary's process
            stream = await wrap_transport(tcp, server_side=False, tls=self.cfg.tls, peer=f"{host}:{port}")
            fs = FrameStream(stream, max_wire_len=self.cfg.max_wire_len, max_raw_len=self.cfg.max_raw_len)
            sender = FrameSender(fs)
            self.life.move(LinkState.ATTACHING)
            offer = FEATURE_RECEIPTS if self.cfg.receipts else 0
            hello = await handshake(fs, self.key, self.node_id, Role.PRIMARY, initiator=True,
                                    nonces=self.nonces, timeout=self.cfg.handshake_timeout, features=offer)
            conn = Conn(fs, sender, hello.node_id)
            conn.receipts = bool(offer & hello.features)
            self._conn = conn
            self._stats["connects"] += 1
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

    async def _attach(self, conn: Conn) -> tuple[ResumePlan, list[Marker]]:
        vm = self.vm
        tracking = self.tracking
        tracking.discover()
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
        if msg.last_applied == 0 and msg.last_checkpoint == 0 and not tracking.dirty.empty():
            # A secondary at seq 0 holds nothing of this VM (it made the VM empty, owing no full
            # sync): it gets every block the dirty map ever marked, imported data included.
            tracking.owe_resync()
        plan = plan_resume(
            msg, vm=vm.name, epoch=st.epoch, last_applied=st.last_applied,
            last_checkpoint=st.last_checkpoint,
            retained_from=tracking.retained_from,
            resync_needed=tracking.resync_needed,
        )
        log.info("VM %s: attached to %s (%s): secondary at seq %d, checkpoint %d; %s",
                 vm.name, conn.peer, f"{self.peer[0]}:{self.peer[1]}", msg.last_applied,
                 msg.last_checkpoint, plan.reason)
        to_confirm = self.checkpoints.reconnected(msg.last_checkpoint, plan.stream_from)
        if plan.full:
            tracking.owe_full_sync()
        tracking.placed(msg.last_applied, streaming=plan.stream_from is not None)
        conn.receipted = msg.last_applied
        if plan.stream_from is not None:
            conn.next_seq = plan.stream_from
            conn.sent_upto = msg.last_applied
        return plan, to_confirm

    async def _sender_loop(self, conn: Conn, plan: ResumePlan, to_confirm: list[Marker]) -> None:
        await self.checkpoints.confirm_held(to_confirm)
        if plan.stream_from is None:
            await self.resyncer.resync(conn)
        self.life.move(LinkState.STREAMING)
        self._streamed = True
        while True:
            self._work = trio.Event()
            self.tracking.discover()
            if not self.tracking.can_stream_from(conn.next_seq):
                await self.resyncer.resync(conn)
                self.life.move(LinkState.STREAMING)
                continue
            await self.batching.sync_disks(conn)  # a new disk appears there even before its first write
            if not await self.batching.send_ready(conn, None):
                await self._work.wait()

    # -- receiving -----------------------------------------------------------------------------

    async def _reader(self, conn: Conn) -> None:
        """The secondary's answers on ``conn`` (:func:`colofs.repl.linkreader.read_replies`)."""
        await read_replies(self, conn)

    async def _keepalive(self, conn: Conn) -> None:
        await keepalive(self.cfg, conn)

    # -- online verify (driven by colofs.repl.verifier) -------------------------------------------

    def verify_conn(self) -> Conn | None:
        """The connection a verify may query on now: streaming, with no resync owed."""
        conn = self._conn
        if conn is None or self.state != LinkState.STREAMING or self.tracking.resync_needed:
            return None
        return conn

    def repair(self, runs: dict[str, list[tuple[int, int]]]) -> None:
        """Have the digest-compared resync go over these ``(first, stop)`` block runs now."""
        self.tracking.mark_for_repair(runs)
        if self.life.streaming:
            self.life.move(LinkState.RESYNCING)
        self._wake()

    # -- shutdown and status ---------------------------------------------------------------------

    async def stop(self) -> None:
        """Detach from the VM and save the dirty map; pending checkpoints fail."""
        if self.vm.forward is self.tracking:
            self.vm.forward = None
        self.life.move(LinkState.STOPPED)
        self.tracking.leave_budget()
        self.checkpoints.fail_all("replication stopped")
        if not self.vm.closed:
            with trio.CancelScope(shield=True):
                try:
                    await self.tracking.save()
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
            "degraded": self.tracking.mode == SYNC and self.state != LinkState.STREAMING,
            "epoch": st.epoch,
            "last_seq": st.last_applied,
            "sent_seq": conn.sent_upto if conn else None,
            "receipts": conn.receipts if conn else None,
            "confirmed_checkpoint": st.last_checkpoint,
            **self.tracking.status(),
            "resync": self.progress.as_dict(),
            "lz4_ratio": round(wire / raw, 4) if raw else None,
            "pending_checkpoints": len(self.checkpoints.markers),
            "last_error": self.last_error,
            **self.stats,
        }

def _describe(e: BaseException) -> str:
    name = type(e).__name__
    text = str(e) or name
    return text if isinstance(e, ColofsError | ProtocolError) else f"{name}: {text}"


__all__ = ["ASYNC", "SYNC", "CheckpointResult", "LinkState", "VMLink"]
