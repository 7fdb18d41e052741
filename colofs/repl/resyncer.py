"""The primary's side of a resync (the secondary's side is :mod:`colofs.repl.resync`).

A resync brings the secondary to ``S0`` (the VM's last write when it
starts) without stopping the VM: the dirty map is cut at ``S0``, the
retained log restarts at ``S0 + 1``, and for each run of dirty blocks the
primary sends RESYNC_QUERY, the secondary answers with its digests, and only
the blocks that differ go out as RESYNC_DATA (at most ``resync_window``
queries in flight). RESYNC_DONE(S0) ends it; the secondary echoes it, and
streaming resumes at ``S0 + 1``. If the retained log overflows during a
pass, another pass goes over what changed since the last ``S0``.

:class:`ResyncDriver` is a part of :class:`~colofs.repl.sender.VMLink`.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING

import trio

from colofs.core.vm import VM
from colofs.repl.blockset import BlockSet
from colofs.repl.checkpoints import Marker
from colofs.repl.config import ReplConfig
from colofs.repl.dirty import DirtyMap
from colofs.repl.errors import ReplProtocolError
from colofs.repl.linkstate import Conn, LinkState
from colofs.repl.resync import ResyncProgress, chunk_runs, read_and_digest
from colofs.repl.retained import RetainedLog
from colofs.repl.util import Signal, first_error
from colofs.wire.messages import ResyncBlock, ResyncData, ResyncDone, ResyncQuery

log = logging.getLogger("colofs.repl.sender")  # one logger name per side of the link, for log filters


class ResyncDriver:
    """Drives a digest-compared resync of the dirty blocks over one connection."""

    vm: VM
    cfg: ReplConfig
    dirty: DirtyMap
    retained: RetainedLog
    retaining: bool
    resync_needed: bool
    markers: list[Marker]
    acked: int
    unacked_bytes: int
    progress: ResyncProgress
    stats: dict[str, int]
    _full_pending: bool
    _changed: Signal

    if TYPE_CHECKING:  # provided by VMLink and its other parts
        def _set_state(self, state: LinkState) -> None: ...
        def _fail_marker(self, m: Marker, why: str) -> None: ...
        async def _sync_disks(self, conn: Conn) -> None: ...
        async def _send_ready(self, conn: Conn, upto: int | None) -> bool: ...

    async def _resync(self, conn: Conn) -> None:
        """Bring the secondary to ``S0`` (now) by comparing dirty blocks, then stream from ``S0 + 1``."""
        self._set_state(LinkState.RESYNCING)
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
            self._changed.fire()
            log.info("VM %s: resync done up to seq %d: %d of %d blocks differed (%d bytes)",
                     vm.name, s0, self.progress.blocks_sent, self.progress.blocks_total,
                     self.progress.bytes_sent)
        except BaseException:
            self.resync_needed = True
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
        self._changed.fire()  # a pass begun is news: watchers need no clock to notice it
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
