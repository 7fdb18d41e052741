"""Streaming a primary VM's retained writes: batches, the window, checkpoint markers, DISK_ADDs.

A batch takes whatever is queued from the connection's next seq, up to
``batch_max_bytes``, and stops short of a checkpoint marker so the marker
follows exactly the write it was cut after. At most ``window`` batches are
unacknowledged; a batch that is not full may wait ``batch_delay`` for more
writes (see :meth:`Batching._may_wait`).

:class:`Batching` is a part of :class:`~colofs.repl.sender.VMLink`: it reads
the retained log of :class:`~colofs.repl.tracking.Tracking` and asks
:class:`~colofs.repl.checkpoints.Checkpoints` which markers are due.
"""

from __future__ import annotations

import trio

from colofs.core.vm import VM
from colofs.repl.checkpoints import Checkpoints
from colofs.repl.config import ASYNC, ReplConfig
from colofs.repl.linkstate import Conn, Lifecycle
from colofs.repl.tracking import Tracking
from colofs.wire.messages import Batch, Checkpoint, DiskAdd, DiskInfo, Write
from colofs.wire.messages import _trusted_write as trusted_write

ASYNC_BATCH_DELAY = 0.050
"""The least a small batch waits for company in async mode (seconds)."""


class Batching:
    """Sends the retained log over one connection, in order, within the window."""

    def __init__(self, vm: VM, cfg: ReplConfig, life: Lifecycle, tracking: Tracking,
                 checkpoints: Checkpoints) -> None:
        self.vm = vm
        self.cfg = cfg
        self.life = life
        self.tracking = tracking
        self.checkpoints = checkpoints
        self.stats = {"batches": 0, "writes_sent": 0, "bytes_sent": 0}
        self._hurry = trio.Event()
        self._full_at: int | None = None
        """While a batch waits for company: the retained log's bytes at which it would be full."""

    def hurry(self) -> None:
        """A checkpoint marker is queued: a small batch waiting for company goes out now."""
        self._hurry.set()

    def written(self) -> None:
        """A write was queued: a batch waiting for company goes out once what is queued would fill it."""
        full_at = self._full_at
        if full_at is not None and self.tracking.retained.nbytes >= full_at:
            self._hurry.set()

    async def sync_disks(self, conn: Conn) -> None:
        """DISK_ADD for every disk the secondary has not been told about on this connection."""
        for name in sorted(self.vm.disks):
            if name not in conn.disk_index:
                idx = len(conn.disk_index)
                d = self.vm.disks[name]
                await conn.sender.send(DiskAdd(idx, DiskInfo(name, d.size, d.block_size)))
                conn.disk_index[name] = idx

    async def _send_due_markers(self, conn: Conn) -> None:
        assert conn.next_seq is not None
        for m in self.checkpoints.due(conn.next_seq - 1):
            self.checkpoints.sent(m)  # before the send: its CHECKPOINT_DONE may be read before the send returns
            await conn.sender.send(Checkpoint(m.seq, m.id))

    async def _window(self, conn: Conn) -> None:
        while len(conn.inflight) >= self.cfg.window:
            await self.life.wait_changed()

    async def send_ready(self, conn: Conn, upto: int | None) -> bool:
        """Send queued writes (up to ``upto`` if given) and due markers; False if there was nothing."""
        retained = self.tracking.retained
        sent = False
        delayed = False
        while True:
            assert conn.next_seq is not None
            await self._send_due_markers(conn)
            end = retained.end if upto is None else min(upto, retained.end)
            if conn.next_seq > end or not retained.covers(conn.next_seq):
                return sent
            await self.sync_disks(conn)
            await self._window(conn)
            if not retained.covers(conn.next_seq):
                return sent
            end = retained.end if upto is None else min(upto, retained.end)
            await retained.read_back(conn.next_seq, end, self.cfg.batch_max_bytes)  # no await if nothing spilled
            if not retained.covers(conn.next_seq):
                return sent
            end = retained.end if upto is None else min(upto, retained.end)
            writes, size, full = self._collect(conn, end)
            if not writes:
                return sent
            if not full and not delayed and upto is None and size * 2 < self.cfg.batch_max_bytes \
                    and self._may_wait(conn):
                delayed = True
                self._hurry = trio.Event()  # no await since _may_wait: a marker queued from here ends the wait
                self._full_at = retained.nbytes + self.cfg.batch_max_bytes - size
                try:
                    with trio.move_on_after(self._delay()):
                        await self._hurry.wait()
                finally:
                    self._full_at = None
                continue
            delayed = False
            first = conn.next_seq
            last = first + len(writes) - 1
            # Recorded before the send: the reader may take the batch's ACK (or RECEIPT) before the send returns
            # (the last chunk is in the kernel, and trio yields after it). A failed send ends the
            # connection, and the next one starts from what the secondary says it holds.
            conn.next_seq = last + 1
            conn.sent_upto = last
            conn.inflight.append(last)
            await conn.sender.send(Batch(first, tuple(writes)))
            retained.mark_sent(last)
            self.stats["batches"] += 1
            self.stats["writes_sent"] += len(writes)
            self.stats["bytes_sent"] += size
            sent = True

    def _delay(self) -> float:
        """How long a small batch waits: longer in async mode, where no writer waits for the ACK.

        Each batch costs both daemons a wake-up, a frame, a decode, an apply
        (the secondary's group sync among it) and an ACK. At queue depth 1 a
        1 ms wait gathered ~15 writes a batch and 5 ms ~60, which cut the CPU
        per write of both daemons by about a fifth (bench/primary_path.py);
        20 ms instead of 5 took ~30 to ~100 writes a batch and a forwarded
        write's CPU from 106 to 89 µs on the primary and from 68 to 44 µs on
        the secondary (bench/forward_core.py, medians of 4 alternated runs);
        50 ms instead of 20 fills a batch to ``batch_max_bytes`` (~250 4K
        writes instead of ~100) and took the secondary's CPU per write from
        54 to 40 µs, the primary's within the noise (medians of 6; 100 ms
        gathers no more). No writer waits for it in async mode; the secondary's copy lags by it
        between checkpoints, and a checkpoint does not wait for it
        (:meth:`hurry`).
        """
        if self.tracking.mode == ASYNC:
            return max(self.cfg.batch_delay, ASYNC_BATCH_DELAY)
        return self.cfg.batch_delay

    def _may_wait(self, conn: Conn) -> bool:
        """Whether a batch that is not full may wait ``batch_delay`` for more writes.

        Only a batch under half of ``batch_max_bytes`` is asked: a larger one
        has its frame's costs shared already (and in a stream of 1 MiB writes
        each wait let the queue grow by what the guest wrote in it). The wait
        ends early once the writes queued would fill the batch
        (:meth:`written`), so a quick guest's writes do not pile up behind it.

        It may while batches are in flight anyway (sent, and not yet receipted
        on a connection with receipts, else not yet acknowledged: a sync
        writer waits for that); in async mode also when none are, since no
        writer waits for it, and every batch costs both loops a send, a
        decode, an apply and an ACK. Never while a checkpoint marker waits to
        go out behind it.
        """
        if conn.receipted < conn.sent_upto if conn.receipts else conn.inflight:
            return True
        return self.tracking.mode == ASYNC and not self.checkpoints.waiting()

    def _collect(self, conn: Conn, end: int) -> tuple[list[Write], int, bool]:
        """Writes from ``next_seq`` for one batch; ``full`` if a limit (size, marker) ended it."""
        assert conn.next_seq is not None
        marker = self.checkpoints.first_unsent(conn.next_seq, end)
        limit = end if marker is None else marker
        writes: list[Write] = []
        size = 0
        seq = conn.next_seq
        cap = self.cfg.batch_max_bytes
        get = self.tracking.retained.get
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
