"""Dirty-block tracking on the primary: which blocks changed since the last confirmed checkpoint.

A secondary that crashes rolls base back to its last checkpoint, so the
primary must be able to bring it forward from there even when it no longer
holds the writes themselves. It keeps the set of blocks written since the
last checkpoint the secondary confirmed (and, for a full sync, every block);
catching up is then a digest comparison of exactly those blocks
(:mod:`colofs.repl.resync`). Each set is a :class:`~colofs.repl.blockset.BlockSet`:
its memory follows the blocks marked, not the disk's size.

The sets are split into *segments* at cut points (a checkpoint marker at
seq ``c``, the start of a resync at ``S0``): a segment records the writes of
a seq interval, so a confirmed checkpoint drops the segments that end at or
before it, and "what changed after ``S0``" is the union of later segments.

Persistently each disk has ``DISK_DIR/repl-dirty.bitmap`` (the union of all
segments, :mod:`colofs.repl.dirtyfile`), written atomically; the VM-level
metadata that says whether it can be trusted lives in ``repl-primary.json``
(:mod:`colofs.repl.persist`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from colofs.core.blocks import block_count, block_span
from colofs.repl.blockset import BlockSet

MAX_SEGMENTS = 32


@dataclass
class _DiskGeometry:
    nblocks: int
    shift: int


@dataclass
class _Segment:
    start: int
    """First sequence number whose writes this segment records."""
    bits: dict[str, BlockSet] = field(default_factory=dict)


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
            self.geometry[name] = _DiskGeometry(block_count(size, shift), shift)

    def _bits(self, seg: _Segment, name: str) -> BlockSet:
        bits = seg.bits.get(name)
        if bits is None:
            bits = seg.bits[name] = BlockSet(self.geometry[name].nblocks)
        return bits

    # -- marking -------------------------------------------------------------------

    def mark(self, name: str, offset: int, length: int) -> None:
        """Record a write of ``length`` bytes at ``offset`` (hot path: a few operations)."""
        geo = self.geometry[name]
        self._bits(self._segments[-1], name).add(*block_span(offset, length, geo.shift))
        self.changed = True

    def mark_blocks(self, name: str, first: int, stop: int) -> None:
        self._bits(self._segments[-1], name).add(first, stop)
        self.changed = True

    def mark_all(self, name: str | None = None) -> None:
        """Every block of ``name`` (of every disk if None): a full sync, one run per disk."""
        for n in [name] if name is not None else list(self.geometry):
            self._bits(self._segments[-1], n).add_all()
        self.changed = True

    def load(self, name: str, bits: BlockSet) -> None:
        """Merge a persisted set into the current segment."""
        self._bits(self._segments[-1], name).update(bits)
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
                self._bits(a, n).update(bits)

    def drop_through(self, seq: int) -> None:
        """A checkpoint at ``seq`` is confirmed: forget segments holding only writes ``<= seq``."""
        while len(self._segments) > 1 and self._segments[1].start - 1 <= seq:
            self._segments.pop(0)
            self.changed = True
        cur = self._segments[0]
        if len(self._segments) == 1 and cur.start <= seq and not cur.bits:
            cur.start = seq + 1

    def union_since(self, seq: int) -> dict[str, BlockSet]:
        """Blocks of segments that may hold a write after ``seq`` (or a non-write mark); a copy."""
        out: dict[str, BlockSet] = {}
        segs = self._segments
        for i, seg in enumerate(segs):
            end = segs[i + 1].start - 1 if i + 1 < len(segs) else None
            if end is not None and end <= seq:
                continue
            for n, bits in seg.bits.items():
                acc = out.get(n)
                if acc is None:
                    out[n] = bits.copy()
                else:
                    acc.update(bits)
        return out

    def union(self) -> dict[str, BlockSet]:
        return self.union_since(-1)

    def count(self) -> int:
        if len(self._segments) == 1:  # the usual case: no copy
            return sum(b.count() for b in self._segments[0].bits.values())
        return sum(b.count() for b in self.union().values())

    def empty(self) -> bool:
        return not any(any(seg.bits.values()) for seg in self._segments)

    @property
    def since(self) -> int:
        """The map holds every block written after this seq (and maybe more)."""
        return self._segments[0].start - 1
