"""The reference model of docs/design.md, made of plain bytearrays and dicts.

It is deliberately naive (whole blocks copied, no files) so that it can be
trusted by reading it next to docs/design.md.
"""

from __future__ import annotations


class ModelDisk:
    def __init__(self, size: int, block_size: int) -> None:
        self.size = size
        self.bs = block_size
        self.B = bytearray(size)  # base
        self.H: dict[int, bytes] = {}  # hidden: block -> old base content
        self.A: dict[int, bytes] = {}  # active: block -> SVM data
        self.P = bytearray(size)  # the primary's disk

    def _base_block(self, b: int) -> bytes:
        blk = bytes(self.B[b * self.bs : (b + 1) * self.bs])
        return blk + bytes(self.bs - len(blk))

    def view_block(self, b: int) -> bytes:
        if b in self.A:
            return self.A[b]
        if b in self.H:
            return self.H[b]
        return self._base_block(b)

    def view(self) -> bytes:
        nblocks = (self.size + self.bs - 1) // self.bs
        return b"".join(self.view_block(b) for b in range(nblocks))[: self.size]

    def read(self, off: int, n: int) -> bytes:
        return self.view()[off : off + n]

    def _blocks(self, off: int, n: int) -> range:
        return range(off // self.bs, (off + n - 1) // self.bs + 1)

    def primary_write(self, off: int, data: bytes) -> None:
        """Invariant 1: save the old base block into H on first touch, then overwrite base."""
        for b in self._blocks(off, len(data)):
            if b not in self.H:
                self.H[b] = self._base_block(b)
        self.B[off : off + len(data)] = data
        self.P[off : off + len(data)] = data

    def svm_write(self, off: int, data: bytes) -> None:
        """Invariant 2: SVM writes go to A only, partial blocks read-modify-write V."""
        for b in self._blocks(off, len(data)):
            blk = bytearray(self.view_block(b))
            lo = max(off, b * self.bs)
            hi = min(off + len(data), (b + 1) * self.bs)
            blk[lo - b * self.bs : hi - b * self.bs] = data[lo - off : hi - off]
            self.A[b] = bytes(blk)

    def plain_write(self, off: int, data: bytes) -> None:
        """A write on a primary (or after failover): base and the primary image."""
        self.B[off : off + len(data)] = data
        self.P[off : off + len(data)] = data

    def checkpoint(self) -> None:
        """Invariant 3."""
        self.H.clear()
        self.A.clear()

    def failover(self) -> None:
        """Invariant 4: B := V for buffered blocks, then the buffers are empty."""
        v = self.view()
        self.B[:] = v
        self.P[:] = v
        self.H.clear()
        self.A.clear()

    def checkpoint_image(self) -> bytes:
        """Base as of the last checkpoint: base with the undo log applied (what a snapshot on a secondary holds)."""
        img = bytearray(self.B)
        for b, old in self.H.items():
            start = b * self.bs
            img[start : start + self.bs] = old[: max(0, min(self.bs, self.size - start))]
        return bytes(img)

    def crash(self) -> None:
        """Invariant 5: roll base back with the undo log, drop active."""
        for b, old in self.H.items():
            start = b * self.bs
            self.B[start : start + self.bs] = old[: max(0, min(self.bs, self.size - start))]
        self.H.clear()
        self.A.clear()
