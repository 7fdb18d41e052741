"""The primary's side of a resync (the secondary's side is :mod:`colofs.repl.resync`).

A resync brings the secondary to ``S0`` (the VM's last write when it
starts) without stopping the VM: the dirty map is cut at ``S0``, the
retained log restarts at ``S0 + 1``, and for each run of dirty blocks the
primary sends RESYNC_QUERY, the secondary answers with its digests, and only
the blocks that differ go out as RESYNC_DATA (at most ``resync_window``
queries in flight). RESYNC_DONE(S0) ends it; the secondary echoes it, and
streaming resumes at ``S0 + 1``. If the retained log overflows during a
pass, another pass goes over what changed since the last ``S0``.

:class:`ResyncDriver` is a part of :class:`~colofs.repl.sender.VMLink`: it owns
the progress of its passes, and moves the dirty map and the log of
:class:`~colofs.repl.tracking.Tracking` only through its resync methods.
"""

from __future__ import annotations

import logging
from collections import deque

import trio

from colofs.core.vm import VM
from colofs.repl.batching import Batching
from colofs.repl.blockset import BlockSet
from colofs.repl.checkpoints import Checkpoints
from colofs.repl.config import ReplConfig
from colofs.repl.errors import ReplProtocolError
from colofs.repl.linkstate import Conn, Lifecycle, LinkState
from colofs.repl.resync import ResyncProgress, chunk_runs, read_and_digest
from colofs.repl.tracking import Tracking
from colofs.repl.util import first_error
from colofs.wire.messages import ResyncBlock, ResyncData, ResyncDone, ResyncQuery

log = logging.getLogger("colofs.repl.sender")  # one logger name per side of the link, for log filters


class ResyncDriver:
    """Drives a digest-compared resync of the dirty blocks over one connection."""

    def __init__(self, vm: VM, cfg: ReplConfig, life: Lifecycle, tracking: Tracking,
                 checkpoints: Checkpoints, batching: Batching) -> None:
        self.vm = vm
        self.cfg = cfg
        self.life = life
        self.tracking = tracking
        self.checkpoints = checkpoints
        self.batching = batching
        self.progress = ResyncProgress()
        self.stats = {"resyncs": 0}

    async def resync(self, conn: Conn) -> None:
        """Bring the secondary to ``S0`` (now) by comparing dirty blocks, then stream from ``S0 + 1``."""
        self.life.move(LinkState.RESYNCING)
        vm = self.vm
        tracking = self.tracking
        try:
            for _ in range(3):
                if not tracking.retaining or conn.next_seq is None or not tracking.retained.covers(conn.next_seq):
                    break
                # Still in the stream: send what is queued first, markers included.
                await self.batching.send_ready(conn, vm.state.last_applied)
                if conn.next_seq > vm.state.last_applied:
                    break
            # One call, no await: the dirty map's cut and the log's restart agree on S0.
            s0 = tracking.cut_for_resync()
            self.checkpoints.fail_unsent_through(s0, "a resync started before the secondary took it")
            full = tracking.full_pending
            since = vm.state.last_checkpoint
            self.stats["resyncs"] += 1
            while True:
                tracking.pass_begins()
                await self.batching.sync_disks(conn)
                await self._resync_pass(conn, tracking.dirty_since(since), s0, full)
                if tracking.retaining:
                    break
                # The retained log overflowed during the pass: go over what changed since s0.
                since, s0 = s0, tracking.restart_after_overflow()
                full = False
            conn.resync_done = None
            await conn.sender.send(ResyncDone(s0))
            conn.next_seq = s0 + 1
            conn.sent_upto = max(conn.sent_upto, s0)
            while conn.resync_done != s0:
                await self.life.wait_changed()
            tracking.full_sync_done()
            self.progress.finish()
            self.life.announce()
            log.info("VM %s: resync done up to seq %d: %d of %d blocks differed (%d bytes)",
                     vm.name, s0, self.progress.blocks_sent, self.progress.blocks_total,
                     self.progress.bytes_sent)
        except BaseException:
            tracking.owe_resync()
            raise

    async def _resync_pass(self, conn: Conn, bits: dict[str, BlockSet], s0: int, full: bool) -> None:
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
        self.life.announce()  # a pass begun is news: watchers need no clock to notice it
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

    async def _send_differing(self, conn: Conn, name: str, idx: int, first: int, cnt: int,
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
