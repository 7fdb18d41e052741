"""Ingest: an unmodified QEMU primary feeds a secondary VM through NBD.

In QEMU's own COLO setup the primary's disk is a quorum of its local image
and an NBD child on the secondary. Pointed at the export ``VM/DISK:ingest``
of a colofs secondary, that child's writes become forwarded primary writes:
each is applied with :meth:`colofs.core.vm.VM.apply_primary` under the next
sequence number, so it goes through copy-before-write into base exactly as
a write from a colofs primary does, and the secondary VM's view is not
changed by it. Reads return the primary's image (base).

A checkpoint of such a VM is a local ``mountctl checkpoint`` on the
secondary, taken while the primary VM is paused and its quorum drained
(every write it issued acknowledged): the checkpoint then holds exactly the
primary's image at that instant. A VM is fed either by a colofs primary or
by ingest, never both.
"""

from __future__ import annotations

import trio

from colofs.core.blocks import block_span
from colofs.core.disk import Disk
from colofs.core.errors import RoleError
from colofs.core.layers import read_layers
from colofs.core.state import NORMAL, SECONDARY
from colofs.core.vm import PrimaryWrite

INGEST_SUFFIX = ":ingest"


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
        vm = self.disk.vm
        async with self._lock:
            await vm.apply_primary(vm.state.last_applied + 1, [PrimaryWrite(self.disk.name, offset, data)])

    async def flush(self) -> None:
        """Applied writes are crash-safe already (hidden durable); this makes base durable too."""
        self.disk.vm.check_usable()
        await self.disk.io.syncs.datasync_all([self.disk.base_fd])
