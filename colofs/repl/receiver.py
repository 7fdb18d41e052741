"""The secondary side: one listener for all VMs of a store, one session per connected VM.

A connection is authenticated (or, keyless on loopback, introduced), names
its VM with ATTACH, and is then served by two tasks:

* a reader that decodes frames into a bounded queue (answering PING itself,
  so a busy disk does not look like a dead peer);
* an applier that validates and applies them in order. Consecutive queued
  batches are applied together, one group commit for all of them
  (``apply_primary`` returns once base and hidden are durable), then
  acknowledged with one ACK. CHECKPOINT is taken once every write up to its
  seq is applied (they are: the stream is in order), then CHECKPOINT_DONE.

Anything wrong in a frame -- framing, digest, size, an unknown disk index, a
range outside the disk, a sequence number that replays or skips, a message
out of place -- ends that session with a specific log line and an ERROR
frame; that frame changes nothing (each frame is checked before the core
sees it, and the core checks again before touching a byte). The listener and
every other session go on. A newer connection for a VM replaces the old one
(a primary that reconnects after a silent cut), after the old one has
stopped applying.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from colofs.core.errors import ColofsError
from colofs.core.store import Store
from colofs.core.vm import VM, PrimaryWrite
from colofs.repl.admission import (
    EVICTED,
    HANDSHAKE_FAILED,
    HANDSHAKE_TIMEOUT,
    SESSION_LIMIT,
    SOURCE_LIMIT,
    Admission,
    Ticket,
)
from colofs.repl.config import ReplConfig, require_key_or_loopback
from colofs.repl.errors import AttachRefused, ReplCode, ReplProtocolError
from colofs.repl.framing import FrameSender, bulk_bytes
from colofs.repl.handshake import handshake, refuse, wrap_transport
from colofs.repl.persist import load_needs_full_sync, save_needs_full_sync
from colofs.repl.ratelog import RateLimitedLog
from colofs.repl.resync import read_and_digest
from colofs.repl.seqguard import SeqGuard
from colofs.repl.session import AttachResult, accept_attach, role_check
from colofs.repl.util import Signal, first_error
from colofs.repl.verify import checkpoint_digests, digests_now
from colofs.wire.auth import NonceRegistry
from colofs.wire.errors import ConnectionClosed, ProtocolError, TruncatedFrame
from colofs.wire.messages import (
    ATTACHED_NEEDS_FULL_SYNC,
    Ack,
    Attach,
    Attached,
    Batch,
    Checkpoint,
    CheckpointDone,
    DiskAdd,
    Error,
    ErrorCode,
    Message,
    Ping,
    Pong,
    ResyncData,
    ResyncDone,
    ResyncQuery,
    ResyncRequest,
    Role,
    VerifyDigests,
    VerifyLiveQuery,
    VerifyQuery,
)
from colofs.wire.stream import FrameStream

log = logging.getLogger(__name__)

MAX_QUERY_BYTES = 64 << 20
MAX_VERIFY_QUEUE = 16
"""VERIFY_QUERY frames a primary may have outstanding (it keeps a few in flight)."""
_STREAM = (Batch, Checkpoint, DiskAdd, ResyncQuery, ResyncData, ResyncDone)


async def core_checkpoint(vm: VM, seq: int) -> None:
    """The checkpoint a secondary takes without a mount: the core's alone."""
    await vm.checkpoint(seq)


@dataclass
class SecondaryHooks:
    """How the daemon takes part in the stream (awaited in stream order).

    ``checkpoint`` takes checkpoint ``seq`` of the VM once every write up to
    it is applied, before CHECKPOINT_DONE goes out. It defaults to the core's
    checkpoint; a mount replaces it to write back the SVM's dirty pages first
    and drop the kernel's page cache after (docs/design.md invariant 3). It runs
    shielded: once started, a checkpoint is finished. ``on_disk_added`` runs
    after a disk was created for the primary.
    """

    checkpoint: Callable[[VM, int], Awaitable[None]] = core_checkpoint
    on_disk_added: Callable[[str, str], Awaitable[None]] | None = None
    event: Callable[..., None] = lambda kind, **fields: None  # the daemon's EventBus.emit


class _PeerError(Exception):
    """The primary sent ERROR: it gives up on this session."""


class _Session:
    """One primary's connection for one VM."""

    def __init__(self, server: SecondaryServer, res: AttachResult, fs: FrameStream,
                 sender: FrameSender, peer: str, *, announced: int) -> None:
        self.server = server
        self.cfg = server.cfg
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
        self.last_rx = trio.current_time()
        self.started = trio.current_time()
        self.end_reason: str | None = None
        self.end_code: int = ReplCode.REPLACED
        self.stats = {"batches": 0, "writes": 0, "bytes": 0, "applies": 0, "checkpoints": 0,
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
        elif isinstance(err, _PeerError):
            log.warning("%s: the primary gave up: %s", label, err)
        elif isinstance(err, ReplProtocolError):
            log.warning("%s: refused: %s; connection closed, nothing of it applied", label, err)
            await self._refuse(err.code, str(err))
        elif isinstance(err, ProtocolError):
            log.warning("%s: bad frame (%s): %s; connection closed, nothing of it applied",
                        label, type(err).__name__, err)
            self.server.bad_frames[self.vm.name] = f"{type(err).__name__} from {self.peer}: {err}"
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
            if isinstance(msg, Ping):
                await self.sender.send(Pong(msg.token))
            elif isinstance(msg, Error):
                raise _PeerError(f"error {msg.code}: {msg.message}")
            elif isinstance(msg, _STREAM):
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
        """End the session when the VM fails over here, or the primary falls silent."""
        idle_limit = 3 * self.cfg.peer_timeout
        while True:
            await trio.sleep(0.1)
            role_check(self.vm)
            if trio.current_time() - self.last_rx > idle_limit:
                raise _PeerError(f"nothing received for {idle_limit:g} s")

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
                await self._checkpoint(msg)
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

    async def _checkpoint(self, msg: Checkpoint) -> None:
        self._require_stream("CHECKPOINT")
        vm = self.vm
        self.seq.check_checkpoint(msg.seq, vm.state.last_applied)
        with trio.CancelScope(shield=True):
            await self.server.hooks.checkpoint(vm, msg.seq)
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
            hook = self.server.hooks.on_disk_added
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


class SecondaryServer:
    """Serves every VM of a secondary store to its primary; returned by :func:`serve_secondary`."""

    def __init__(self, store: Store, key: bytes | None, *, node_id: str, config: ReplConfig,
                 nonces: NonceRegistry | None, hooks: SecondaryHooks | None) -> None:
        self.store = store
        self.key = key
        self.node_id = node_id
        self.cfg = config
        self.nonces = nonces
        self.hooks = hooks or SecondaryHooks()
        self.port: int | None = None
        self.sessions: dict[str, _Session] = {}
        self._vm_locks: dict[str, trio.Lock] = {}
        self.admission = Admission(total=config.max_unauthenticated,
                                   per_source=config.max_unauthenticated_per_source,
                                   sessions=config.max_sessions)
        self.strangers = RateLimitedLog(log)
        """Lines any stranger can cause (refusals before the key is proven): one per kind a second."""
        self.stats = {"connections": 0, "refused": 0, "sessions": 0}
        self.last_errors: dict[str, str] = {}
        self.bad_frames: dict[str, str] = {}
        """Per VM, the last frame refused as malformed or unauthenticated, and why (kept across sessions)."""
        self.last_refusal: str | None = None
        """Why the last connection was turned away before it named a VM (a wrong key, say)."""

    async def serve(self, listen: tuple[str, int], *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        host, port = listen
        await require_key_or_loopback(host, self.key, "--listen")
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        log.info("replication: listening on %s:%d (%s)", host, self.port,
                 "authenticated" if self.key is not None else "no key: loopback only")
        async with trio.open_nursery() as nursery:
            try:
                task_status.started(self)
                await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)
            finally:
                for s in list(self.sessions.values()):
                    s.replace("the secondary is shutting down")

    async def _handle(self, tcp: trio.SocketStream) -> None:
        try:
            host, port = tcp.socket.getpeername()[:2]
            peer_addr = f"{host}:{port}"
        except OSError:
            host = peer_addr = "?"
        self.stats["connections"] += 1
        ticket = self.admission.admit(str(host))
        if not isinstance(ticket, Ticket):
            cfg = self.cfg
            text = (f"{cfg.max_unauthenticated_per_source} unauthenticated connections from this address "
                    f"already" if ticket == SOURCE_LIMIT else
                    f"{cfg.max_unauthenticated} unauthenticated connections already")
            self._stranger_refused(ticket, peer_addr, f"closed at accept, unread: {text}")
            await trio.aclose_forcefully(tcp)
            return
        try:
            await self._connection(tcp, peer_addr, ticket)
        except Exception:  # never let one connection take the listener down
            log.exception("replication: internal error on the connection from %s", peer_addr)
        finally:
            self.admission.release(ticket)
            await trio.aclose_forcefully(tcp)

    def _stranger_refused(self, kind: str, addr: str, text: str) -> None:
        """Count and log (at most one line per kind a second) a connection turned away before the key."""
        self.stats["refused"] += 1
        self.last_refusal = f"{addr}: {text}"
        self.hooks.event("peer-refused", peer=addr, reason=text, role="secondary")
        self.strangers.warning(kind, "replication: refused connection from %s: %s", addr, text)

    async def _connection(self, tcp: trio.SocketStream, addr: str, ticket: Ticket) -> None:
        cfg = self.cfg
        started = trio.current_time()
        stream = await wrap_transport(tcp, server_side=True, tls=cfg.tls, peer=addr)
        fs = FrameStream(stream, max_wire_len=cfg.max_wire_len, max_raw_len=cfg.max_raw_len)
        sender = FrameSender(fs)
        try:
            with ticket.scope:  # cancelled when an address holding fewer needs the slot
                hello = await handshake(fs, self.key, self.node_id, Role.SECONDARY, initiator=False,
                                        nonces=self.nonces, timeout=cfg.handshake_timeout)
        except (ProtocolError, OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as e:
            kind = HANDSHAKE_TIMEOUT if trio.current_time() - started >= cfg.handshake_timeout else HANDSHAKE_FAILED
            self.admission.count(kind)
            self._stranger_refused(f"{kind}:{type(e).__name__}", addr, _text(e))  # one kind per failure type
            return
        if ticket.evicted:
            self._stranger_refused(EVICTED, addr, f"dropped during its handshake: {cfg.max_unauthenticated} "
                                   f"unauthenticated connections, and an address holding fewer needed the slot")
            return
        if not self.admission.authenticated(ticket):
            text = f"{cfg.max_sessions} sessions open, no room for another"
            self._stranger_refused(SESSION_LIMIT, addr, text)
            await refuse(fs, ReplCode.BAD_REQUEST, text)
            return
        try:
            with trio.fail_after(cfg.handshake_timeout):
                msg = await fs.receive()
        except (ProtocolError, OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as e:
            self.stats["refused"] += 1
            self.last_refusal = f"{addr}: {_text(e)}"
            log.warning("replication: refused connection from %s: %s", addr, _text(e))
            return
        peer = f"{hello.node_id} ({addr})"
        if not isinstance(msg, Attach):
            text = f"expected ATTACH, got {msg.TYPE.name}"
            log.warning("replication: refused connection from %s: %s", peer, text)
            await refuse(fs, ReplCode.BAD_REQUEST, text)
            return
        lock = self._vm_locks.setdefault(msg.vm, trio.Lock())
        async with lock:
            old = self.sessions.get(msg.vm)
            if old is not None:
                old.replace(f"replaced by a new connection from {peer}")
                with trio.move_on_after(cfg.handshake_timeout):
                    await old.finished.wait()
                if not old.finished.is_set():
                    text = f"VM {msg.vm}: the previous session is still applying; try again"
                    log.warning("replication: refused %s: %s", peer, text)
                    await refuse(fs, ReplCode.BAD_REQUEST, text)
                    return
            try:
                if msg.vm in self.store.vms:  # a quarantined VM takes no primary until it is repaired
                    self.store.vms[msg.vm].check_usable()
                res = await accept_attach(self.store, msg, peer, max_disks=cfg.max_disks_per_vm)
            except (AttachRefused, ColofsError, OSError) as e:
                code = e.code if isinstance(e, AttachRefused) else ReplCode.BAD_REQUEST
                self.stats["refused"] += 1
                self.last_errors[msg.vm] = str(e)
                log.warning("replication: refused primary %s for VM %s: %s", peer, msg.vm, e)
                self.hooks.event("peer-refused", vm=msg.vm, peer=peer, reason=str(e), role="secondary")
                await refuse(fs, code, str(e))
                return
            session = _Session(self, res, fs, sender, hello.node_id, announced=max(0, msg.next_seq - 1))
            self.sessions[msg.vm] = session
            self.last_errors.pop(msg.vm, None)
            st = res.vm.state
            log.info("replication: VM %s attached by primary %s at seq %d (checkpoint %d)%s",
                     msg.vm, peer, st.last_applied, st.last_checkpoint,
                     "; full sync needed" if res.needs_full_sync else "")
            try:
                await sender.send(Attached(msg.vm, st.epoch, st.last_applied, st.last_checkpoint,
                                           ATTACHED_NEEDS_FULL_SYNC if res.needs_full_sync else 0))
            except BaseException as e:
                session.finished.set()
                del self.sessions[msg.vm]
                if isinstance(e, OSError | trio.BrokenResourceError | trio.ClosedResourceError):
                    log.info("replication: connection from %s lost while attaching: %s", peer, _text(e))
                    return
                raise
        self.stats["sessions"] += 1
        self.hooks.event("peer-connected", vm=msg.vm, peer=peer, role="secondary")
        try:
            await session.run()
        finally:
            if self.sessions.get(msg.vm) is session:
                del self.sessions[msg.vm]
            self.hooks.event("peer-lost", vm=msg.vm, peer=peer, role="secondary",
                             reason=self.last_errors.get(msg.vm))

    @asynccontextmanager
    async def exclusive(self, vm_name: str, why: str, code: int = ReplCode.FAILED_OVER) -> AsyncIterator[None]:
        """Close the VM's session (telling its primary ``why``) and take no primary for it until exit.

        A failover runs inside: the session stops applying before the commit
        starts, and no primary can attach in between; afterwards the VM's
        role refuses them on its own.
        """
        lock = self._vm_locks.setdefault(vm_name, trio.Lock())
        async with lock:
            session = self.sessions.get(vm_name)
            if session is not None:
                log.warning("replication: VM %s: closing the session of primary %s: %s",
                            vm_name, session.peer, why)
                session.replace(why, code)
                await session.finished.wait()
            yield

    def status(self, vm_name: str | None = None) -> dict[str, object]:
        """Per VM: role, epoch, seqs, and the session if a primary is connected."""
        def one(name: str) -> dict[str, object]:
            vm = self.store.vms.get(name)
            s = self.sessions.get(name)
            out: dict[str, object] = {"vm": name, "connected": False}
            if vm is not None:
                st = vm.state
                out.update(role=st.role, epoch=st.epoch, last_applied=st.last_applied,
                           last_checkpoint=st.last_checkpoint, full_sync_owed=load_needs_full_sync(vm))
            if s is not None:
                out.update(s.status())
            if name in self.last_errors:
                out["last_error"] = self.last_errors[name]
            if name in self.bad_frames:
                out["last_bad_frame"] = self.bad_frames[name]
            return out

        if vm_name is not None:
            return one(vm_name)
        return {"listen_port": self.port, **self.stats, "open_sessions": len(self.sessions),
                "last_refusal": self.last_refusal, **self.admission.status(),
                "vms": {n: one(n) for n in sorted(set(self.store.vms) | set(self.sessions))}}


def _text(e: BaseException) -> str:
    return str(e) or type(e).__name__


async def serve_secondary(
    store: Store,
    listen: tuple[str, int],
    key: bytes | None,
    *,
    node_id: str | None = None,
    config: ReplConfig | None = None,
    nonces: NonceRegistry | None = None,
    hooks: SecondaryHooks | None = None,
    task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the secondary store on ``listen`` until cancelled.

    Use ``server = await nursery.start(serve_secondary, store, (host, port), key)``:
    the :class:`SecondaryServer` it reports has ``port`` (the bound one, for
    port 0) and ``status()``. Raises :class:`~colofs.repl.errors.ReplConfigError`
    before binding if there is no key and ``host`` is not loopback.
    """
    server = SecondaryServer(store, key, node_id=node_id or store.node_id, config=config or ReplConfig(),
                             nonces=nonces, hooks=hooks)
    await server.serve(listen, task_status=task_status)
