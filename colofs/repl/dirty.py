"""Dirty-block tracking on the primary: which blocks changed since the last confirmed checkpoint.

A secondary that crashes rolls base back to its last checkpoint, so the
primary must be able to bring it forward from there even when it no longer
holds the writes themselves. It keeps one bit per block of every block
written since the last checkpoint the secondary confirmed (and, for a full
sync, every block); catching up is then a digest comparison of exactly those
blocks (:mod:`colofs.repl.resync`).

The bits are split into *segments* at cut points (a checkpoint marker at
seq ``c``, the start of a resync at ``S0``): a segment records the writes of
a seq interval, so a confirmed checkpoint drops the segments that end at or
before it, and "what changed after ``S0``" is the union of later segments.

Persistently each disk has ``DISK_DIR/repl-dirty.bitmap`` (the union of all
segments; header, bits, xxh3 trailer), written atomically; the VM-level
metadata that says whether it can be trusted lives in ``repl-primary.json``
(:mod:`colofs.repl.persist`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import xxhash

BITMAP_FILE = "repl-dirty.bitmap"
_MAGIC = b"COLOFS-DIRTY 1\n"
_NONZERO = re.compile(rb"[^\x00]+")
MAX_SEGMENTS = 32


def bitmap_len(nblocks: int) -> int:
    return (nblocks + 7) >> 3


def set_bits(bits: bytearray, lo: int, hi: int) -> None:
    """Set bits ``lo .. hi-1`` (block numbers) in a little-endian-per-byte bitmap."""
    if lo >= hi:
        return
    lo_byte = lo >> 3
    hi_byte = (hi - 1) >> 3
    if lo_byte == hi_byte:
        bits[lo_byte] |= ((1 << (hi - lo)) - 1) << (lo & 7)
        return
    bits[lo_byte] |= (0xFF << (lo & 7)) & 0xFF
    if hi_byte > lo_byte + 1:
        bits[lo_byte + 1 : hi_byte] = b"\xff" * (hi_byte - lo_byte - 1)
    bits[hi_byte] |= (1 << (((hi - 1) & 7) + 1)) - 1


def or_into(dst: bytearray, src: bytes | bytearray) -> None:
    """``dst |= src`` for two bitmaps of the same length, at C speed."""
    if not any(src):
        return
    n = len(dst)
    merged = int.from_bytes(dst, "little") | int.from_bytes(src, "little")
    dst[:] = merged.to_bytes(n, "little")


def count_bits(bits: bytes | bytearray) -> int:
    return int.from_bytes(bits, "little").bit_count()


def bit_runs(bits: bytes | bytearray, nblocks: int) -> Iterator[tuple[int, int]]:
    """``(first, stop)`` runs of consecutive set bits, below ``nblocks``."""
    run_lo = run_hi = -1
    for m in _NONZERO.finditer(bits):
        for i in range(m.start(), m.end()):
            byte = bits[i]
            base = i << 3
            if byte == 0xFF:
                if run_hi == base:
                    run_hi = base + 8
                else:
                    if run_lo >= 0:
                        yield run_lo, min(run_hi, nblocks)
                    run_lo, run_hi = base, base + 8
                continue
            for j in range(8):
                if byte >> j & 1:
                    b = base + j
                    if run_hi == b:
                        run_hi = b + 1
                    else:
                        if run_lo >= 0:
                            yield run_lo, min(run_hi, nblocks)
                        run_lo, run_hi = b, b + 1
    if run_lo >= 0 and run_lo < nblocks:
        yield run_lo, min(run_hi, nblocks)


@dataclass
class _DiskGeometry:
    nblocks: int
    shift: int


@dataclass
class _Segment:
    start: int
    """First sequence number whose writes this segment records."""
    bits: dict[str, bytearray] = field(default_factory=dict)


class DirtyMap:
    """The dirty blocks of every disk of one VM, segmented by sequence number."""

    def __init__(self, start_seq: int) -> None:
        self.geometry: dict[str, _DiskGeometry] = {}
        self._segments: list[_Segment] = [_Segment(start_seq)]
        self.changed = False
        """Set by every mark; whoever saves the map clears it."""

    # -- disks ---------------------------------------------------------------------

    def add_disk(self, name: str, size: int, block_size: int) -> None:
        if name not in self.geometry:
            shift = block_size.bit_length() - 1
            self.geometry[name] = _DiskGeometry((size + block_size - 1) >> shift, shift)

    def _bits(self, seg: _Segment, name: str) -> bytearray:
        bits = seg.bits.get(name)
        if bits is None:
            bits = seg.bits[name] = bytearray(bitmap_len(self.geometry[name].nblocks))
        return bits

    # -- marking -------------------------------------------------------------------

    def mark(self, name: str, offset: int, length: int) -> None:
        """Record a write of ``length`` bytes at ``offset`` (hot path: a few operations)."""
        geo = self.geometry[name]
        set_bits(self._bits(self._segments[-1], name), offset >> geo.shift,
                 ((offset + length - 1) >> geo.shift) + 1)
        self.changed = True

    def mark_blocks(self, name: str, first: int, stop: int) -> None:
        set_bits(self._bits(self._segments[-1], name), first, min(stop, self.geometry[name].nblocks))
        self.changed = True

    def mark_all(self, name: str | None = None) -> None:
        """Every block of ``name`` (of every disk if None): a full sync."""
        for n in [name] if name is not None else list(self.geometry):
            self.mark_blocks(n, 0, self.geometry[n].nblocks)

    def load(self, name: str, bits: bytes | bytearray) -> None:
        """Merge a persisted bitmap into the current segment."""
        or_into(self._bits(self._segments[-1], name), bits)
        self.changed = True

    # -- segments --------------------------------------------------------------------

    def cut(self, seq: int) -> None:
        """Writes after ``seq`` go to a new segment (call with no await after reading ``seq``)."""
        cur = self._segments[-1]
        if cur.start > seq:
            return
        if not cur.bits:
            cur.start = seq + 1
            return
        self._segments.append(_Segment(seq + 1))
        if len(self._segments) > MAX_SEGMENTS:
            # Too many unconfirmed cuts (checkpoints that keep failing): merge the oldest two.
            a, b = self._segments[0], self._segments.pop(1)
            for n, bits in b.bits.items():
                or_into(self._bits(a, n), bits)

    def drop_through(self, seq: int) -> None:
        """A checkpoint at ``seq`` is confirmed: forget segments holding only writes ``<= seq``."""
        while len(self._segments) > 1 and self._segments[1].start - 1 <= seq:
            self._segments.pop(0)
            self.changed = True
        cur = self._segments[0]
        if len(self._segments) == 1 and cur.start <= seq and not cur.bits:
            cur.start = seq + 1

    def union_since(self, seq: int) -> dict[str, bytearray]:
        """Blocks of segments that may hold a write after ``seq`` (or a non-write mark)."""
        out: dict[str, bytearray] = {}
        segs = self._segments
        for i, seg in enumerate(segs):
            end = segs[i + 1].start - 1 if i + 1 < len(segs) else None
            if end is not None and end <= seq:
                continue
            for n, bits in seg.bits.items():
                acc = out.get(n)
                if acc is None:
                    out[n] = bytearray(bits)
                else:
                    or_into(acc, bits)
        return out

    def union(self) -> dict[str, bytearray]:
        return self.union_since(-1)

    def count(self) -> int:
        return sum(count_bits(b) for b in self.union().values())

    @property
    def since(self) -> int:
        """The map holds every block written after this seq (and maybe more)."""
        return self._segments[0].start - 1


# -- the bitmap file ---------------------------------------------------------------


def encode_bitmap(nblocks: int, block_size: int, covered_seq: int, bits: bytes | bytearray) -> bytes:
    head = _MAGIC + f"{nblocks} {block_size} {covered_seq}\n".encode()
    body = head + bytes(bits)
    return body + xxhash.xxh3_64_digest(body)


def decode_bitmap(data: bytes, nblocks: int, block_size: int) -> tuple[int, bytearray] | None:
    """``(covered_seq, bits)``, or None if the file is damaged or for another geometry."""
    if len(data) < len(_MAGIC) + 8 or not data.startswith(_MAGIC):
        return None
    body, digest = data[:-8], data[-8:]
    if xxhash.xxh3_64_digest(body) != digest:
        return None
    line_end = body.find(b"\n", len(_MAGIC))
    if line_end < 0:
        return None
    try:
        n, bs, covered = (int(x) for x in body[len(_MAGIC) : line_end].split())
    except ValueError:
        return None
    bits = bytearray(body[line_end + 1 :])
    if n != nblocks or bs != block_size or len(bits) != bitmap_len(nblocks):
        return None
    return covered, bits


def bitmap_path(disk_dir: str) -> str:
    return os.path.join(disk_dir, BITMAP_FILE)
