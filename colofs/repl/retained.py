"""The primary's retained writes: every forwarded write the secondary may still need.

A write is needed until the secondary confirmed a checkpoint after it: a
secondary that crashes rolls back to its last checkpoint and must be sent
everything after it again. The log holds writes with consecutive sequence
numbers ``start .. end``; it is trimmed by confirmed checkpoints and, when it
outgrows its bound, dropped in favour of the dirty bitmap
(:mod:`colofs.repl.dirty`).
"""

from __future__ import annotations

from colofs.core.forward import ForwardedWrite


class RetainedLog:
    """A FIFO of writes with consecutive seqs, indexable by seq.

    ``nbytes`` is what the log holds: a dropped write's slot is cleared at
    once (the list is compacted only now and then), so its data is freed
    when it is dropped, not when the list is next compacted.
    """

    __slots__ = ("_head", "_items", "nbytes", "start")

    def __init__(self, start: int) -> None:
        self._items: list[ForwardedWrite | None] = []
        self._head = 0
        self.start = start
        """Seq of the oldest retained write (the next one to be appended if empty)."""
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items) - self._head

    @property
    def end(self) -> int:
        """Seq of the newest retained write (``start - 1`` if empty)."""
        return self.start + len(self) - 1

    def append(self, w: ForwardedWrite) -> None:
        if w.seq != self.end + 1:
            raise ValueError(f"retained log: write seq {w.seq} does not follow {self.end}")
        self._items.append(w)
        self.nbytes += len(w.data)

    def covers(self, seq: int) -> bool:
        """Every write from ``seq`` to the newest is here (``seq == end + 1``: nothing missing)."""
        return self.start <= seq <= self.end + 1

    def get(self, seq: int) -> ForwardedWrite:
        w = self._items[self._head + seq - self.start]
        assert w is not None
        return w

    def bytes_after(self, seq: int) -> int:
        """Bytes of the retained writes newer than ``seq``."""
        total = 0
        lo = max(seq + 1, self.start)
        for i in range(self._head + lo - self.start, len(self._items)):
            w = self._items[i]
            assert w is not None
            total += len(w.data)
        return total

    def drop_through(self, seq: int) -> int:
        """Forget writes ``<= seq``; returns the bytes freed."""
        freed = 0
        items = self._items
        head = self._head
        stop = min(len(items), head + max(0, seq - self.start + 1))
        while head < stop:
            w = items[head]
            assert w is not None
            freed += len(w.data)
            items[head] = None  # the data goes now, whatever the list does later
            head += 1
        self._head = head
        if head == len(items):
            self.start = max(self.start, seq + 1)
            items.clear()
            self._head = 0
        else:
            self.start = max(self.start, seq + 1)
            if self._head > 1024 and self._head * 2 > len(items):
                del items[: self._head]
                self._head = 0
        self.nbytes -= freed
        return freed

    def reset(self, start: int) -> None:
        """Drop everything; the next write appended must have seq ``start``."""
        self._items = []
        self._head = 0
        self.start = start
        self.nbytes = 0
