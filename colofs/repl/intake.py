"""The secondary's RECEIPTs: which writes a session holds, checked and in order, before it applies them.

A sync write on the primary completes once the secondary *has* it (docs/design.md
invariant 6): received, checked and queued in order to be applied. The
applier checks every frame again before the core sees it, and applies a
group with one ``fdatasync`` of hidden; a receipt does not wait for that.

The session's reader runs frames through :class:`Intake` in stream order, as
it queues them. Intake keeps its own view of the stream (the next seq, the
disk table, whether a resync or the owed full sync is under way), ahead of
the applier's, and answers whether a frame completes a receipt. It is
conservative: it never refuses anything (the applier does, with its precise
error), it only stops receipting at the first frame it cannot vouch for, and
from then on the session is about to end anyway.
"""

from __future__ import annotations

from collections.abc import Mapping

from colofs.core.disk import Disk
from colofs.wire.messages import Batch, DiskAdd, Message, ResyncDone, ResyncQuery


class Intake:
    """One session's view of the stream as it is read; :meth:`take` says what to receipt."""

    def __init__(self, *, next_seq: int, disk_names: list[str], disks: Mapping[str, Disk], synced: bool,
                 max_disks: int) -> None:
        self.next_seq = next_seq
        """The next write the stream must carry for a receipt."""
        self._names = list(disk_names)
        self._sizes = [disks[n].size for n in disk_names]
        self._disks = disks
        self._max_disks = max_disks
        self._synced = synced
        """False until the full sync the VM asked for has ended (no batch is taken before)."""
        self._resyncing = False
        self.stopped: str | None = None
        """Why receipts stopped (a frame the applier will refuse), or None."""

    def take(self, msg: Message) -> int | None:
        """Note ``msg``, read next in the stream; the seq to receipt once it is queued, or None."""
        if self.stopped is not None:
            return None
        if isinstance(msg, Batch):
            return self._batch(msg)
        if isinstance(msg, DiskAdd):
            self._disk_add(msg)
        elif isinstance(msg, ResyncQuery):
            self._resyncing = True
        elif isinstance(msg, ResyncDone):
            # The applier checks S0 against what it holds; the stream goes on after it.
            self._resyncing = False
            self._synced = True
            self.next_seq = msg.seq + 1
        return None

    def _batch(self, batch: Batch) -> int | None:
        if self._resyncing or not self._synced:
            return None  # the applier refuses it (no stream writes during a resync or before the full sync)
        if batch.first_seq != self.next_seq:
            self.stopped = f"BATCH at seq {batch.first_seq}, the next seq is {self.next_seq}"
            return None
        sizes = self._sizes
        for w in batch.writes:
            n = len(w.data)
            if w.disk >= len(sizes) or n == 0 or w.offset + n > sizes[w.disk]:
                self.stopped = f"BATCH from seq {batch.first_seq} has a write that fits no disk"
                return None
        self.next_seq = batch.last_seq + 1
        return batch.last_seq

    def _disk_add(self, msg: DiskAdd) -> None:
        info = msg.disk
        have = self._disks.get(info.name)
        if (msg.index != len(self._names) or info.name in self._names or len(self._names) >= self._max_disks
                or (have is not None and (have.size, have.block_size) != (info.size, info.block_size))):
            self.stopped = f"DISK_ADD of {info.name} at index {msg.index}"
            return
        self._names.append(info.name)
        self._sizes.append(info.size)
