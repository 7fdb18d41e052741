"""A set of block numbers whose memory follows what was marked, not the disk's size.

The primary tracks the dirty blocks of every disk it replicates. A flat
bitmap costs 32 MiB per TiB of 4 KiB blocks from the first mark on, and a
host serves many large, mostly idle disks. :class:`BlockSet` keeps two
levels instead:

* *whole chunks* (``CHUNK`` consecutive blocks, all marked) as a sorted list
  of chunk runs: a full sync of a 1 TiB disk is one run;
* *touched chunks* as a dict ``chunk -> bit mask`` of their marked blocks
  (a Python int, CHUNK bits at most). A chunk whose mask fills up moves to
  the runs.

So a set costs a few hundred bytes per chunk a write touched, plus a few
bytes per run of whole chunks; an empty set costs nothing per block.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections.abc import Iterator

CHUNK_SHIFT = 8
CHUNK = 1 << CHUNK_SHIFT
"""Blocks per chunk (1 MiB of 4 KiB blocks)."""
_LOW = CHUNK - 1
_FULL = (1 << CHUNK) - 1
_NONZERO = re.compile(rb"[^\x00]+")


def mask_runs(mask: int, base: int) -> Iterator[tuple[int, int]]:
    """``(first, stop)`` runs of set bits of ``mask``, numbered from ``base``."""
    pos = base
    while mask:
        low = (mask & -mask).bit_length() - 1  # clear bits below the next run
        mask >>= low
        pos += low
        ones = (~mask & (mask + 1)).bit_length() - 1  # length of that run
        yield pos, pos + ones
        mask >>= ones
        pos += ones


class BlockSet:
    """Block numbers ``0 .. nblocks-1``, some of them marked (see the module docstring)."""

    __slots__ = ("_last", "_last_whole", "_parts", "_runs", "nblocks")

    def __init__(self, nblocks: int) -> None:
        self.nblocks = nblocks
        self._last = (nblocks - 1) >> CHUNK_SHIFT
        self._last_whole = (1 << (nblocks - (self._last << CHUNK_SHIFT))) - 1
        self._runs: list[int] = []
        """Boundaries ``[start0, stop0, start1, stop1, ...]`` of whole-chunk runs: sorted, never touching."""
        self._parts: dict[int, int] = {}
        """Chunk -> mask of its marked blocks: never 0, never whole, never inside a run."""

    # -- geometry ---------------------------------------------------------------------

    def _whole(self, chunk: int) -> int:
        """The mask of every block of ``chunk`` (the last chunk may be short)."""
        return _FULL if chunk < self._last else self._last_whole

    @property
    def nchunks(self) -> int:
        return (self.nblocks + _LOW) >> CHUNK_SHIFT

    def _in_run(self, chunk: int) -> bool:
        return bool(self._runs) and bisect_right(self._runs, chunk) & 1 == 1

    # -- marking ----------------------------------------------------------------------

    def add(self, first: int, stop: int) -> None:
        """Mark blocks ``first .. stop-1`` (clipped to the set's blocks)."""
        if first < 0:
            first = 0
        if stop > self.nblocks:
            stop = self.nblocks
        if first >= stop:
            return
        c_lo = first >> CHUNK_SHIFT
        c_hi = (stop - 1) >> CHUNK_SHIFT
        if c_lo == c_hi:  # the hot path: a write inside one chunk
            mask = ((1 << (stop - first)) - 1) << (first & _LOW)
            have = self._parts.get(c_lo)
            if have is not None:
                have |= mask
                if have != (_FULL if c_lo < self._last else self._last_whole):
                    self._parts[c_lo] = have
                    return
            self._or(c_lo, mask)
            return
        run_lo = c_lo
        if first & _LOW:
            self._or(c_lo, (_FULL << (first & _LOW)) & _FULL)
            run_lo += 1
        run_hi = c_hi + 1
        if stop & _LOW and stop != self.nblocks:
            self._or(c_hi, (1 << (stop & _LOW)) - 1)
            run_hi = c_hi
        if run_lo < run_hi:
            self._add_run(run_lo, run_hi)

    def add_all(self) -> None:
        """Mark every block: one run, whatever the size."""
        self._parts.clear()
        self._runs = [0, self.nchunks] if self.nblocks else []

    def _or(self, chunk: int, mask: int) -> None:
        parts = self._parts
        have = parts.get(chunk)
        if have is None:
            if self._runs and self._in_run(chunk):
                return
            have = mask
        else:
            if have | mask == have:  # a block written again: nothing changes
                return
            have |= mask
        if have == (_FULL if chunk < self._last else self._last_whole):
            parts.pop(chunk, None)
            self._add_run(chunk, chunk + 1)
        else:
            parts[chunk] = have

    def _add_run(self, lo: int, hi: int) -> None:
        """Chunks ``lo .. hi-1`` become whole, merged with the runs they touch."""
        parts = self._parts
        if parts:
            if hi - lo <= len(parts):
                for c in range(lo, hi):
                    parts.pop(c, None)
            else:
                for c in [c for c in parts if lo <= c < hi]:
                    del parts[c]
        runs = self._runs
        i = bisect_left(runs, lo)
        j = bisect_right(runs, hi)
        new = []
        if i & 1 == 0:
            new.append(lo)
        if j & 1 == 0:
            new.append(hi)
        runs[i:j] = new

    def update(self, other: BlockSet) -> None:
        """``self |= other`` (same geometry)."""
        r = other._runs
        for k in range(0, len(r), 2):
            self._add_run(r[k], r[k + 1])
        for chunk, mask in other._parts.items():
            self._or(chunk, mask)

    def copy(self) -> BlockSet:
        out = BlockSet(self.nblocks)
        out._runs = list(self._runs)
        out._parts = dict(self._parts)
        return out

    # -- reading ----------------------------------------------------------------------

    def __bool__(self) -> bool:
        return bool(self._runs or self._parts)

    def count(self) -> int:
        """How many blocks are marked."""
        n = 0
        r = self._runs
        for k in range(0, len(r), 2):
            n += min(r[k + 1] << CHUNK_SHIFT, self.nblocks) - (r[k] << CHUNK_SHIFT)
        return n + sum(m.bit_count() for m in self._parts.values())

    def __contains__(self, block: int) -> bool:
        if not 0 <= block < self.nblocks:
            return False
        chunk = block >> CHUNK_SHIFT
        mask = self._parts.get(chunk)
        if mask is not None:
            return bool(mask >> (block & _LOW) & 1)
        return self._in_run(chunk)

    def runs(self) -> Iterator[tuple[int, int]]:
        """Maximal ``(first, stop)`` runs of marked blocks, in order."""
        pieces = self._pieces()
        cur_lo = cur_hi = -1
        for lo, hi in pieces:
            if lo == cur_hi:
                cur_hi = hi
                continue
            if cur_hi >= 0:
                yield cur_lo, cur_hi
            cur_lo, cur_hi = lo, hi
        if cur_hi >= 0:
            yield cur_lo, cur_hi

    def _pieces(self) -> Iterator[tuple[int, int]]:
        """Runs in order, not necessarily merged: whole-chunk runs and each touched chunk's runs."""
        r = self._runs
        parts = self._parts
        keys = sorted(parts)
        k = 0
        for i in range(0, len(r), 2):
            while k < len(keys) and keys[k] < r[i]:
                c = keys[k]
                yield from mask_runs(parts[c], c << CHUNK_SHIFT)
                k += 1
            yield r[i] << CHUNK_SHIFT, min(r[i + 1] << CHUNK_SHIFT, self.nblocks)
        for c in keys[k:]:
            yield from mask_runs(parts[c], c << CHUNK_SHIFT)

    def chunk_runs(self) -> list[tuple[int, int]]:
        """The whole-chunk runs as ``(first_chunk, stop_chunk)`` (for the file format)."""
        r = self._runs
        return [(r[k], r[k + 1]) for k in range(0, len(r), 2)]

    def parts(self) -> list[tuple[int, int]]:
        """The touched chunks as sorted ``(chunk, mask)`` (for the file format)."""
        return sorted(self._parts.items())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockSet):
            return NotImplemented
        return self.nblocks == other.nblocks and self._runs == other._runs and self._parts == other._parts

    def __repr__(self) -> str:
        return f"BlockSet({self.nblocks} blocks, {self.count()} marked)"

    # -- from a flat bitmap -------------------------------------------------------------

    @classmethod
    def from_bitmap(cls, bits: bytes | bytearray, nblocks: int) -> BlockSet:
        """The set a flat bitmap (bit ``b & 7`` of byte ``b >> 3`` is block ``b``) describes."""
        out = cls(nblocks)
        step = CHUNK >> 3
        whole = b"\xff" * step
        seen = -1
        for m in _NONZERO.finditer(bits):
            for chunk in range(max(m.start() // step, seen + 1), min((m.end() - 1) // step + 1, out.nchunks)):
                seen = chunk
                piece = bits[chunk * step : (chunk + 1) * step]
                if piece == whole:
                    out._or(chunk, out._whole(chunk))
                else:
                    mask = int.from_bytes(piece, "little") & out._whole(chunk)
                    if mask:
                        out._or(chunk, mask)
        return out


__all__ = ["CHUNK", "CHUNK_SHIFT", "BlockSet", "mask_runs"]
