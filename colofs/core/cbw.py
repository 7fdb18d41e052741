"""Copy-before-write: the single mechanism that keeps a past image of base intact.

Every change to a disk's base goes through :meth:`CopyBeforeWrite.write`.
Before a block of base changes for the first time, its old content is saved
into every attached *target* (a write-once :class:`BlockLog`) that does not
hold it yet (a block that reads as zeros, such as a hole of a fresh base, as a
ZERO record without data), and the targets are made durable -- synced, then their commit
records written (``blocklog.make_durable``) -- before base is touched. The
hidden buffer of a secondary is one target (emptied at each checkpoint); a
snapshot is another (kept until deleted). A target's image is therefore
``target[b] if b in target else base[b]`` at any time.

Callers hold the disk's exclusive range lock over the blocks they change, so
no read of base can interleave with the save and the overwrite.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence

import trio

from colofs.core.blocklog import BlockLog
from colofs.core.blocks import block_span
from colofs.core.errors import BlockDamaged, DiskIOError
from colofs.core.fileio import Buffer, write_all
from colofs.core.ioctx import IOContext
from colofs.core.logsync import make_durable

WRITEBACK_EVERY = 8 << 20
"""Bytes written to base after which the kernel is asked to start writing them back."""
WRITEBACK_MIN_RUN = 64 << 10
"""Only runs of at least this many bytes count toward :data:`WRITEBACK_EVERY`.

Small scattered writes (a primary's 4 KiB overwrites) are left to the
kernel's own writeback, as a raw file under QEMU is: a kick every 8 MiB of
them cost 9 to 10 µs of CPU per 4 KiB write and doubled its time on the loop
(``bench/primary_write_core.py``), submitting every scattered page at once
and writing again the pages the guest keeps rewriting. Streams of large
writes still start the device early.
"""


def block_runs(blocks: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted block numbers as ``(first, count)`` runs of consecutive blocks."""
    runs: list[tuple[int, int]] = []
    if not blocks:
        return runs
    start = prev = blocks[0]
    for b in blocks[1:]:
        if b != prev + 1:
            runs.append((start, prev - start + 1))
            start = b
        prev = b
    runs.append((start, prev - start + 1))
    return runs


class CopyBeforeWrite:
    """Writes to an image (base) that first preserve old blocks into the attached targets."""

    def __init__(self, fd: int, block_size: int, label: str, io: IOContext) -> None:
        self.fd = fd
        self.io = io  # reads of base, and the writeback thread
        self.block_size = block_size
        self.shift = block_size.bit_length() - 1
        self.label = label
        self.targets: list[BlockLog] = []
        self._unstarted = 0  # bytes stored since writeback was last started
        self.on_damage: Callable[[BlockDamaged], None] | None = None
        """Given to every target attached: called when a read finds one of its blocks damaged."""

    def attach(self, target: BlockLog) -> None:
        if target not in self.targets:
            self.targets.append(target)
        if self.on_damage is not None:
            target.on_damage = self.on_damage

    def detach(self, target: BlockLog) -> None:
        if target in self.targets:
            self.targets.remove(target)

    def blocks_of(self, extents: Sequence[tuple[int, Buffer]]) -> list[int]:
        """The sorted blocks the extents touch."""
        shift = self.shift
        touched: set[int] = set()
        for off, data in extents:
            if len(data):
                touched.update(range(*block_span(off, len(data), shift)))
        return sorted(touched)

    async def save(self, blocks: Sequence[int]) -> list[BlockLog]:
        """Copy the current content of ``blocks`` into each target lacking them.

        Returns the targets that grew; they still have to be synced. Each
        block is read from base once, however many targets want it.
        """
        if not self.targets:
            return []
        wanted = {id(t): t.map.absent(blocks) for t in self.targets}
        union = sorted({b for missing in wanted.values() for b in missing})
        if not union:
            return []
        bs = self.block_size
        buf = bytearray(len(union) * bs)
        mv = memoryview(buf)
        index: dict[int, int] = {}
        pos = 0
        runs = block_runs(union)
        holes = self._holes(runs)
        if len(runs) - len(holes) > 1:
            # Scattered blocks: let the device fetch them all at once instead of one read at a time.
            for n, (first, count) in enumerate(runs):
                if n in holes:
                    continue
                try:
                    os.posix_fadvise(self.fd, first * bs, count * bs, os.POSIX_FADV_WILLNEED)
                except OSError:
                    break  # only a hint
        for n, (first, count) in enumerate(runs):
            if n not in holes:  # a hole reads as zeros: buf already is
                try:
                    await self.io.read_into(self.fd, mv[pos : pos + count * bs], first * bs)
                except OSError as e:
                    raise DiskIOError(
                        f"{self.label}: reading base at {first * bs} for copy-before-write failed: {e.strerror}",
                        e.errno,
                    ) from e
            for i in range(count):
                index[first + i] = pos + i * bs
            pos += count * bs
        # Blocks of base that read as zeros (holes of a fresh disk, mostly) are saved as a record, not 4 KiB.
        zero = bytes(bs)
        zeros = {b for b, at in index.items() if buf.startswith(zero, at)}
        grown: list[BlockLog] = []
        for t in self.targets:
            missing = wanted[id(t)]
            if not missing:
                continue
            if zeros and t.takes_zeros:
                data = [b for b in missing if b not in zeros]
                t.append(data, _gather(mv, [index[b] for b in data], bs) if data else [],
                         [b for b in missing if b in zeros])
            elif len(missing) == len(union):
                t.append(missing, [mv])
            else:
                t.append(missing, _gather(mv, [index[b] for b in missing], bs))
            grown.append(t)
        return grown

    def _holes(self, runs: list[tuple[int, int]]) -> set[int]:
        """Indexes of the ``(first, count)`` runs that lie wholly in holes of base (known zeros, nothing to read).

        Asks the file system where data begins (``SEEK_DATA``, which counts
        written pages not yet allocated as data) only while it answers a
        hole: on a fresh disk one call covers the batch, and once data is
        found the remaining runs are simply read (their zero blocks are
        still recognised by content). Where ``SEEK_DATA`` is not supported
        everything is data.
        """
        bs = self.block_size
        holes: set[int] = set()
        next_data = -1
        for n, (first, count) in enumerate(runs):
            start, end = first * bs, (first + count) * bs
            if next_data < start:
                try:
                    next_data = os.lseek(self.fd, start, os.SEEK_DATA)
                except OSError as e:
                    if e.errno != errno.ENXIO:
                        return holes
                    next_data = 1 << 63  # no data from here to the end of the file
            if next_data >= end:
                holes.add(n)
            elif next_data <= start:
                return holes  # data here: read the rest
        return holes

    def store(self, extents: Sequence[tuple[int, Buffer]]) -> None:
        """Overwrite base; only after :meth:`save` and ``make_durable`` of the targets it returned.

        Every ``WRITEBACK_EVERY`` bytes of runs of ``WRITEBACK_MIN_RUN`` or
        more the kernel is asked to start writing base back, so the device
        works while writes stream in rather than all at the next sync (a
        guest's flush, a checkpoint).
        """
        for off, data in _coalesce(extents):
            try:
                write_all(self.fd, data, off)
            except OSError as e:
                raise DiskIOError(
                    f"{self.label}: writing base at {off} ({sum(len(d) for d in data)} bytes) failed: {e.strerror}",
                    e.errno,
                ) from e
            n = sum(len(d) for d in data)
            if n >= WRITEBACK_MIN_RUN:
                self._unstarted += n
        if self._unstarted >= WRITEBACK_EVERY:
            self.start_writeback()

    def start_writeback(self) -> None:
        """Have the kernel start writing base back now (in the background; nothing waits for it)."""
        self._unstarted = 0
        self.io.writeback.kick(self.fd)

    async def write(
        self, extents: Sequence[tuple[int, Buffer]], store_in_thread: bool = False, start_writeback: bool = False
    ) -> None:
        """Apply ``(offset, data)`` extents to base in order, after saving old blocks durably.

        ``store_in_thread`` is for writes of many megabytes (a failover's
        commit), which the kernel may hold back while it writes dirty pages.
        ``start_writeback`` has the kernel start writing them back at once
        (a secondary's applied batch) instead of every ``WRITEBACK_EVERY`` bytes.
        """
        if self.targets:
            grown = await self.save(self.blocks_of(extents))
            await make_durable(self.io, grown)
        if store_in_thread:
            await trio.to_thread.run_sync(self.store, extents)
        else:
            self.store(extents)
        if start_writeback:
            self.start_writeback()


def _gather(mv: memoryview, offsets: list[int], bs: int) -> list[memoryview]:
    """Views of ``bs`` bytes at ``offsets``, merged where they are adjacent."""
    out: list[memoryview] = []
    start = prev = offsets[0]
    for o in offsets[1:]:
        if o != prev + bs:
            out.append(mv[start : prev + bs])
            start = o
        prev = o
    out.append(mv[start : prev + bs])
    return out


def _coalesce(extents: Sequence[tuple[int, Buffer]]) -> list[tuple[int, list[Buffer]]]:
    """Merge extents that follow each other into one ``pwritev`` each, keeping order."""
    out: list[tuple[int, list[Buffer]]] = []
    end = -1
    for off, data in extents:
        if not len(data):
            continue
        if out and off == end:
            out[-1][1].append(data)
        else:
            out.append((off, [data]))
        end = off + len(data)
    return out
