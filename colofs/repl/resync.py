"""Digest-based catch-up: which blocks to compare, reading them, and what to send.

The flow (DRBD's checksum-based resync, driven by the side that knows what
may differ)::

    primary                                   secondary
    RESYNC_QUERY(disk, first, count)  ->      reads those blocks of base
                                      <-      RESYNC_REQUEST(disk, first, digests)
    reads its blocks, compares xxh3
    RESYNC_DATA(only differing blocks) ->     apply_resync (V unchanged, undo-logged)
    ...
    RESYNC_DONE(S0)                   ->      finish_resync(S0)
                                      <-      ACK(S0)

``S0`` is the primary's last sequence number when the pass started; writes
after it are streamed after RESYNC_DONE. Blocks are read as they are now
(possibly newer than ``S0``); those newer writes are then applied again from
the stream, which converges, and no checkpoint is taken before the pass has
finished reading, so every checkpoint image is exact.

Reading skips holes (``SEEK_DATA``), so a full sync of a sparse disk costs
little more than hashing zeros.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import xxhash

from colofs.core.fileio import read_into_blocking


def data_ranges(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """Byte ranges of ``[start, end)`` that may hold data (holes read as zeros)."""
    out: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        try:
            lo = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                break
            if e.errno == errno.EINVAL:  # the file system does not say: read everything
                return [(pos, end)]
            raise
        if lo >= end:
            break
        hi = os.lseek(fd, lo, os.SEEK_HOLE)
        out.append((lo, min(hi, end)))
        pos = hi
    return out


def read_blocks(fd: int, size: int, block_size: int, first: int, count: int) -> bytearray:
    """Blocks ``first .. first+count-1`` of a file of ``size`` bytes; the last may be short (blocking)."""
    start = first * block_size
    end = min(size, (first + count) * block_size)
    buf = bytearray(max(0, end - start))
    mv = memoryview(buf)
    for lo, hi in data_ranges(fd, start, end):
        read_into_blocking(fd, mv[lo - start : hi - start], lo)
    return buf


def block_digests(buf: bytes | bytearray, block_size: int) -> list[int]:
    mv = memoryview(buf)
    h = xxhash.xxh3_64_intdigest
    return [h(mv[i : i + block_size]) for i in range(0, len(buf), block_size)]


def read_and_digest(fd: int, size: int, block_size: int, first: int, count: int) -> tuple[list[int], bytearray]:
    """Read blocks and hash each one; for a worker thread."""
    buf = read_blocks(fd, size, block_size, first, count)
    return block_digests(buf, block_size), buf


def chunk_runs(runs: Iterable[tuple[int, int]], max_blocks: int, gap: int = 8) -> list[tuple[int, int]]:
    """``(first, count)`` queries covering the runs; runs closer than ``gap`` blocks are merged.

    Merging costs a few clean blocks' digests and saves a round trip each.
    """
    merged: list[list[int]] = []
    for lo, hi in runs:
        if merged and lo - merged[-1][1] <= gap:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    out: list[tuple[int, int]] = []
    for lo, hi in merged:
        for f in range(lo, hi, max_blocks):
            out.append((f, min(max_blocks, hi - f)))
    return out


@dataclass
class ResyncProgress:
    """What ``status`` shows of a resync: the current (or last) pass of each connection."""

    active: bool = False
    full: bool = False
    passes: int = 0
    blocks_total: int = 0
    blocks_checked: int = 0
    blocks_sent: int = 0
    bytes_sent: int = 0
    started: float = 0.0
    finished: float = 0.0
    upto_seq: int = 0
    history: list[dict[str, object]] = field(default_factory=list)

    def start(self, total: int, full: bool, upto: int) -> None:
        self.active = True
        self.full = full
        self.passes += 1
        self.blocks_total = total
        self.blocks_checked = self.blocks_sent = self.bytes_sent = 0
        self.started = time.monotonic()
        self.upto_seq = upto

    def finish(self) -> None:
        self.active = False
        self.finished = time.monotonic()
        self.history.append(self.as_dict())
        del self.history[:-8]

    def as_dict(self) -> dict[str, object]:
        now = time.monotonic()
        elapsed = (now if self.active else self.finished) - self.started if self.started else 0.0
        pct = 100.0 * self.blocks_checked / self.blocks_total if self.blocks_total else 100.0
        eta = None
        if self.active and self.blocks_checked and elapsed > 0:
            eta = elapsed * (self.blocks_total - self.blocks_checked) / self.blocks_checked
        return {
            "active": self.active,
            "full": self.full,
            "passes": self.passes,
            "blocks_total": self.blocks_total,
            "blocks_checked": self.blocks_checked,
            "blocks_sent": self.blocks_sent,
            "bytes_sent": self.bytes_sent,
            "percent": round(pct, 1),
            "elapsed_s": round(elapsed, 3),
            "eta_s": None if eta is None else round(eta, 1),
            "upto_seq": self.upto_seq,
        }
