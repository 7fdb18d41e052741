"""One primary's session on the secondary: reading, applying, checkpoints, resync and verify answers.

Once :mod:`colofs.repl.receiver` has accepted a connection and its ATTACH,
the session is served by these tasks:

* a reader that decodes frames into a bounded queue (answering PING itself,
  so a busy disk does not look like a dead peer); for a primary that asked
  for them it sends a RECEIPT as each batch passes the checks of
  :class:`~colofs.repl.intake.Intake`, before it is queued and applied;
* an applier that validates and applies them in order. Consecutive queued
  batches are applied together, one group commit for all of them
  (``apply_primary`` returns once base and hidden are durable), then
  acknowledged with one ACK. CHECKPOINT is taken once every write up to its
  seq is applied (they are: the stream is in order), then CHECKPOINT_DONE;
* a verify answerer beside the stream, so a verify never holds writes back;
* a silence timer, pushed on by every frame received.

Anything wrong in a frame -- framing, digest, size, an unknown disk index, a
range outside the disk, a sequence number that replays or skips, a message
out of place -- ends the session with a specific log line and an ERROR
frame; that frame changes nothing (each frame is checked before the core
sees it, and the core checks again before touching a byte).
"""

from __future__ import annotations

import logging

import trio

from colofs.core.errors import ColofsError
from colofs.core.vm import VM, PrimaryWrite
from colofs.repl.config import ReplConfig
from colofs.repl.errors import AttachRefused, ReplCode, ReplProtocolError
from colofs.repl.framing import FrameSender, bulk_bytes
from colofs.repl.hooks import SecondaryHooks
from colofs.repl.intake import Intake
from colofs.repl.persist import save_needs_full_sync
from colofs.repl.resync import read_and_digest
from colofs.repl.seqguard import SeqGuard
from colofs.repl.session import AttachResult, role_check
from colofs.repl.util import Signal, first_error
from colofs.repl.verify import checkpoint_digests, digests_now
from colofs.wire.errors import ConnectionClosed, ProtocolError, TruncatedFrame
from colofs.wire.messages import (
    Ack,
    Batch,
    Checkpoint,
    CheckpointDone,
    DiskAdd,
    Error,
    ErrorCode,
    Message,
    Ping,
    Pong,
    Receipt,
    ResyncData,
    ResyncDone,
    ResyncQuery,
    ResyncRequest,
    VerifyDigests,
    VerifyLiveQuery,
    VerifyQuery,
)
from colofs.wire.stream import FrameStream

log = logging.getLogger("colofs.repl.receiver")  # one logger name per side of the link, for log filters

MAX_QUERY_BYTES = 64 << 20
MAX_VERIFY_QUEUE = 16
"""VERIFY_QUERY frames a primary may have outstanding (it keeps a few in flight)."""
_STREAM = (Batch, Checkpoint, DiskAdd, ResyncQuery, ResyncData, ResyncDone)


class PeerError(Exception):
    """The primary sent ERROR: it gives up on this session."""


class Session:
    """One primary's connection for one VM."""

    def __init__(self, res: AttachResult, fs: FrameStream, sender: FrameSender, peer: str, *,
                 announced: int, config: ReplConfig, hooks: SecondaryHooks,
                 bad_frames: dict[str, str], receipts: bool = False) -> None:
        self.cfg = config
        self.hooks = hooks
        self.bad_frames = bad_frames
        """The server's record of malformed frames per VM (kept across sessions)."""
        self.vm: VM = res.vm
        self.disk_names = list(res.disk_names)
        self.needs_full = res.needs_full_sync
        self.fs = fs
        self.sender = sender
        self.peer = peer
        self.scope = trio.CancelScope()
        self.finished = trio.Event()
        self.seq = SeqGuard(announced=announced, last_applied=self.vm.state.last_applied,
                            max_rate=self.cfg.max_write_rate, now=trio.current_time())
        """Every seq the primary sends is checked against it before anything is recorded."""
        self.full_done = False
        self.synced = not self.needs_full
        self.intake = Intake(next_seq=self.vm.state.last_applied + 1, disk_names=self.disk_names,
                             disks=self.vm.disks, synced=self.synced,
                             max_disks=config.max_disks_per_vm) if receipts else None
        """Sends RECEIPTs (the primary asked for them at the handshake), or None."""
        self.last_rx = trio.current_time()
        self.started = trio.current_time()
        self.end_reason: str | None = None
        self.end_code: int = ReplCode.REPLACED
        self.stats = {"batches": 0, "writes": 0, "bytes": 0, "applies": 0, "receipts": 0, "checkpoints": 0,
                      "resync_queries": 0, "resync_blocks": 0, "resync_bytes": 0, "verify_queries": 0,
                      "verify_blocks": 0}
        self._tx, self._rx = trio.open_memory_channel[Message](self.cfg.receive_queue)
        self._verify_tx, self._verify_rx = trio.open_memory_channel[VerifyQuery | VerifyLiveQuery](MAX_VERIFY_QUEUE)
        self._applied = Signal()
        """Fired when ``last_applied`` moves (a live verify query waits for its seq)."""
        self._queued = 0
        """Write bytes decoded and not yet applied: the reader stops past ``receive_bytes``."""
        self._drained = Signal()

    def label(self) -> str:
        return f"VM {self.vm.name} from primary {self.peer}"

    def replace(self, why: str, code: int = ReplCode.REPLACED) -> None:
        """End the session; the primary is told ``why`` with ERROR ``code``."""
        self.end_reason = why
        self.end_code = code
        self.scope.cancel()

    async def run(self) -> None:
        err: BaseException | None = None
        with self.scope:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read)
                    nursery.start_soon(self._apply_loop)
                    nursery.start_soon(self._verify_loop)
                    nursery.start_soon(self._watch)
            except BaseExceptionGroup as eg:
                leaf = first_error(eg)
                if leaf is eg:
                    raise
                err = leaf
        try:
            if err is not None:
                await self._report(err)
            elif self.end_reason:
                log.info("%s: session ended: %s", self.label(), self.end_reason)
                with trio.CancelScope(shield=True), trio.move_on_after(0.5):
                    await self._refuse(self.end_code, self.end_reason)
        finally:
            self.finished.set()

    async def _refuse(self, code: int, text: str) -> None:
        with trio.move_on_after(1.0):
            try:
                await self.sender.send(Error(code, text))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ProtocolError):
                pass

    async def _report(self, err: BaseException) -> None:
        label = self.label()
        if isinstance(err, ConnectionClosed):
            log.info("%s: the primary closed the connection", label)
        elif isinstance(err, TruncatedFrame):
            log.info("%s: connection lost mid-frame (%s); the partial frame was dropped", label, err)
        elif isinstance(err, PeerError):
            log.warning("%s: the primary gave up: %s", label, err)
        elif isinstance(err, ReplProtocolError):
            log.warning("%s: refused: %s; connection closed, nothing of it applied", label, err)
            await self._refuse(err.code, str(err))
        elif isinstance(err, ProtocolError):
            log.warning("%s: bad frame (%s): %s; connection closed, nothing of it applied",
                        label, type(err).__name__, err)
            self.bad_frames[self.vm.name] = f"{type(err).__name__} from {self.peer}: {err}"
            await self._refuse(ErrorCode.PROTOCOL_ERROR, str(err))
        elif isinstance(err, ColofsError):
            log.error("%s: applying failed: %s; connection closed", label, err)
            await self._refuse(ReplCode.APPLY_FAILED, str(err))
        elif isinstance(err, trio.BrokenResourceError | trio.ClosedResourceError | OSError):
            log.info("%s: connection lost: %s", label, err or type(err).__name__)
        else:
            raise err

    # -- reading -------------------------------------------------------------------------

    async def _read(self) -> None:
        limit = self.cfg.receive_bytes
        while True:
            while self._queued >= limit:
                await self._drained.wait()  # TCP holds the primary back meanwhile
            msg = await self.fs.receive()
            self.last_rx = trio.current_time()
            role_check(self.vm)  # a failover made straight on the core ends the session here
            if isinstance(msg, Ping):
                await self.sender.send(Pong(msg.token))
            elif isinstance(msg, Error):
                raise PeerError(f"error {msg.code}: {msg.message}")
            elif isinstance(msg, _STREAM):
                if self.intake is not None and (seq := self.intake.take(msg)) is not None:
                    # Before the queue: the applier cannot ACK a write whose receipt is not out.
                    await self.sender.send(Receipt(seq))
                    self.stats["receipts"] += 1
                self._queued += bulk_bytes(msg)
                await self._tx.send(msg)
            elif isinstance(msg, VerifyQuery | VerifyLiveQuery):
                try:  # answered beside the stream: a verify never holds the primary's writes back
                    self._verify_tx.send_nowait(msg)
                except trio.WouldBlock:
                    raise ReplProtocolError(f"more than {MAX_VERIFY_QUEUE} VERIFY_QUERY frames outstanding") from None
            else:
                raise ReplProtocolError(f"{msg.TYPE.name} is not accepted from a primary after ATTACH")

    async def _watch(self) -> None:
        """End the session when the primary falls silent: a timer that every received frame pushes on.

        (A failover here ends it through :meth:`SecondaryServer.exclusive`, or
        at the next frame: the reader and the applier check the VM's role.)
        """
        idle_limit = 3 * self.cfg.peer_timeout
        while True:
            await trio.sleep_until(self.last_rx + idle_limit)
            if trio.current_time() - self.last_rx >= idle_limit:
                raise PeerError(f"nothing received for {idle_limit:g} s")

    # -- applying ------------------------------------------------------------------------

    def _done_with(self, nbytes: int) -> None:
        self._queued -= nbytes
        self._drained.fire()

    async def _apply_loop(self) -> None:
        pending: Message | None = None
        while True:
            msg = pending if pending is not None else await self._rx.receive()
            pending = None
            role_check(self.vm)
            size = bulk_bytes(msg)
            if isinstance(msg, Batch):
                pending = await self._apply_batches(msg)
                size = 0  # accounted for there
            elif isinstance(msg, Checkpoint):
                await self._on_checkpoint(msg)
            elif isinstance(msg, DiskAdd):
                await self._disk_add(msg)
            elif isinstance(msg, ResyncQuery):
                await self._resync_query(msg)
            elif isinstance(msg, ResyncData):
                await self._resync_data(msg)
            elif isinstance(msg, ResyncDone):
                await self._resync_done(msg)
            if size:
                self._done_with(size)

    def _require_stream(self, what: str) -> None:
        if self.seq.resyncing:
            raise ReplProtocolError(f"{what} in the middle of a resync")
        if not self.synced:
            raise ReplProtocolError(f"{what} before the full sync this VM asked for")

    def _disk(self, index: int) -> str:
        if index >= len(self.disk_names):
            raise ReplProtocolError(
                f"unknown disk index {index} (this connection has {len(self.disk_names)} disks)")
        return self.disk_names[index]

    def _convert(self, batch: Batch) -> list[PrimaryWrite]:
        """Check one batch completely; the list is what the core will apply."""
        self._require_stream("BATCH")
        self.seq.check_batch(batch.first_seq)
        out = []
        disks = self.vm.disks
        for i, w in enumerate(batch.writes):
            name = self._disk(w.disk)
            disk = disks[name]
            n = len(w.data)
            if n == 0 or w.offset + n > disk.size:
                raise ReplProtocolError(
                    f"BATCH seq {batch.first_seq + i}: {n} bytes at {w.offset} do not fit disk "
                    f"{name} ({disk.size} bytes)")
            out.append(PrimaryWrite(name, w.offset, w.data))
        return out

    async def _apply_batches(self, first: Batch) -> Message | None:
        """Apply ``first`` and the batches queued behind it in one group commit; ACK the last."""
        writes = self._convert(first)
        start = first.first_seq
        self.seq.took_batch(first.last_seq, trio.current_time())
        size = first.data_bytes
        count = 1
        pending: Message | None = None
        refused: ReplProtocolError | None = None
        while size < self.cfg.apply_merge_bytes:
            try:
                nxt = self._rx.receive_nowait()
            except trio.WouldBlock:
                break
            if not isinstance(nxt, Batch):
                pending = nxt
                break
            try:
                writes += self._convert(nxt)
            except ReplProtocolError as e:
                refused = e  # apply what came before it, then refuse it
                break
            self.seq.took_batch(nxt.last_seq, trio.current_time())
            size += nxt.data_bytes
            count += 1
        with trio.CancelScope(shield=True):
            last = await self.vm.apply_primary(start, writes)
        self._done_with(size)
        self._applied.fire()
        self.stats["batches"] += count
        self.stats["writes"] += len(writes)
        self.stats["bytes"] += size
        self.stats["applies"] += 1
        await self.sender.send(Ack(last))
        if refused is not None:
            raise refused
        return pending

    async def _on_checkpoint(self, msg: Checkpoint) -> None:
        self._require_stream("CHECKPOINT")
        vm = self.vm
        self.seq.check_checkpoint(msg.seq, vm.state.last_applied)
        with trio.CancelScope(shield=True):
            await self.hooks.take_checkpoint(vm, msg.seq)
            if self.full_done:
                await save_needs_full_sync(vm, False)
                self.full_done = False
                self.needs_full = False
        self.stats["checkpoints"] += 1
        await self.sender.send(CheckpointDone(msg.seq, msg.id))

    async def _disk_add(self, msg: DiskAdd) -> None:
        vm = self.vm
        info = msg.disk
        if msg.index != len(self.disk_names):
            raise ReplProtocolError(f"DISK_ADD at index {msg.index}; the next index is {len(self.disk_names)}")
        if info.name in self.disk_names:
            raise ReplProtocolError(f"DISK_ADD of disk {info.name}, which is already at index "
                                    f"{self.disk_names.index(info.name)}")
        if len(self.disk_names) >= self.cfg.max_disks_per_vm:
            raise ReplProtocolError(f"more than {self.cfg.max_disks_per_vm} disks")
        have = vm.disks.get(info.name)
        if have is not None:
            if (have.size, have.block_size) != (info.size, info.block_size):
                raise AttachRefused(
                    f"disk {info.name} is {have.size} bytes with {have.block_size}-byte blocks here, "
                    f"{info.size} with {info.block_size} on the primary", ReplCode.DISK_MISMATCH)
        else:
            with trio.CancelScope(shield=True):
                try:
                    await vm.add_disk(info.name, info.size, info.block_size)
                except ColofsError as e:
                    raise ReplProtocolError(f"DISK_ADD {info.name}: {e}") from None
                except OSError as e:  # the store failed: the primary hears that too
                    raise ReplProtocolError(f"DISK_ADD {info.name}: {e}", ReplCode.APPLY_FAILED) from None
            log.info("VM %s: created disk %s (%d bytes) for primary %s", vm.name, info.name, info.size, self.peer)
            hook = self.hooks.on_disk_added
            if hook is not None:
                await hook(vm.name, info.name)
        self.disk_names.append(info.name)

    async def _resync_query(self, msg: ResyncQuery) -> None:
        name = self._disk(msg.disk)
        disk = self.vm.disks[name]
        if msg.first_block + msg.count > disk.nblocks or msg.count * disk.block_size > MAX_QUERY_BYTES:
            raise ReplProtocolError(
                f"RESYNC_QUERY for blocks {msg.first_block}+{msg.count} of disk {name} "
                f"({disk.nblocks} blocks; at most {MAX_QUERY_BYTES} bytes per query)")
        self.seq.took_query()
        digests, _ = await trio.to_thread.run_sync(
            read_and_digest, disk.base_fd, disk.size, disk.block_size, msg.first_block, msg.count)
        self.stats["resync_queries"] += 1
        await self.sender.send(ResyncRequest(msg.disk, msg.first_block, tuple(digests)))

    async def _resync_data(self, msg: ResyncData) -> None:
        self.seq.check_data()
        name = self._disk(msg.disk)
        disk = self.vm.disks[name]
        bs = disk.block_size
        if msg.block_size != bs:
            raise ReplProtocolError(f"RESYNC_DATA with {msg.block_size}-byte blocks for disk {name} ({bs})")
        writes = []
        size = 0
        for b in msg.blocks:
            start = b.block * bs
            want = min(bs, disk.size - start)
            if b.block >= disk.nblocks or len(b.data) != want:
                raise ReplProtocolError(
                    f"RESYNC_DATA block {b.block} of {len(b.data)} bytes does not fit disk {name} "
                    f"({disk.nblocks} blocks of {bs} bytes)")
            writes.append(PrimaryWrite(name, start, b.data))
            size += want
        if not writes:
            raise ReplProtocolError("RESYNC_DATA without blocks")
        with trio.CancelScope(shield=True):
            await self.vm.apply_resync(writes)
        self.stats["resync_blocks"] += len(writes)
        self.stats["resync_bytes"] += size

    async def _resync_done(self, msg: ResyncDone) -> None:
        vm = self.vm
        self.seq.check_done(msg.seq, vm.state.last_applied, has_disks=bool(self.disk_names),
                            now=trio.current_time())
        with trio.CancelScope(shield=True):
            await vm.finish_resync(msg.seq)
        self.seq.took_done(msg.seq, trio.current_time())
        self._applied.fire()
        if self.needs_full:
            self.full_done = True
            self.synced = True
        log.info("%s: resync complete at seq %d", self.label(), msg.seq)
        await self.sender.send(ResyncDone(msg.seq))

    async def _verify_loop(self) -> None:
        """Answer each VERIFY_QUERY with the digests of the VM's last checkpoint (colofs.repl.verify)."""
        async for msg in self._verify_rx:
            role_check(self.vm)
            name = self._disk(msg.disk)
            disk = self.vm.disks[name]
            if msg.first_block + msg.count > disk.nblocks or msg.count * disk.block_size > MAX_QUERY_BYTES:
                raise ReplProtocolError(
                    f"{msg.TYPE.name} for blocks {msg.first_block}+{msg.count} of disk {name} "
                    f"({disk.nblocks} blocks; at most {MAX_QUERY_BYTES} bytes per query)")
            if not self.synced:
                raise ReplProtocolError("VERIFY_QUERY before the full sync this VM asked for")
            if isinstance(msg, VerifyLiveQuery):
                # Base is read once the primary's writes up to msg.seq are applied (or after a
                # bounded wait: an answer below msg.seq only leaves its blocks unsettled).
                self.seq.check_verify(msg.seq, trio.current_time())
                with trio.move_on_after(self.cfg.peer_timeout):
                    while self.vm.state.last_applied < msg.seq:
                        await self._applied.wait()
                seq, digests = await digests_now(self.vm, disk, msg.first_block, msg.count)
            else:
                seq, digests = await checkpoint_digests(self.vm, disk, msg.first_block, msg.count)
            self.stats["verify_queries"] += 1
            self.stats["verify_blocks"] += msg.count
            await self.sender.send(VerifyDigests(msg.token, msg.disk, msg.first_block, seq, tuple(digests)))

    def status(self) -> dict[str, object]:
        return {
            "connected": True,
            "peer_node": self.peer,
            "since_s": round(trio.current_time() - self.started, 3),
            "resyncing": self.seq.resyncing,
            "full_sync_pending": self.needs_full,
            **self.stats,
        }
