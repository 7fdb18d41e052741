"""Ingest: an unmodified QEMU primary feeds a secondary VM through NBD.

In QEMU's own COLO setup the primary's disk is a quorum of its local image
and an NBD child on the secondary. Pointed at the export ``VM/DISK:ingest``
of a colofs secondary, that child's writes become forwarded primary writes:
each is applied with :meth:`colofs.core.vm.VM.apply_primary` under the next
sequence number, so it goes through copy-before-write into base exactly as
a write from a colofs primary does, and the secondary VM's view is not
changed by it. Reads return the primary's image (base).

The NBD server applies the writes a client has pipelined, as far as they
were received together, as one :class:`WriteGroup`: one forwarded batch
under consecutive sequence numbers, so one hidden save and one
``fdatasync`` cover them all, and it replies to each only once the group is
durable (the same rule as the replication wire's ACK). Order within a group
is the order received: a later write to the same block wins.

A checkpoint of such a VM is a local ``mountctl checkpoint`` on the
secondary, taken while the primary VM is paused and its quorum drained
(every write it issued acknowledged): the checkpoint then holds exactly the
primary's image at that instant. A VM is fed either by a colofs primary or
by ingest, never both.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import trio

from colofs.core.blocks import block_span
from colofs.core.disk import Disk
from colofs.core.errors import RoleError
from colofs.core.fileio import Buffer
from colofs.core.layers import read_layers
from colofs.core.state import NORMAL, SECONDARY
from colofs.core.vm import PrimaryWrite

INGEST_SUFFIX = ":ingest"
GROUP_BYTES = 16 << 20
"""Bytes one group applies at most: copy-before-write reads the old blocks of a whole group into memory."""
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
        """Applied writes are crash-safe already (hidden durable); this makes base durable too."""
        self.disk.vm.check_usable()
        await self.disk.io.syncs.datasync_all([self.disk.base_fd])


class WriteGroup:
    """NBD writes received together, gathered to be applied as one batch (one hidden save, one sync).

    The server adds each write it takes from what the client has already
    sent, and calls :meth:`apply` before it replies to any of them, before it
    serves any other request (a read sees them, a flush covers them) and
    before the group would pass :data:`GROUP_BYTES`; when what was received
    ends half way through a request, a small group waits for it (:meth:`waits`).
    """

    def __init__(self, image: IngestImage) -> None:
        self.image = image
        self.extents: list[tuple[int, Buffer]] = []
        self.bytes = 0
        self.sync_base = False  # a write with FUA: base durable too before the replies
        self._zeros = b""

    def __bool__(self) -> bool:
        return bool(self.extents)

    def waits(self, arriving: int) -> bool:
        """Whether to wait for a write of ``arriving`` bytes half received rather than apply the group now.

        The client is still sending it, so the wait is a receive or a few;
        joining it saves a group (a hidden save and sync) where a write does
        not fit in one receive (a 1 MiB write over a socket whose buffer
        holds a fifth of it). Small writes are not waited for: their rest
        comes in the next receive, and receiving it alone costs a round.
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

    async def apply(self) -> None:
        """Apply what was gathered and empty the group (also when applying fails: those writes failed)."""
        extents, self.extents, self.bytes = self.extents, [], 0
        sync_base, self.sync_base = self.sync_base, False
        if extents:
            await self.image.apply(extents)
        if sync_base:
            await self.image.flush()
