"""A compact block map: block -> file offset (and, for write-once logs, the block's xxh3 digest).

A log's map held as two ``dict[int, int]`` costs about 200 bytes per block
(the dicts' slots plus an int object per key, offset and digest): 50 MiB per
GiB buffered in hidden. Here blocks live in sorted *chunks* of at most
``CHUNK`` entries, each three parallel ``array``s (block, offset, digest: 24
bytes per block), with a plain list of each chunk's first block on top. A
lookup is a ``bisect`` of that list and one of a chunk; an insert or removal
shifts at most one chunk's entries (a ``memmove`` of a few KiB), and a chunk
that grows past ``CHUNK`` is split, so no operation ever copies the whole map.
A run of consecutive new blocks (a sequential write) goes in as one slice.

Offsets are stored relative to the block (``offset - block * unit``, the
unit being the log's block size), so a run of blocks whose data lies
contiguously in the file stores one repeated value. Range questions (is any
block of a span here? do blocks ``first..first+n-1`` sit at consecutive
offsets?) are then answered with bisections and a byte comparison of a
slice, not a Python loop per block: reads ask them for every request.

Blocks recorded as zeros (offset ``ZERO_AT``) carry no digest; a block put
without one in an index that keeps digests is remembered in a set (empty in
practice: format-2 write-once logs give every data block its digest).
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, KeysView, Mapping, Sequence
from itertools import chain

from colofs.core.logformat import ZERO_AT

__all__ = ["CHUNK", "BlockIndex", "DigestView"]

CHUNK = 256  # most entries in one chunk; a fuller one is split in halves
ZERO_MARK = -(1 << 63)  # the stored value of a block recorded as zeros (ZERO_AT)


class _Keys(KeysView):
    """``keys()`` of a :class:`BlockIndex`: ``isdisjoint`` with a ``range`` is a bisection, not a loop."""

    _mapping: BlockIndex

    def isdisjoint(self, other: Iterable[object]) -> bool:
        if isinstance(other, range) and other.step == 1:
            return not self._mapping.any_in(other.start, other.stop)
        return super().isdisjoint(other)


class BlockIndex:
    """Block -> file offset, dict-like (``get``, ``in``, ``len``, ``[]``, ``pop``, iteration in block order).

    ``digests`` (an index made with ``keep_digests``) is the block -> digest
    side of the same entries, for :meth:`BlockLog.verify`.
    """

    __slots__ = ("_firsts", "_keys", "_len", "_offs", "_sums", "_undigested", "digests", "unit")

    def __init__(self, keep_digests: bool = False, unit: int = 1) -> None:
        self.unit = unit  # offsets are kept as offset - block * unit
        self._firsts: list[int] = []  # the first block of each chunk
        self._keys: list[array] = []
        self._offs: list[array] = []
        self._sums: list[array] | None = [] if keep_digests else None
        self._undigested: set[int] = set()  # blocks with no digest (other than zeros) in a digest-keeping index
        self._len = 0
        self.digests: DigestView | None = DigestView(self) if keep_digests else None

    # -- queries ------------------------------------------------------------

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def _locate(self, block: int) -> tuple[int, int]:
        """``(chunk, position)`` where ``block`` is or would be inserted; chunk -1 if the index is empty."""
        c = bisect_right(self._firsts, block) - 1
        if c < 0:
            return (0, 0) if self._firsts else (-1, 0)
        return c, bisect_left(self._keys[c], block)

    def get(self, block: int, default: int | None = None) -> int | None:
        c = bisect_right(self._firsts, block) - 1
        if c < 0:
            return default
        keys = self._keys[c]
        i = bisect_left(keys, block)
        if i < len(keys) and keys[i] == block:
            v = self._offs[c][i]
            return ZERO_AT if v == ZERO_MARK else v + block * self.unit
        return default

    def _stored(self, block: int, offset: int) -> int:
        return ZERO_MARK if offset == ZERO_AT else offset - block * self.unit

    def __getitem__(self, block: int) -> int:
        v = self.get(block)
        if v is None:
            raise KeyError(block)
        return v

    def __contains__(self, block: object) -> bool:
        c = bisect_right(self._firsts, block) - 1  # type: ignore[call-overload]
        if c < 0:
            return False
        keys = self._keys[c]
        i = bisect_left(keys, block)  # type: ignore[call-overload]
        return i < len(keys) and keys[i] == block

    def absent(self, blocks: Sequence[int]) -> list[int]:
        """Those of ``blocks`` not here; a sorted run of consecutive blocks none of which is here costs two bisections."""
        n = len(blocks)
        if n > 1 and blocks[-1] - blocks[0] == n - 1 and not self.any_in(blocks[0], blocks[-1] + 1):
            if isinstance(blocks, range) or array("Q", blocks) == array("Q", range(blocks[0], blocks[0] + n)):
                return list(blocks)
        return [b for b in blocks if b not in self]

    def __iter__(self) -> Iterator[int]:
        """Blocks in ascending order (of the index as it is now: later changes do not disturb it)."""
        return chain.from_iterable([k[:] for k in self._keys])

    def keys(self) -> _Keys:
        return _Keys(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (BlockIndex, Mapping)):
            return len(self) == len(other) and dict(self.items()) == dict(other.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, like a dict

    def items(self) -> Iterator[tuple[int, int]]:
        unit = self.unit
        return iter([(b, ZERO_AT if v == ZERO_MARK else v + b * unit)
                     for b, v in zip(self, chain.from_iterable(self._offs), strict=True)])

    def values(self) -> Iterator[int]:
        return iter([v for _, v in self.items()])

    def any_in(self, lo: int, hi: int) -> bool:
        """Whether some block of ``[lo, hi)`` is here."""
        firsts = self._firsts
        c = bisect_right(firsts, lo) - 1
        if c < 0:  # below the first chunk (or none)
            return bool(firsts) and firsts[0] < hi
        keys = self._keys[c]
        i = bisect_left(keys, lo)
        if i < len(keys):
            return keys[i] < hi
        return c + 1 < len(firsts) and firsts[c + 1] < hi

    def _span(self, first: int, n: int) -> list[tuple[int, int, int]] | None:
        """The pieces ``(chunk, i, j)`` holding blocks ``first .. first+n-1`` if all are here, else None."""
        if n <= 0 or not self._len:
            return None
        c, i = self._locate(first)
        all_keys = self._keys
        pieces = []
        b, left = first, n
        while True:
            keys = all_keys[c]
            if i >= len(keys) or keys[i] != b:
                return None
            j = min(len(keys), i + left)
            if keys[j - 1] != b + (j - i) - 1:  # sorted and unique: a gap shows at the end of the slice
                return None
            pieces.append((c, i, j))
            left -= j - i
            if not left:
                return pieces
            b += j - i
            c += 1
            i = 0
            if c >= len(all_keys):
                return None

    def run_at(self, first: int, n: int, step: int) -> int | None:
        """The offset of ``first`` if blocks ``first .. first+n-1`` are all here at offsets ``step`` apart; else None."""
        if n == 1:
            start = self.get(first)
            return None if start is None or start < 0 else start
        pieces = self._span(first, n)
        if pieces is None:
            return None
        c, i, _ = pieces[0]
        rel = self._offs[c][i]
        if rel == ZERO_MARK:
            return None
        start = rel + first * self.unit
        if step != self.unit:  # not the layout logs have: block by block
            return start if all(self.get(first + k) == start + k * step for k in range(n)) else None
        pattern = rel.to_bytes(8, "little", signed=True)  # contiguous data: the same relative offset throughout
        for c, i, j in pieces:
            if self._offs[c][i:j].tobytes() != pattern * (j - i):
                return None
        return start

    # -- updates ------------------------------------------------------------

    def put(self, block: int, offset: int, digest: int | None = None) -> None:
        """Map ``block`` to ``offset`` (and its digest, if this index keeps them)."""
        c, i = self._locate(block)
        sums = self._sums
        rel = self._stored(block, offset)
        if sums is not None:
            if digest is None and offset != ZERO_AT:
                self._undigested.add(block)
            elif self._undigested:
                self._undigested.discard(block)
        if c < 0:
            self._firsts.append(block)
            self._keys.append(array("Q", [block]))
            self._offs.append(array("q", [rel]))
            if sums is not None:
                sums.append(array("Q", [digest or 0]))
            self._len = 1
            return
        keys = self._keys[c]
        if i < len(keys) and keys[i] == block:
            self._offs[c][i] = rel
            if sums is not None:
                sums[c][i] = digest or 0
            return
        keys.insert(i, block)
        self._offs[c].insert(i, rel)
        if sums is not None:
            sums[c].insert(i, digest or 0)
        self._len += 1
        if i == 0:
            self._firsts[c] = block
        if len(keys) > CHUNK:
            self._split(c)

    def put_many(self, blocks: Sequence[int], offsets: Iterable[int], digests: Sequence[int] | None = None) -> None:
        """``put`` for each block; a run of consecutive blocks none of which is here goes in as one slice."""
        n = len(blocks)
        if not n:
            return
        if n > 1 and not isinstance(blocks, range) and blocks[-1] - blocks[0] == n - 1:
            run = range(blocks[0], blocks[0] + n)
            if array("Q", blocks) == array("Q", run):  # a sorted list of consecutive blocks (a copy-before-write run)
                blocks = run
        if isinstance(blocks, range) and blocks.step == 1 and n > 1 and not self.any_in(blocks.start, blocks.stop):
            self._insert_run(blocks, offsets, digests)
            return
        if digests:
            for b, o, s in zip(blocks, offsets, digests, strict=True):
                self.put(b, o, s)
        else:
            for b, o in zip(blocks, offsets, strict=True):
                self.put(b, o)

    def _insert_run(self, blocks: range, offsets: Iterable[int], digests: Sequence[int] | None) -> None:
        """Insert consecutive blocks none of which is here: one slice assignment, then splits."""
        ks = array("Q", blocks)
        unit = self.unit
        if isinstance(offsets, range) and offsets.step == unit and len(offsets) == len(ks):
            os_ = array("q", [offsets.start - blocks.start * unit]) * len(ks)  # contiguous: one relative offset
            zeros = False
        else:
            offs = list(offsets)
            os_ = array("q", [ZERO_MARK if o == ZERO_AT else o - b * unit for b, o in zip(blocks, offs, strict=True)])
            zeros = ZERO_AT in offs
        sums = self._sums
        if sums is not None and not digests:
            self._undigested.update(blocks if not zeros else
                                    (b for b, o in zip(blocks, os_, strict=True) if o != ZERO_MARK))
        ss = array("Q", digests) if digests else array("Q", bytes(8 * len(ks)))
        c, i = self._locate(blocks.start)
        if c < 0:
            self._firsts.append(blocks.start)
            self._keys.append(ks)
            self._offs.append(os_)
            if sums is not None:
                sums.append(ss)
            c = 0
        else:
            self._keys[c][i:i] = ks
            self._offs[c][i:i] = os_
            if sums is not None:
                sums[c][i:i] = ss
            if i == 0:
                self._firsts[c] = blocks.start
        self._len += len(ks)
        if len(self._keys[c]) > CHUNK:
            self._split(c)

    def _split(self, c: int) -> None:
        """Cut chunk ``c`` into chunks of ``CHUNK // 2`` entries (the last may hold up to ``CHUNK``)."""
        half = CHUNK // 2
        keys, offs = self._keys[c], self._offs[c]
        sums = self._sums[c] if self._sums is not None else None
        n = len(keys)
        cuts = list(range(0, n - half, half)) if n > CHUNK else [0]
        pieces = list(zip(cuts, [*cuts[1:], n], strict=True))
        self._keys[c:c + 1] = [keys[a:b] for a, b in pieces]
        self._offs[c:c + 1] = [offs[a:b] for a, b in pieces]
        if sums is not None:
            self._sums[c:c + 1] = [sums[a:b] for a, b in pieces]  # type: ignore[index]
        self._firsts[c:c + 1] = [keys[a] for a in cuts]

    def pop(self, block: int, default: int | None = None) -> int | None:
        if not self._len:
            return default
        c, i = self._locate(block)
        keys = self._keys[c]
        if i >= len(keys) or keys[i] != block:
            return default
        v = self._offs[c][i]
        v = ZERO_AT if v == ZERO_MARK else v + block * self.unit
        del keys[i]
        del self._offs[c][i]
        if self._sums is not None:
            del self._sums[c][i]
            if self._undigested:
                self._undigested.discard(block)
        self._len -= 1
        if not keys:
            del self._keys[c], self._offs[c], self._firsts[c]
            if self._sums is not None:
                del self._sums[c]
        elif i == 0:
            self._firsts[c] = keys[0]
        return v

    def __delitem__(self, block: int) -> None:
        if self.pop(block) is None:
            raise KeyError(block)

    def clear(self) -> None:
        self._firsts = []
        self._keys = []
        self._offs = []
        if self._sums is not None:
            self._sums = []
        self._undigested = set()
        self._len = 0

    def keep_digests(self, keep: bool) -> None:
        """Keep digests or not from now on (a log found to be format 1, or started over as format 2)."""
        if keep == (self._sums is not None):
            return
        if keep:
            self._sums = [array("Q", bytes(8 * len(k))) for k in self._keys]
            self._undigested = {b for b, o in self.items() if o != ZERO_AT}
            self.digests = DigestView(self)
        else:
            self._sums = None
            self._undigested = set()
            self.digests = None

    def nbytes(self) -> int:
        """Bytes held by the chunks' arrays: what the index costs beyond a small constant per chunk."""
        groups = [self._keys, self._offs, *([self._sums] if self._sums is not None else [])]
        return sum(a.buffer_info()[1] * a.itemsize for g in groups for a in g)


class DigestView:
    """The block -> digest side of a :class:`BlockIndex` (blocks with a digest only), read-only."""

    __slots__ = ("_ix",)

    def __init__(self, index: BlockIndex) -> None:
        self._ix = index

    def get(self, block: int, default: int | None = None) -> int | None:
        ix = self._ix
        c = bisect_right(ix._firsts, block) - 1
        if c < 0:
            return default
        keys = ix._keys[c]
        i = bisect_left(keys, block)
        if i < len(keys) and keys[i] == block and ix._offs[c][i] != ZERO_MARK and block not in ix._undigested:
            return ix._sums[c][i]  # type: ignore[index]
        return default

    def run(self, first: int, n: int) -> list[int | None]:
        """The digests of blocks ``first .. first+n-1`` (None where a block has none), sliced in C where it can."""
        ix = self._ix
        if not ix._undigested or ix._undigested.isdisjoint(range(first, first + n)):
            pieces = ix._span(first, n)
            if pieces is not None and not any(ZERO_MARK in ix._offs[c][i:j] for c, i, j in pieces):
                sums = ix._sums
                assert sums is not None
                return list(chain.from_iterable(sums[c][i:j] for c, i, j in pieces))
        return list(map(self.get, range(first, first + n)))

    def __bool__(self) -> bool:
        ix = self._ix
        return ix._len > len(ix._undigested)

    def __contains__(self, block: object) -> bool:
        return isinstance(block, int) and self.get(block) is not None

    def __iter__(self) -> Iterator[int]:
        und = self._ix._undigested
        return iter([b for b, o in self._ix.items() if o != ZERO_AT and b not in und])

    def __len__(self) -> int:
        return sum(1 for _ in self)


Mapping.register(BlockIndex)  # reads like a dict wherever one is expected
