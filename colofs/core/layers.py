"""Reading and writing images made of block-map layers over a base file.

A disk's view is ``active | hidden | base``, a snapshot's ``target | base``,
a clone's ``overlay | target | base``: each block comes from the first layer
that holds it. These helpers serve all of them, reading consecutive blocks
that sit contiguously in one file with a single ``preadv``, and writing a
request to a mutable layer with one ``pwritev`` per contiguous run.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence

from colofs.core.blocklog import BlockLog
from colofs.core.blocks import block_span
from colofs.core.errors import DiskIOError
from colofs.core.fileio import Buffer
from colofs.core.ioctx import IOContext
from colofs.core.logformat import ZERO_AT

ReadView = Callable[[int, memoryview], Awaitable[None]]

_ZEROS_FD = -2  # the "file" of blocks a layer records as zeros (ZERO_AT): runs of them are filled, not read


async def read_file(io: IOContext, fd: int, mv: memoryview, file_off: int, label: str, what: str = "") -> None:
    """Fill ``mv`` from ``fd`` at ``file_off``; a failure is a ``DiskIOError`` naming the image (and ``what``)."""
    try:
        await io.read_into(fd, mv, file_off)
    except OSError as e:
        raise DiskIOError(f"{label}{what}: reading {len(mv)} bytes at {file_off} failed: {e.strerror}",
                          e.errno) from e


async def _read_checked(io: IOContext, layer: BlockLog, mv: memoryview, block: int, file_off: int, lo: int, shift: int,
                        label: str) -> None:
    """Fill ``mv`` with bytes from ``lo`` of the run of whole blocks at ``block`` (file offset ``file_off``).

    Write-once layers keep a digest per block, so the whole blocks are read
    and checked before any byte is handed out (a partial block goes through
    a buffer of its own).
    """
    bs = 1 << shift
    start = block << shift
    count = (lo - start + len(mv) + bs - 1) >> shift
    if lo == start and len(mv) == count << shift:
        await read_file(io, layer.fd, mv, file_off, label)
        layer.verify(block, mv)
        return
    whole = memoryview(bytearray(count << shift))
    await read_file(io, layer.fd, whole, file_off, label)
    layer.verify(block, whole)
    mv[:] = whole[lo - start : lo - start + len(mv)]


async def read_layers(
    io: IOContext, layers: Sequence[BlockLog], base_fd: int, shift: int, offset: int, mv: memoryview, label: str
) -> None:
    """Fill ``mv`` with the image from ``offset``; the caller holds the range lock.

    Blocks served from a write-once layer (hidden, a snapshot's target) are
    checked against their digests: a mismatch raises ``BlockDamaged`` (EIO),
    never the wrong bytes.
    """
    for layer in layers:
        if layer.map:
            break
    else:  # empty layers (after every checkpoint): base itself, with no per-request work
        await read_file(io, base_fd, mv, offset, label, " base")
        return
    bs = 1 << shift
    end = offset + len(mv)
    first, stop = block_span(offset, len(mv), shift)
    last = stop - 1
    span = range(first, stop)
    maps = [layer for layer in layers if layer.map.any_in(first, stop)]
    if not maps:  # nothing of this range is in any layer (two bisections, not a look per block)
        await read_file(io, base_fd, mv, offset, label, " base")
        return
    if len(maps) == 1:
        one = maps[0]
        start = one.map.run_at(first, len(span), 1 << shift)
        if start is not None:  # the whole range sits contiguously in one layer (compared in C, not per block)
            if one.sums:
                await _read_checked(io, one, mv, first, start, offset, shift, label)
            else:
                await read_file(io, one.fd, mv, start + offset - (first << shift), label)
            return
    run_layer: BlockLog | None = None
    run_fd = -1
    run_block = run_off = run_next = 0

    async def flush(stop: int) -> None:
        lo = max(offset, run_block << shift)
        hi = min(end, stop << shift)
        if run_fd == _ZEROS_FD:  # blocks recorded as zeros: nothing to read
            mv[lo - offset : hi - offset] = bytes(hi - lo)
        elif run_layer is not None and run_layer.sums:
            await _read_checked(io, run_layer, mv[lo - offset : hi - offset], run_block, run_off, lo, shift, label)
        else:
            await read_file(io, run_fd, mv[lo - offset : hi - offset], run_off + lo - (run_block << shift), label)

    for b in range(first, last + 1):
        o = None
        fd = base_fd
        src = None
        for layer in maps:
            o = layer.map.get(b)
            if o is not None:
                fd = layer.fd
                if o == ZERO_AT:  # consecutive zero blocks make one run
                    fd, o = _ZEROS_FD, b << shift
                src = layer
                break
        if o is None:
            o = b << shift
        if fd == run_fd and o == run_next:
            run_next += bs
            continue
        if run_fd != -1:  # a run has begun (the zeros "file" is -2)
            await flush(b)
        run_layer, run_fd, run_block, run_off, run_next = src, fd, b, o, o + bs
    await flush(last + 1)


PREFETCH_MAX_BLOCKS = 64  # larger reads are not hinted: they send their misses to worker threads anyway


def prefetch_layers(layers: Sequence[BlockLog], base_fd: int, shift: int, offset: int, length: int) -> int:
    """Ask the kernel to start reading what ``read_layers`` will read of a range, without waiting; hints given.

    A connection that has several reads in hand hints all of them first, so
    the reads the page cache misses go to the device together and the
    reads themselves then wait for one device round trip, not one each. It
    is only a hint: no lock is taken and nothing is returned, so a block
    moved meanwhile (a write, a checkpoint) costs at most a useless
    read-ahead, never stale data. Blocks recorded as zeros are skipped.
    """
    first, stop = block_span(offset, length, shift)
    if stop - first > PREFETCH_MAX_BLOCKS or length <= 0:
        return 0
    span = range(first, stop)
    maps = [layer for layer in layers if layer.map.any_in(first, stop)]
    if not maps:
        return _willneed(base_fd, offset, length)
    bs = 1 << shift
    hints = 0
    for b in span:
        for layer in maps:
            o = layer.map.get(b)
            if o is not None:
                if o != ZERO_AT:
                    hints += _willneed(layer.fd, o, bs)
                break
        else:
            hints += _willneed(base_fd, b << shift, bs)
    return hints


def _willneed(fd: int, offset: int, length: int) -> int:
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
    except OSError:
        return 0  # a closed descriptor or a file system without read-ahead: the read does without
    return 1


async def patch_edges(read_view: ReadView, shift: int, offset: int, data: Buffer) -> dict[int, bytearray]:
    """Whole-block buffers for the partially written first and last blocks (read-modify-write)."""
    bs = 1 << shift
    end = offset + len(data)
    mv = memoryview(data)
    patched: dict[int, bytearray] = {}
    first, stop = block_span(offset, len(data), shift)
    for b in {first, stop - 1}:
        bstart = b << shift
        if bstart >= offset and bstart + bs <= end:
            continue
        buf = bytearray(bs)
        await read_view(bstart, memoryview(buf))
        lo = max(offset, bstart)
        hi = min(end, bstart + bs)
        buf[lo - bstart : hi - bstart] = mv[lo - offset : hi - offset]
        patched[b] = buf
    return patched


class _Iov:
    """Byte ranges of buffers for one ``pwritev``, merging ranges that touch."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[list] = []  # [buffer, start, stop]

    def add(self, buf: Buffer, start: int, stop: int) -> None:
        if self.parts:
            last = self.parts[-1]
            if last[0] is buf and last[2] == start:
                last[2] = stop
                return
        self.parts.append([buf, start, stop])

    def views(self) -> list[memoryview]:
        return [memoryview(b)[lo:hi] for b, lo, hi in self.parts]


def _whole_range(shift: int, offset: int, data: Buffer, patched: dict[int, bytearray], blocks: range) -> list[Buffer]:
    """The block contents of a whole write as few buffers: patched edges, one view of the middle."""
    first, last = blocks[0], blocks[-1]
    out: list[Buffer] = []
    lo = first
    if first in patched:
        out.append(patched[first])
        lo += 1
    hi = last - 1 if last in patched and last >= lo else last
    if lo <= hi:
        out.append(memoryview(data)[(lo << shift) - offset : ((hi + 1) << shift) - offset])
    if last in patched and last >= lo:
        out.append(patched[last])
    return out


def write_overlay(
    overlay: BlockLog, shift: int, offset: int, data: Buffer, patched: dict[int, bytearray], blocks: Sequence[int]
) -> None:
    """Put ``blocks`` of a write into a mutable layer: in place where present, appended otherwise."""
    bs = 1 << shift
    omap = overlay.map
    if isinstance(blocks, range) and blocks:
        # The common cases without a Python loop per block: all new (one
        # append), or all present at consecutive file offsets (one overwrite).
        if not omap.any_in(blocks[0], blocks[-1] + 1):
            overlay.append(blocks, _whole_range(shift, offset, data, patched, blocks))
            return
        start = omap.run_at(blocks[0], len(blocks), bs)
        if start is not None:
            overlay.overwrite(start, _whole_range(shift, offset, data, patched, blocks))
            return
    new_blocks: list[int] = []
    new_iov = _Iov()
    overwrite: list[tuple[int, _Iov]] = []
    ow_next = -1
    for b in blocks:
        pbuf = patched.get(b)
        if pbuf is not None:
            src: Buffer = pbuf
            lo = 0
        else:
            src = data
            lo = (b << shift) - offset
        o = omap.get(b)
        if o is None:
            new_blocks.append(b)
            new_iov.add(src, lo, lo + bs)
        elif o == ow_next:
            overwrite[-1][1].add(src, lo, lo + bs)
            ow_next = o + bs
        else:
            iov = _Iov()
            iov.add(src, lo, lo + bs)
            overwrite.append((o, iov))
            ow_next = o + bs
    for file_off, iov in overwrite:
        overlay.overwrite(file_off, iov.views())
    if new_blocks:
        overlay.append(new_blocks, new_iov.views())
