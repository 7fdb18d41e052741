"""The primary's retained writes: every forwarded write the secondary may still need.

A write is needed until the secondary confirmed a checkpoint after it: a
secondary that crashes rolls back to its last checkpoint and must be sent
everything after it again. The log holds writes with consecutive sequence
numbers ``start .. end``; it is trimmed by confirmed checkpoints and, when it
outgrows its bound, dropped in favour of the dirty bitmap
(:mod:`colofs.repl.dirty`).

Only the newest writes stay in the process's memory: past
``resident_limit`` bytes, :meth:`RetainedLog.run_spill` moves the oldest
into an unnamed file (:class:`SpillFile`) in a worker thread, keeping only
where each went. A busy VM between two checkpoints would otherwise hold up
to ``max_backlog_bytes`` (128 MiB) of small ``bytes`` objects, and glibc does
not give such a heap back once they are freed. The oldest writes are the
ones the secondary has mostly acknowledged, read back only when a
reconnection resends them; a checkpoint usually drops them before the kernel
writes the file's pages back, and the file is emptied once nothing in it is
needed.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable

import trio

from colofs.core.forward import ForwardedWrite

log = logging.getLogger("colofs.repl.sender")  # the primary side's logger name, for log filters

RESIDENT_LIMIT = 4 << 20
"""Bytes of retained write data kept in memory; past it the oldest are spilled down to half of it.

Writes not sent yet stay up to twice this while the link lags (8 MiB). It
was 8 MiB: in a worker's peak under a 1 MiB fill (tracemalloc) the log's 16
MiB sat beside the FUSE requests' buffers and a batch being encoded; a
checkpoint every few MiB of 4K writes spills nothing either way."""
RESIDENT_CAP = 2
"""Writers wait while more than this many times ``resident_limit`` is in memory (8 MiB), for the spill.

The spill writes to the page cache, which the kernel slows to the disk's
pace when the disk is busy (a fill of a VM's disk puts base, the spill file
and the secondary's writes on one disk). Without a cap a 1 MiB fill at queue
depth 8 piled up 65 MiB of writes in memory behind one spill of 56 MiB (the
writers' only other bound was ``max_inflight_bytes``, 64 MiB unacknowledged).
Twice the limit is also where writes not sent yet start to be spilled
(:meth:`RetainedLog._pick`), so the cap holds no writer back that the spill
could not relieve at once. ``bench/primary_memory.py``: the primary worker's
peak 116-119 MiB without the cap, 75-78 with four times, 66-67 with twice."""
SPILL_CHUNK = 1
"""A spill writes at most this many times ``resident_limit`` per ``pwritev`` and frees it before the next."""
SPILL_IOV = 512
"""Buffers per ``pwritev`` of a spill (below the kernel's IOV_MAX of 1024)."""

Spilled = tuple[str, int, int, int]
"""A spilled write: ``(disk, offset, length, position in the spill file)``."""


class SpillFile:
    """An unnamed file in a directory of the store: it vanishes with its descriptor, even after a crash."""

    def __init__(self, directory: str) -> None:
        try:
            self.fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError:  # a file system without O_TMPFILE: a named file, unlinked at once
            fd, path = tempfile.mkstemp(prefix=".retained-", dir=directory)
            os.unlink(path)
            self.fd = fd
        self.end = 0
        """Where the next spilled write goes."""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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


def _size(entry: ForwardedWrite | Spilled | None) -> int:
    assert entry is not None
    return entry[2] if isinstance(entry, tuple) else len(entry.data)


class RetainedLog:
    """A FIFO of writes with consecutive seqs, indexable by seq; the oldest may live in a spill file.

    ``nbytes`` is what the log holds, ``resident`` the part of it in memory.
    A dropped write's slot is cleared at once (the list is compacted only now
    and then), so its data is freed when it is dropped, not when the list is
    next compacted.
    """

    __slots__ = ("_back", "_cold", "_gen", "_head", "_items", "_mem", "_room", "_spill", "_spill_dir", "_spilling",
                 "_wanted", "budget", "nbytes", "resident", "resident_limit", "sent", "start")

    def __init__(self, start: int, budget: RetainedBudget | None = None, *, spill_dir: str | None = None,
                 resident_limit: int | None = None) -> None:
        self._items: list[ForwardedWrite | Spilled | None] = []
        self._head = 0
        self.start = start
        """Seq of the oldest retained write (the next one to be appended if empty)."""
        self.nbytes = 0
        self.resident = 0
        """Bytes of write data held in memory (the rest is in the spill file)."""
        self.resident_limit = RESIDENT_LIMIT if resident_limit is None else resident_limit
        self.budget = budget
        self._spill_dir = spill_dir
        self._spill: SpillFile | None = None
        self._mem = start  # seq of the oldest write that may still be in memory
        self._cold = 0  # spilled writes still in the log
        self._gen = 0  # bumped by reset: a spill under way then leaves the new list alone
        self._wanted = trio.Event()
        self._room = trio.Event()  # set (and replaced) whenever resident bytes fall, for writers held back
        self._spilling = False  # run_spill is running: only then do writers wait for it
        self._back: dict[int, tuple[Spilled, ForwardedWrite]] = {}  # read back for the sender: seq -> write
        self.sent = start - 1
        """The newest write sent to the secondary on the current connection (a hint for spilling)."""

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
        n = len(w.data)
        self.nbytes += n
        self.resident += n
        if self.budget is not None:
            self.budget.total += n
        if self.resident > self.resident_limit and self._spill_dir is not None:
            self._wanted.set()

    def mark_sent(self, seq: int) -> None:
        """Writes up to ``seq`` went out on the connection: spilling them costs no read back now."""
        self.sent = seq
        if self.resident > self.resident_limit and self._spill_dir is not None:
            self._wanted.set()

    @property
    def resident_cap(self) -> int:
        """Past this many resident bytes writers wait for the spill (:meth:`wait_resident`)."""
        return RESIDENT_CAP * self.resident_limit

    async def wait_resident(self) -> None:
        """Hold a writer back while the spill task lags: more than :attr:`resident_cap` in memory.

        Only while :meth:`run_spill` runs (it is what frees memory here); a
        log that cannot spill keeps its writes in memory as before.
        """
        while self._spilling and self.resident > self.resident_cap:
            self._wanted.set()
            await self._room.wait()

    def _freed(self) -> None:
        """Resident bytes fell: writers held back by :meth:`wait_resident` look again."""
        self._room.set()
        self._room = trio.Event()

    def covers(self, seq: int) -> bool:
        """Every write from ``seq`` to the newest is here (``seq == end + 1``: nothing missing)."""
        return self.start <= seq <= self.end + 1

    def get(self, seq: int) -> ForwardedWrite:
        """The write ``seq``; a spilled one comes from :meth:`read_back`, or is read here on the loop."""
        w = self._items[self._head + seq - self.start]
        if isinstance(w, tuple):
            back = self._back.pop(seq, None)
            if back is not None and back[0] is w:
                return back[1]
            disk, offset, length, pos = w
            assert self._spill is not None and self._spill.fd >= 0, "a spilled write after the spill file closed"
            data = os.pread(self._spill.fd, length, pos)
            if len(data) != length:
                raise OSError(f"retained log: spill file short at {pos} ({len(data)} of {length} bytes)")
            return ForwardedWrite(seq, disk, offset, data)
        assert w is not None
        return w

    async def read_back(self, first: int, last: int, limit: int) -> None:
        """Read the spilled writes among ``first .. last`` (up to ``limit`` bytes) back in a worker thread.

        The sender calls it before it takes a batch, so that resending
        spilled writes after a reconnection does not read the file on the
        loop; :meth:`get` hands each out once.
        """
        if self._back:
            self._back.clear()  # what the last batch did not take
        spill = self._spill
        if spill is None or not self._cold or first >= self._mem:
            return  # spilled writes all lie below _mem (spills go up from it): none in this range
        items = self._items
        base = self._head - self.start
        wanted: list[tuple[int, Spilled]] = []
        total = 0
        for seq in range(max(first, self.start), min(last, self.end) + 1):
            w = items[base + seq]
            size = _size(w)
            if total and total + size > limit:
                break
            total += size
            if isinstance(w, tuple):
                wanted.append((seq, w))
        if not wanted:
            return
        datas = await trio.to_thread.run_sync(_read_all, spill.fd, [w for _, w in wanted])
        items = self._items
        base = self._head - self.start
        for (seq, w), data in zip(wanted, datas, strict=True):
            i = base + seq
            if self._head <= i < len(items) and items[i] is w and len(data) == w[2]:  # still spilled, whole
                self._back[seq] = (w, ForwardedWrite(seq, w[0], w[1], data))

    def size(self, seq: int) -> int:
        """Bytes of write ``seq`` (never reads the spill file)."""
        return _size(self._items[self._head + seq - self.start])

    def bytes_in(self, lo: int, hi: int) -> int:
        """Bytes of the retained writes ``lo .. hi`` (clipped to the log)."""
        lo = max(lo, self.start)
        hi = min(hi, self.end)
        items = self._items
        base = self._head - self.start
        return sum(_size(items[i]) for i in range(base + lo, base + hi + 1))

    def bytes_after(self, seq: int) -> int:
        """Bytes of the retained writes newer than ``seq``."""
        return self.bytes_in(seq + 1, self.end)

    def drop_through(self, seq: int) -> int:
        """Forget writes ``<= seq``; returns the bytes freed."""
        freed = 0
        items = self._items
        head = self._head
        stop = min(len(items), head + max(0, seq - self.start + 1))
        while head < stop:
            w = items[head]
            if isinstance(w, tuple):
                freed += w[2]
                self._cold -= 1
            else:
                assert w is not None
                n = len(w.data)
                freed += n
                self.resident -= n
            items[head] = None  # the data goes now, whatever the list does later
            head += 1
        self._head = head
        self.start = max(self.start, seq + 1)
        if head == len(items):
            items.clear()
            self._head = 0
        elif self._head > 1024 and self._head * 2 > len(items):
            del items[: self._head]
            self._head = 0
        self.nbytes -= freed
        if self.budget is not None:
            self.budget.total -= freed
        if freed:
            self._freed()
        if not self._cold and self._spill is not None and self._spill.end:
            self._wanted.set()  # the spill file holds nothing needed: it can be emptied
        return freed

    def reset(self, start: int) -> None:
        """Drop everything; the next write appended must have seq ``start``."""
        self._items = []
        self._back.clear()
        self._head = self._cold = 0
        self._gen += 1
        self.start = self._mem = start
        self.sent = start - 1
        if self.budget is not None:
            self.budget.total -= self.nbytes
        self.nbytes = self.resident = 0
        self._freed()
        if self._spill is not None and self._spill.end:
            self._wanted.set()

    # -- spilling (one task per log: run_spill) ------------------------------------------------

    def _pick(self) -> list[ForwardedWrite]:
        """The oldest writes in memory, enough to bring the resident bytes down to half the limit.

        Writes not sent yet are taken only while more than twice the limit
        is resident: each of them would be read back for its batch, so a
        link that lags briefly (a burst of large writes) keeps them.
        """
        items = self._items
        limit = self.resident_limit
        goal = self.resident - limit // 2
        picked: list[ForwardedWrite] = []
        got = 0
        i = self._head + max(0, self._mem - self.start)
        while i < len(items) and got < goal:
            w = items[i]
            if isinstance(w, ForwardedWrite):
                if w.seq > self.sent and self.resident - got <= 2 * limit:
                    break
                picked.append(w)
                got += len(w.data)
            i += 1
        return picked

    async def spill_once(self) -> int:
        """Move the oldest writes in memory to the spill file if over the limit; returns the bytes moved.

        The data is written in a worker thread, ``SPILL_CHUNK`` times the
        limit at a time; each chunk's writes stay in memory until it is done
        (then they are freed, and held-back writers look again), and any the
        log dropped meanwhile stay dropped.
        """
        assert self._spill_dir is not None
        spill = self._spill
        if spill is not None and not self._cold and spill.end:
            await trio.to_thread.run_sync(os.ftruncate, spill.fd, 0)  # nothing in it is needed any more
            spill.end = 0
        if self.resident <= self.resident_limit:
            return 0
        if spill is None:
            spill = self._spill = await trio.to_thread.run_sync(SpillFile, self._spill_dir)
        picked = self._pick()
        moved = 0
        chunk_max = max(1, SPILL_CHUNK * self.resident_limit)
        i = 0
        while i < len(picked):
            chunk: list[ForwardedWrite] = []
            size = 0
            while i < len(picked) and (not chunk or size + len(picked[i].data) <= chunk_max):
                chunk.append(picked[i])
                size += len(picked[i].data)
                i += 1
            done = await self._spill_chunk(spill, chunk)
            if done is None:
                break  # reset meanwhile
            moved += done
        return moved

    async def _spill_chunk(self, spill: SpillFile, picked: list[ForwardedWrite]) -> int | None:
        """Write ``picked`` to the spill file and swap them for where they went; None if reset meanwhile."""
        gen = self._gen
        pos = spill.end
        bufs = [w.data for w in picked]
        spill.end += sum(len(b) for b in bufs)
        await trio.to_thread.run_sync(_write_all, spill.fd, bufs, pos)
        if self._gen != gen:
            return None  # reset meanwhile: what was written is not needed (the file is emptied next)
        items = self._items
        base = self._head - self.start
        moved = 0
        for w in picked:
            n = len(w.data)
            i = base + w.seq
            if self._head <= i < len(items) and items[i] is w:  # not dropped meanwhile
                items[i] = (w.disk, w.offset, n, pos)
                self._cold += 1
                self.resident -= n
                moved += n
            pos += n
        self._mem = max(self._mem, picked[-1].seq + 1)
        if moved:
            self._freed()
        return moved

    async def run_spill(self) -> None:
        """Keep the log's resident bytes within its limit until cancelled; closes the spill file then."""
        if self._spill_dir is None:
            await trio.sleep_forever()
        self._spilling = True
        try:
            while True:
                await self._wanted.wait()
                self._wanted = trio.Event()
                try:
                    moved = await self.spill_once()
                except OSError as e:  # never fail replication over it: keep the writes in memory, as before
                    log.warning("retained writes stay in memory: cannot spill them to %s: %s", self._spill_dir, e)
                    self._spill_dir = None
                    self._spilling = False
                    self._freed()  # writers held back go on: nothing will spill now
                    await trio.sleep_forever()
                if moved and self.resident > self.resident_cap:
                    self._wanted.set()  # writers came in meanwhile and wait: spill again
        finally:
            self._spilling = False
            self._freed()
            if self._spill is not None:
                self._spill.close()


def _read_all(fd: int, spilled: list[Spilled]) -> list[bytes]:
    """Each spilled write's data (short if the file was emptied meanwhile: the caller checks)."""
    return [os.pread(fd, length, pos) for _disk, _offset, length, pos in spilled]


def _write_all(fd: int, bufs: list, pos: int) -> None:
    """``pwritev`` every buffer at ``pos`` onwards, a bounded number at a time, past short writes."""
    views = [memoryview(b).cast("B") for b in bufs]
    i = 0
    while i < len(views):
        chunk = views[i : i + SPILL_IOV]
        n = os.pwritev(fd, chunk, pos)
        pos += n
        for v in chunk:
            if n >= len(v):
                n -= len(v)
                i += 1
            else:
                views[i] = v[n:]
                break
