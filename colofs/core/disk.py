"""One replicated disk: base, the hidden and active layers, and the views over them.

The view served to the VM on this host is ``V[b] = A[b] if b in A else
H[b] if b in H else B[b]`` (docs/design.md). On a primary (and after failover) the
layers are empty and V is base itself. Where a write goes depends on the
VM's role and phase:

* secondary: the SVM's writes go to active only (read-modify-write of V for
  partial blocks);
* secondary during a failover commit: blocks still buffered go to active
  (the commit will carry them to base), all others straight to base;
* primary: to base, and the numbering handed to the disk at construction
  gives each write its sequence number and queues it for forwarding.

A disk knows its VM only through :class:`DiskOwner` and that numbering
callable, so it imports nothing of ``colofs.core.vm``.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

import trio

from colofs.core.blocklog import BlockLog
from colofs.core.blocks import block_count, block_span, check_range
from colofs.core.cbw import WRITEBACK_EVERY, CopyBeforeWrite, block_runs
from colofs.core.commitcopy import Copy, active_runs, copy_runs
from colofs.core.fileio import Buffer
from colofs.core.forward import WriteSink
from colofs.core.ioctx import IOContext
from colofs.core.layers import patch_edges, read_file, read_layers, write_overlay
from colofs.core.logformat import ZERO_AT
from colofs.core.logsync import make_durable
from colofs.core.rangelock import RangeLock, holding
from colofs.core.snapshot import Snapshot
from colofs.core.state import FAILOVER, PRIMARY, VMState

NumberWrite = Callable[[str, int, Buffer], Awaitable[int]]
"""Numbers a primary's write ``(disk, offset, data)`` and queues it for forwarding; returns its seq.

Called with the disk's range lock held, so writes to a block are numbered in
the order they reached base.
"""


class DiskOwner(Protocol):
    """What a disk reads of the VM it belongs to (``colofs.core.vm.VM`` is one)."""

    name: str
    state: VMState
    damage: object | None
    forward: WriteSink | None
    io: IOContext

    def check_usable(self) -> None: ...

    def note_damage(self, err: BaseException) -> None: ...

COMMIT_CHUNK = 4 << 20  # default bytes of buffered blocks carried to base per locked step of a failover


class Disk:
    """A disk of a VM; the I/O entry points the mount and the wire call."""

    def __init__(
        self,
        vm: DiskOwner,
        name: str,
        path: str,
        size: int,
        block_size: int,
        base_fd: int,
        hidden: BlockLog,
        active: BlockLog,
        number_write: NumberWrite,
    ) -> None:
        self.vm = vm
        self._number_write = number_write
        self.name = name
        self.path = path
        self.size = size
        self.block_size = block_size
        self.shift = block_size.bit_length() - 1
        self.nblocks = block_count(size, self.shift)
        self.base_fd = base_fd
        self.hidden = hidden
        self.active = active
        self.label = f"{vm.name}/{name}"
        self.lock = RangeLock()
        self.io = vm.io  # the store's pool, read policy and writeback
        self.cbw = CopyBeforeWrite(base_fd, block_size, self.label, vm.io)
        # A layer block failing its digest quarantines the whole VM (see colofs.core.damage).
        self.cbw.on_damage = vm.note_damage
        hidden.on_damage = vm.note_damage
        self.commit_chunk = COMMIT_CHUNK
        self._copy_ok = True  # False once copy_file_range proved unsupported for these files
        self._copied = 0  # bytes copied into base since writeback was last started
        self._rewritten: set[int] = set()  # buffered blocks the SVM wrote during a failover commit
        self._layers = (active, hidden)
        self.snapshots: dict[str, Snapshot] = {}

    def close(self) -> None:
        for snap in self.snapshots.values():
            snap.close()
        self.hidden.close()
        self.active.close()
        if self.base_fd >= 0:
            os.close(self.base_fd)
            self.base_fd = -1

    # -- checks -------------------------------------------------------------

    def check_range(self, offset: int, length: int) -> None:
        check_range(self.label, self.size, offset, length, "the disk's size")

    # -- reads ----------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytearray:
        """The VM's view of ``length`` bytes at ``offset``, in one new buffer."""
        if self.vm.damage is not None:
            self.vm.check_usable()
        self.check_range(offset, length)
        out = bytearray(length)
        if length:
            shift = self.shift
            lo, hi = offset >> shift, ((offset + length - 1) >> shift) + 1  # block_span, inlined
            lock = self.lock
            req = lock.try_acquire(lo, hi, False) or await lock.acquire(lo, hi, False)
            try:
                if self.active.map or self.hidden.map:
                    await read_layers(self.io, self._layers, self.base_fd, shift, offset, memoryview(out),
                                      self.label)
                else:  # empty layers (after every checkpoint): base itself, one coroutine less
                    await read_file(self.io, self.base_fd, memoryview(out), offset, self.label, " base")
            finally:
                lock.release(req)
        return out

    async def read_view(self, offset: int, mv: memoryview) -> None:
        """Fill ``mv`` with V from ``offset``; the caller holds the range lock."""
        await read_layers(self.io, self._layers, self.base_fd, self.shift, offset, mv, self.label)

    # -- writes ---------------------------------------------------------------

    async def write(self, offset: int, data: Buffer) -> None:
        """Write as the VM on this host does: to active on a secondary, to base on a primary.

        The role is read only once the range lock is held: a failover
        switches roles under every disk's full-range lock, so a write that
        waited through the switch takes the new path.
        """
        if self.vm.damage is not None:
            self.vm.check_usable()
        self.check_range(offset, len(data))
        if not len(data):
            return
        lo, hi = block_span(offset, len(data), self.shift)
        lock = self.lock
        req = lock.try_acquire(lo, hi, True) or await lock.acquire(lo, hi, True)
        seq = None
        try:
            if self.vm.state.role == PRIMARY:
                await self.cbw.write([(offset, data)])
                seq = await self._number_write(self.name, offset, data)
            else:
                await self._svm_write(offset, data)
        finally:
            lock.release(req)
        fwd = self.vm.forward
        if seq is not None and fwd is not None:
            await fwd.wait_acked(seq)

    async def apply(self, extents: Sequence[tuple[int, Buffer]]) -> None:
        """Apply a secondary's share of a primary batch to base, hidden saving the old blocks first.

        Takes the blocks' range lock itself. Writeback of base starts at
        once: the batch is acknowledged from here and the next checkpoint
        syncs it.
        """
        async with self.lock.spans(extents_blocks(self, extents), exclusive=True):
            await self.cbw.write(extents, start_writeback=True)

    async def _svm_write(self, offset: int, data: Buffer) -> None:
        shift = self.shift
        end = offset + len(data)
        blocks = range(*block_span(offset, len(data), shift))
        mask = self.block_size - 1
        # Whole blocks (the VM's usual request) need no read-modify-write.
        patched = await patch_edges(self.read_view, shift, offset, data) if (offset | end) & mask else {}
        if self.vm.state.phase != FAILOVER:
            write_overlay(self.active, shift, offset, data, patched, blocks)
            return
        # During a failover commit only blocks still buffered go to active;
        # for the others V[b] is B[b], so the exact bytes go to base.
        amap = self.active.map
        hmap = self.hidden.map
        buffered = [b for b in blocks if b in amap or b in hmap]
        if buffered:
            write_overlay(self.active, shift, offset, data, patched, buffered)
        self._rewritten.update(buffered)  # a commit running copied the maps before these writes
        if len(buffered) < len(blocks):
            mv = memoryview(data)
            base_extents: list[tuple[int, Buffer]] = []
            bs = self.block_size
            for b in blocks:
                if b in amap or b in hmap:
                    continue
                lo = max(offset, b << shift)
                hi = min(end, (b << shift) + bs, self.size)
                base_extents.append((lo, mv[lo - offset : hi - offset]))
            await self.cbw.write(base_extents)

    async def flush(self) -> None:
        """Make every write so far durable (the VM's fsync/flush)."""
        self.vm.check_usable()
        if self.vm.state.role == PRIMARY:
            await self.io.syncs.datasync_all([self.base_fd])
        elif self.vm.state.phase == FAILOVER:
            # Base first: a tombstone must never be durable before the base write it stands for. The
            # commit writes a step's tombstones after its base write, under the step's exclusive range:
            # held shared across both syncs, the whole disk lets no step fall between them.
            async with self.lock.range(0, self.nblocks, exclusive=False):
                await self.io.syncs.datasync_all([self.base_fd])
                await make_durable(self.io, [self.active, self.hidden])
        else:
            await make_durable(self.io, [self.active])

    # -- failover ---------------------------------------------------------------

    def _refresh(self, amap: dict[int, int], hmap: dict[int, int], blocks: Iterable[int]) -> None:
        """Bring the commit's copies of the maps up to date for ``blocks``, which the SVM wrote meanwhile."""
        for b in blocks:
            for copy, layer in ((amap, self.active.map), (hmap, self.hidden.map)):
                off = layer.get(b)
                if off is None:
                    copy.pop(b, None)
                else:
                    copy[b] = off
            self._rewritten.discard(b)

    async def _commit_step(self, chunk: list[int], amap: dict[int, int]) -> None:
        """Write V of ``chunk`` (sorted buffered blocks, range lock held) into base.

        Long runs that lie in active contiguously are copied file to file in
        the kernel (``copy_file_range``: one copy instead of a read and a
        write; active has no digests to check); the rest is read through the
        view, hidden's digests checked, and written.
        """
        bs = self.block_size
        shift = self.shift
        copies, rest = active_runs(amap, chunk, shift, self.size) if self._copy_ok else ([], chunk)
        buf = bytearray(len(rest) * bs)
        mv = memoryview(buf)
        extents: list[tuple[int, Buffer]] = []
        pos = 0
        for first, count in block_runs(rest):
            await self.read_view(first << shift, mv[pos : pos + count * bs])
            start = first << shift
            length = min(count * bs, self.size - start)
            extents.append((start, mv[pos : pos + length]))
            pos += count * bs
        if not copies:
            # Megabytes into base can wait on dirty-page throttling: not on the loop, SVM I/O goes on.
            await self.cbw.write(extents, store_in_thread=True)
            return
        cbw = self.cbw
        if cbw.targets:  # a snapshot keeps base's old blocks: saved, durably, before base changes
            await make_durable(self.io, await cbw.save(chunk))
        await trio.to_thread.run_sync(self._store_step, copies, extents)

    def _store_step(self, copies: list[Copy], extents: list[tuple[int, Buffer]]) -> None:
        """In a thread: the step's kernel copies from active, then the extents read through the view."""
        if not copy_runs(self.active.fd, self.base_fd, copies, self.label):
            self._copy_ok = False  # this file system has no copy_file_range: read and write from now on
        self.cbw.store(extents)
        self._copied += sum(length for _, _, length in copies)
        if self._copied >= WRITEBACK_EVERY:  # as cbw.store does for what it writes
            self._copied = 0
            self.cbw.start_writeback()

    def _prefetch(self, blocks: Sequence[int], amap: dict[int, int], hmap: dict[int, int]) -> None:
        """Ask the kernel to read the layer data of ``blocks`` ahead (a hint; errors are ignored)."""
        shift = self.shift
        # Log data is block aligned: file offsets in block units form runs like blocks do.
        offs = [amap.get(b, ZERO_AT) for b in blocks]
        a_slots = sorted(o >> shift for o in offs if o != ZERO_AT)
        h_slots = sorted(o >> shift for o in (hmap.get(b, ZERO_AT) for b, a in zip(blocks, offs, strict=True)
                                              if a == ZERO_AT and b not in amap) if o != ZERO_AT)
        for layer, slots in ((self.active, a_slots), (self.hidden, h_slots)):
            for first, count in block_runs(slots):
                try:
                    os.posix_fadvise(layer.fd, first << shift, count << shift, os.POSIX_FADV_WILLNEED)
                except OSError:
                    return

    # -- status -------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        return {
            "size": self.size,
            "block_size": self.block_size,
            "hidden_bytes": self.hidden.data_bytes,
            "active_bytes": self.active.data_bytes,
            "snapshots": [snap.info() for _, snap in sorted(self.snapshots.items())],
        }


def extents_blocks(disk: Disk, extents: Sequence[tuple[int, Buffer]]) -> list[tuple[int, int]]:
    """Merged ``(first, stop)`` block ranges covered by extents, for locking in order."""
    spans = sorted(block_span(off, len(d), disk.shift) for off, d in extents if len(d))
    merged: list[tuple[int, int]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1]:
            if hi > merged[-1][1]:
                merged[-1] = (merged[-1][0], hi)
        else:
            merged.append((lo, hi))
    return merged


def whole_disks(disks: Iterable[Disk]) -> AbstractAsyncContextManager[None]:
    """Every block of each disk, exclusively: no I/O of the VM runs while it is held.

    Pass the disks in name order (the order every holder of several uses).
    """
    return holding((d.lock, 0, d.nblocks) for d in disks)


async def apply_to_disks(batch: Sequence[tuple[Disk, Sequence[tuple[int, Buffer]]]]) -> None:
    """Apply each disk's extents (:meth:`Disk.apply`); several disks at once, so their syncs overlap."""
    if len(batch) == 1:
        disk, extents = batch[0]
        await disk.apply(extents)
        return
    async with trio.open_nursery() as nursery:
        for disk, extents in batch:
            nursery.start_soon(disk.apply, extents)
