"""The primary's retained writes: every forwarded write the secondary may still need.

A write is needed until the secondary confirmed a checkpoint after it: a
secondary that crashes rolls back to its last checkpoint and must be sent
everything after it again. The log holds writes with consecutive sequence
numbers ``start .. end``; it is trimmed by confirmed checkpoints and, when it
outgrows its bound, dropped in favour of the dirty bitmap
(:mod:`colofs.repl.dirty`).
"""

from __future__ import annotations

from collections.abc import Callable

from colofs.core.forward import ForwardedWrite


class RetainedBudget:
    """What all VMs of one primary retain, bounded together: the host's memory, not one VM's.

    Each VM's log is also bounded on its own (``max_backlog_bytes``), but a
    host with many VMs would multiply that. Past ``limit`` the VMs holding
    the most give up their acknowledged writes first (only those: the
    unacknowledged ones are what the stream still needs), as a VM over its
    own bound does.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self._members: dict[int, tuple[RetainedLog, Callable[[], int]]] = {}

    def join(self, log: RetainedLog, shed: Callable[[], int]) -> None:
        """``shed`` drops the member's acknowledged writes and returns the bytes freed."""
        self._members[id(log)] = (log, shed)

    def leave(self, log: RetainedLog) -> None:
        self._members.pop(id(log), None)
        self.total -= log.nbytes
        log.budget = None

    def relieve(self) -> int:
        """Shed acknowledged writes, largest holders first, until within the limit; returns bytes freed."""
        freed = 0
        for _log, shed in sorted(self._members.values(), key=lambda m: m[0].nbytes, reverse=True):
            if self.total <= self.limit:
                break
            freed += shed()
        return freed


class RetainedLog:
    """A FIFO of writes with consecutive seqs, indexable by seq.

    ``nbytes`` is what the log holds: a dropped write's slot is cleared at
    once (the list is compacted only now and then), so its data is freed
    when it is dropped, not when the list is next compacted.
    """

    __slots__ = ("_head", "_items", "budget", "nbytes", "start")

    def __init__(self, start: int, budget: RetainedBudget | None = None) -> None:
        self._items: list[ForwardedWrite | None] = []
        self._head = 0
        self.start = start
        """Seq of the oldest retained write (the next one to be appended if empty)."""
        self.nbytes = 0
        self.budget = budget

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
        if self.budget is not None:
            self.budget.total += len(w.data)

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
        if self.budget is not None:
            self.budget.total -= freed
        return freed

    def reset(self, start: int) -> None:
        """Drop everything; the next write appended must have seq ``start``."""
        self._items = []
        self._head = 0
        self.start = start
        if self.budget is not None:
            self.budget.total -= self.nbytes
        self.nbytes = 0
