"""Ingest: an unmodified QEMU primary feeds a secondary VM through NBD.

In QEMU's own COLO setup the primary's disk is a quorum of its local image
and an NBD child on the secondary. Pointed at the export ``VM/DISK:ingest``
of a colofs secondary, that child's writes become forwarded primary writes:
each is applied with :meth:`colofs.core.vm.VM.apply_primary` under the next
sequence number, so it goes through copy-before-write into base exactly as
a write from a colofs primary does, and the secondary VM's view is not
changed by it. Reads return the primary's image (base).

The NBD server answers a write once it is queued, in order, for the
connection's applier (:class:`WriteGroup`), which applies what has
accumulated as one forwarded batch under consecutive sequence numbers: one
hidden save and one ``fdatasync`` cover them all. Order is the order
received: a later write to the same block wins. A reply therefore says the
write is ordered, not durable, and that is all a primary write needs: after
a crash, restart rolls base back to the last checkpoint from hidden, undoing
every primary write since then, durable or not (invariant 5). A FUA write,
a flush and a read are answered only once every write before them is
applied (a flush: on every connection to the VM), and a checkpoint of the
VM first waits for every answered write (``VM.drain_ingest``). An apply
that fails fails every later request of that connection (``EIO``).

A checkpoint of such a VM is a local ``mountctl checkpoint`` on the
secondary, taken while the primary VM is paused and its quorum drained
(every write it issued acknowledged): the checkpoint applies what is queued
first and then holds exactly the primary's image at that instant. A VM is
fed either by a colofs primary or by ingest, never both.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence

import trio

from colofs.core.blocks import block_span
from colofs.core.disk import Disk
from colofs.core.errors import ColofsError, RoleError
from colofs.core.fileio import Buffer
from colofs.core.layers import read_layers
from colofs.core.state import NORMAL, SECONDARY
from colofs.core.vm import PrimaryWrite

log = logging.getLogger(__name__)

INGEST_SUFFIX = ":ingest"
GROUP_BYTES = 4 << 20
"""Bytes one group applies at most: copy-before-write reads the old blocks of a whole group into memory.

Also the most the server gathers from one round before it queues them. With
16 MiB of each the secondary's worker for an ingest VM peaked at 74.5-76.5 MiB
RSS under QEMU's quorum (bench.compare); at 4 and 4, 53.4-58.2; at 8 and 8
(or 4 and 8) 62.6-63.0, too near the 64 MiB budget. What it costs: a group
waits for one ``fdatasync`` of hidden, so a 1 MiB stream's rate is about a
group per flush; with 20 ms flushes 98 against 140 MB/s at 16 and 16."""
QUEUE_BYTES = 4 << 20
"""Bytes of answered writes a connection holds at most before they are applied: past it, it stops receiving."""
HELD_BYTES = QUEUE_BYTES + 2 * GROUP_BYTES
"""Payload one ingest connection holds at most: the queue (the group being applied in it, whose old
blocks copy-before-write reads: another group) and the group the server is gathering."""
ZERO_PIECE = 1 << 20
WAIT_BYTES = 4 << 20
"""A group smaller than this waits for a large write whose payload is still arriving, to take it in too."""
WAIT_WRITE = 64 << 10
"""Writes from this size may arrive over several receives: a group waits for them (:meth:`WriteGroup.waits`)."""


class IngestImage:
    """The primary's image of one secondary disk, written as forwarded primary writes."""

    def __init__(self, disk: Disk, lock: trio.Lock) -> None:
        self.disk = disk
        self.size = disk.size
        self.label = f"{disk.label}{INGEST_SUFFIX}"
        # Sequence numbers are handed out one writer at a time (every connection to this VM shares it).
        self._lock = lock

    def check_role(self) -> None:
        st = self.disk.vm.state
        if st.role != SECONDARY or st.phase != NORMAL:
            raise RoleError(f"{self.label}: ingest feeds a secondary; VM {self.disk.vm.name} is "
                            f"{st.role} ({st.phase})")

    async def read(self, offset: int, length: int) -> bytearray:
        """The primary's image: base, read under the disk's range lock like every base read."""
        d = self.disk
        d.vm.check_usable()
        d.check_range(offset, length)
        out = bytearray(length)
        if length:
            async with d.lock.range(*block_span(offset, length, d.shift), exclusive=False):
                await read_layers(d.io, (), d.base_fd, d.shift, offset, memoryview(out), self.label)
        return out

    async def write(self, offset: int, data: bytes) -> None:
        await self.apply([(offset, data)])

    async def apply(self, extents: Sequence[tuple[int, Buffer]]) -> None:
        """Apply ``(offset, data)`` in order as one forwarded batch: durable in hidden when this returns."""
        vm = self.disk.vm
        writes = [PrimaryWrite(self.disk.name, off, data) for off, data in extents]
        async with self._lock:
            await vm.apply_primary(vm.state.last_applied + 1, writes)

    async def flush(self) -> None:
        """Once every write answered on any connection to this VM is applied, make base durable too."""
        await self.disk.vm.drain_ingest()
        self.disk.vm.check_usable()
        await self.disk.io.syncs.datasync_all([self.disk.base_fd])


class WriteGroup:
    """NBD writes of one connection, gathered per round and applied in order by a task of their own.

    The server adds each write it takes from what the client has already
    sent and calls :meth:`commit` before it replies to any of them: that
    moves them to the connection's apply queue, in order, and returns once
    they are queued (a FUA write: once applied and base durable). A task
    (:meth:`run`) applies what has accumulated, up to :data:`GROUP_BYTES`,
    as one forwarded batch (one hidden save, one ``fdatasync``). At most
    :data:`QUEUE_BYTES` wait: past that :meth:`commit` waits, so the server
    stops receiving until the applier catches up. Before any other request
    (a read sees the writes answered before it, a flush covers them) the
    server calls :meth:`commit` with ``drain``. When what was received ends
    half way through a request, a small group waits for it (:meth:`waits`).

    An answered write is not yet durable, and need not be: after a crash
    restart rolls base back to the last checkpoint from hidden, undoing
    every primary write since then whether it was durable or not. What
    counts is their order (kept: one queue, applied in order through the
    unchanged apply path) and that a checkpoint holds every write answered
    before it: :meth:`run` registers :meth:`drain` on the VM, which a
    checkpoint awaits first. A failed apply is kept: every later
    :meth:`commit` or :meth:`drain` raises it, so the client learns of it.
    """

    def __init__(self, image: IngestImage) -> None:
        self.image = image
        self.extents: list[tuple[int, Buffer]] = []
        self.bytes = 0
        self.sync_base = False  # a write with FUA: base durable too before the replies
        self._zeros = b""
        self._queue: deque[tuple[int, Buffer]] = deque()
        self._queued_bytes = 0  # queued or being applied
        self._queued = 0  # writes ever queued
        self._applied = 0  # writes ever applied (or given up once failed)
        self._closed = False
        self.full = False  # commit is waiting for room in the queue: the server receives nothing meanwhile
        self.failed: BaseException | None = None
        self._changed = trio.Event()  # set when the applier takes, applies or fails, or the group closes

    def __bool__(self) -> bool:
        return bool(self.extents)

    def waits(self, arriving: int) -> bool:
        """Whether to wait for a write of ``arriving`` bytes half received rather than commit the group now.

        The client is still sending it, so the wait is a receive or a few;
        joining it keeps the round's writes together where a write does not
        fit in one receive (a 1 MiB write over a socket whose buffer holds a
        fifth of it). Small writes are not waited for: their rest comes in
        the next receive, and receiving it alone costs a round.
        """
        return arriving >= WAIT_WRITE and bool(self.extents) and self.bytes < WAIT_BYTES

    def fits(self, length: int) -> bool:
        """Whether ``length`` more bytes may join (a group always takes its first write, however large)."""
        return not self.extents or self.bytes + length <= GROUP_BYTES

    def add(self, offset: int, data: Buffer) -> None:
        self.extents.append((offset, data))
        self.bytes += len(data)

    def zero_pieces(self, offset: int, length: int) -> Iterator[tuple[int, Buffer]]:
        """``WRITE_ZEROES`` as data pieces (the core keeps no holes in a layer), all views of one buffer."""
        if not self._zeros:
            self._zeros = bytes(ZERO_PIECE)
        zeros = memoryview(self._zeros)
        end = offset + length
        while offset < end:
            n = min(ZERO_PIECE, end - offset)
            yield offset, zeros[:n]
            offset += n

    async def commit(self, *, drain: bool = False) -> None:
        """Queue what was gathered; with a FUA write or ``drain``, wait until everything queued is applied.

        Raises the failure of an earlier apply (the gathered writes are then
        dropped: nothing after a failed write is applied).
        """
        extents, self.extents, self.bytes = self.extents, [], 0
        sync_base, self.sync_base = self.sync_base, False
        if self.failed is not None:
            raise self.failed
        if extents:
            size = sum(len(d) for _, d in extents)
            try:
                while self._queued_bytes and self._queued_bytes + size > QUEUE_BYTES and self.failed is None:
                    self.full = True
                    await self._wait()  # back-pressure: the round waits, so nothing more is received
            finally:
                self.full = False
            if self.failed is not None:
                raise self.failed
            self._queue.extend(extents)
            self._queued += len(extents)
            self._queued_bytes += size
            self._wake()
        if sync_base or drain:
            await self.drain()
        if sync_base:
            await self.image.flush()

    async def drain(self) -> None:
        """Wait until every write queued so far is applied; raises the failure if one failed."""
        target = self._queued
        while self._applied < target and self.failed is None:
            await self._wait()
        if self.failed is not None:
            raise self.failed

    def close(self) -> None:
        """No more writes: :meth:`run` applies what is queued, then returns."""
        self._closed = True
        self._wake()

    async def run(self) -> None:
        """Apply the queue in order, each time all that accumulated up to :data:`GROUP_BYTES`, until closed.

        Shielded: a write that was answered is applied even when the
        connection is cancelled (a stop lets it finish, as a request under way).
        """
        vm = self.image.disk.vm
        vm.before_checkpoint.add(self.drain)
        try:
            with trio.CancelScope(shield=True):
                while True:
                    if not self._queue:
                        if self._closed:
                            return
                        await self._wait()
                        continue
                    batch = self._take()
                    try:
                        await self.image.apply(batch)
                    except (ColofsError, OSError) as e:
                        self._fail(e, len(batch))
                        return
                    self._applied += len(batch)
                    self._queued_bytes -= sum(len(d) for _, d in batch)
                    self._wake()
        finally:
            vm.before_checkpoint.discard(self.drain)

    def _take(self) -> list[tuple[int, Buffer]]:
        batch = [self._queue.popleft()]
        size = len(batch[0][1])
        while self._queue and size + len(self._queue[0][1]) <= GROUP_BYTES:
            off, data = self._queue.popleft()
            batch.append((off, data))
            size += len(data)
        return batch

    def _fail(self, e: BaseException, in_batch: int) -> None:
        lost = in_batch + len(self._queue)
        log.error("%s: applying %d answered writes failed: %s; they and the %d queued after them are "
                  "lost, every later request on this connection fails", self.image.label, in_batch, e,
                  len(self._queue))
        self.failed = e
        self._applied += lost
        self._queue.clear()
        self._queued_bytes = 0
        self._wake()

    def _wake(self) -> None:
        self._changed.set()

    async def _wait(self) -> None:
        if self._changed.is_set():
            self._changed = trio.Event()
        await self._changed.wait()
