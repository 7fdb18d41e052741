"""Persistent block maps: the one on-disk structure behind hidden, active and snapshot layers.

It runs past 450 lines because appending (data and zero records), the commit record and
emptying share one file's invariants (what is synced, what is acknowledged) and are easier
to check side by side.

A log file (format 2, see ``colofs.core.logformat``; replayed at open by
``colofs.core.logreplay``) starts with a *file header* block, followed by a
sequence of *segments*, each a header followed by the data of the blocks it
adds. A segment header (padded to whole blocks, so data stays block aligned)
holds the generation, the records ``(block, xxh3 of the block's data)`` (a
DROP record sets the top bit of the block number) and an xxh3 digest over
the header and records. Appending a batch of blocks is therefore one
``pwritev`` and one ``fdatasync``; a contiguous run of new blocks lands in
contiguous file space, so it is later read back with one ``preadv``. Every
block of a write-once log keeps its digest in memory, and it is checked
each time the block is read back (for the VM, a snapshot, a rollback).

Records carry the VM's generation: emptying a layer at a checkpoint is an
atomic bump of the generation in the VM's state file (all disks at once),
after which older segments are ignored and the file is truncated at leisure.

**Telling damage from a torn tail.** The file header holds two *commit
slots* (in separate sectors, written alternately, each with its own digest);
the newer valid one names the length of the log known to be completely
written and synced. :func:`make_durable` writes it right after a group's
``fdatasync`` returns and *before* the caller touches base. Hence:

* a segment below the committed length was complete when some base write
  may have relied on it: if it fails its digest, or the file is shorter,
  that is damage, never a torn tail;
* a segment past the committed length was never acknowledged, so no base
  block depends on it: it is the batch in flight when the process died, and
  is dropped.

The slot costs one small ``pwrite`` per group and no ``fsync`` of its own:
a process crash (``kill -9``, the daemon dying) keeps every completed write
in the page cache, so the slot written before base is always seen; against
a power loss the slot becomes durable with the next group's ``fdatasync`` of
the same file (or the checkpoint or clean close), and base writes of the
last group are not durable before the checkpoint's sync either. Only damage
to that last, just-synced group *and* a power loss in the same instant go
undetected (then treated as before: dropped as a torn tail).

**Telling a fresh log from a lost one.** Every log file gets its file header
(both slots zero) the moment it is created -- a new disk, a snapshot, the
fresh file a checkpoint renames over the old one (written before the
rename, so a crash leaves either the old file or a whole new one, plus at
most a stray ``.new`` that is removed at open) -- and emptying a log in
place rewrites the header before cutting the file to it, never passing
through zero bytes. A VM whose state says ``log_headers`` (all VMs created,
or opened once, by a colofs that does this) has no legitimately empty or
missing log: a log that is either has lost content that may have been
acknowledged, and is damage, like one cut short.

Logs of format 1 (no file header, records ``(block, kind)``,
one data digest per segment) are still read: they have no commit slots and
no per-block digests, and are told apart by the old rules until the next
checkpoint replaces them with a format-2 file.
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Callable, Iterable, Sequence

import xxhash

from colofs.core.blockindex import BlockIndex, DigestView
from colofs.core.errors import BlockDamaged, DiskIOError, MapMissing
from colofs.core.fileio import Buffer, write_all
from colofs.core.logformat import (
    DROP,
    DROP_BIT,
    F_BLOCK_DIGESTS,
    F_DATA_DIGEST,
    F_ZERO_RECORDS,
    MAGIC,
    MAGIC_V1,
    MAX_RECORDS,
    NEW_SUFFIX,
    PUT,
    SEG_HDR,
    SLOT_OFFSETS,
    ZERO_AT,
    ZERO_BIT,
    block_digest,
    block_digests,
    empty_log,
    encode_file_header,
    encode_slot,
    file_header_len,
    records_digest,
    segment_header_len,
)
from colofs.core.logreplay import LogReplay

__all__ = ["NEW_SUFFIX", "BlockLog", "LogMissing", "file_header_len"]


class LogMissing(MapMissing):
    """A log file is not there; ``path`` names it for the VM's damage record."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path
        self.offset = None
        self.reason = "the file is missing"


class BlockLog(LogReplay):
    """A block map (block -> file offset of its data) backed by one segment log file.

    ``sums`` (write-once logs only) holds each block's data digest, checked
    by :meth:`verify` whenever the block is read back. ``on_damage`` is
    called with the error when a read finds a block that fails it (the VM
    quarantines itself).
    """

    def __init__(self, path: str, fd: int, block_size: int, gen: int, mutable: bool, label: str) -> None:
        self.path = path
        self.fd = fd
        self.block_size = block_size
        self.gen = gen
        self.mutable = mutable
        self.label = label
        self.map = BlockIndex(keep_digests=not mutable, unit=block_size)
        self.sums: DigestView | None = self.map.digests
        self.end = 0
        self.legacy = False  # a format-1 file: no file header, no commit slots
        self.committed = 0  # the length the last commit slot names
        self._slot_counter = 0
        self.on_damage: Callable[[BlockDamaged], None] | None = None
        self.rename_unsynced = False
        """:meth:`take_spare` renamed this file into place and its directory is not synced yet:
        the next :func:`make_durable` (or :func:`settle_renames`) syncs it before it returns."""

    # -- life cycle -------------------------------------------------------

    @classmethod
    def create(cls, path: str, block_size: int, gen: int, *, mutable: bool, label: str) -> BlockLog:
        """A new, empty log: its header is written at once (the caller syncs it with the file's entry)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        log = cls(path, fd, block_size, gen, mutable, label)
        try:
            log.end = log._write_header(fd, path)
        except BaseException:
            os.close(fd)
            raise
        return log

    @classmethod
    def open(
        cls,
        path: str,
        block_size: int,
        gen: int,
        *,
        mutable: bool,
        label: str,
        expected_len: int | None,
        verify_data: bool,
        headed: bool = False,
    ) -> BlockLog:
        """Open and replay a log.

        ``expected_len`` is the length recorded at the last clean close: the
        log must then be exactly that long and flawless. ``None`` means the
        process died: what lies past the committed length is a torn tail and
        is dropped (no base block depends on it); anything wrong before it
        is damage (:class:`MapCorrupt`, with the file, offset and reason).
        ``headed`` says the log was created with its header, so an empty file
        is damage too (:class:`MapTruncated`), not a log nothing was added to.
        """
        try:
            # A fresh file a crash caught before its rename: the old one still stands.
            os.unlink(path + NEW_SUFFIX)
        except FileNotFoundError:
            pass
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise LogMissing(f"{label}: block map {path} is missing", path) from None
        log = cls(path, fd, block_size, gen, mutable, label)
        try:
            log._replay(expected_len, verify_data, headed)
        except BaseException:
            os.close(fd)
            raise
        return log

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _start_empty(self, gen: int) -> None:
        self.gen = gen
        self.map.clear()
        self.map.keep_digests(not self.mutable)  # a format-1 log kept none; its successor is format 2
        self.sums = self.map.digests
        self.end = 0
        self.legacy = False
        self.committed = 0
        self._slot_counter = 0

    def reset(self, gen: int) -> None:
        """Empty the log for a new generation (after the state file already says so).

        The header (slots zero) is rewritten before the file is cut to it,
        so a crash in between leaves a valid log holding only older
        generations, never an empty file.
        """
        self._start_empty(gen)
        self.end = self._write_header(self.fd, self.path)
        try:
            os.ftruncate(self.fd, self.end)
        except OSError as e:
            raise DiskIOError(f"{self.label}: cannot truncate {self.path}: {e.strerror}", e.errno) from e

    def ensure_header(self) -> bool:
        """Give an empty log (made before logs were created with one) its header; True if written."""
        if self.end or self.legacy:
            return False
        self.end = self._write_header(self.fd, self.path)
        return True

    def _write_header(self, fd: int, path: str) -> int:
        """Write the file header with both commit slots zero at the start of ``fd``; returns its length."""
        block = empty_log(self.block_size, self.mutable)
        try:
            write_all(fd, [block], 0)
        except OSError as e:
            raise DiskIOError(f"{self.label}: writing the header of {path} failed: {e.strerror}", e.errno) from e
        return len(block)

    def make_spare(self) -> int:
        """Create the fresh file a new generation will start in; returns its descriptor (blocking: a worker thread).

        The file (``path`` + ``.new``) holds only a file header and is synced,
        so a checkpoint makes it before it pauses the VM and the pause keeps
        only :meth:`take_spare`'s rename. A crash leaves at most a stray
        ``.new`` file, which :meth:`open` removes.
        """
        tmp = self.path + NEW_SUFFIX
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise DiskIOError(f"{self.label}: cannot create {tmp}: {e.strerror}", e.errno) from e
        try:
            self._write_header(fd, tmp)
            os.fdatasync(fd)
        except DiskIOError:
            os.close(fd)
            raise
        except OSError as e:
            os.close(fd)
            raise DiskIOError(f"{self.label}: cannot sync {tmp}: {e.strerror}", e.errno) from e
        return fd

    def take_spare(self, fd: int, gen: int) -> int:
        """Empty the log for ``gen`` by renaming the spare ``fd`` (:meth:`make_spare`) over it; returns the old descriptor.

        Unlike :meth:`reset` this frees no blocks now: that happens when the
        caller closes the returned descriptor, off the critical path (see
        ``colofs.core.reaper``). Either file is valid after a crash (the old
        one holds only older generations). The rename must be durable before
        the log holds anything that is relied on (data base depends on, SVM
        writes a flush acknowledged, a clean close's lengths): every such
        sync goes through :func:`make_durable` or :func:`settle_renames`,
        which sync the directory first while :attr:`rename_unsynced` says so,
        so a checkpoint need not wait for it. On an error the spare is left
        to the caller.
        """
        try:
            os.rename(self.path + NEW_SUFFIX, self.path)
        except OSError as e:
            raise DiskIOError(f"{self.label}: cannot replace {self.path}: {e.strerror}", e.errno) from e
        old, self.fd = self.fd, fd
        self._start_empty(gen)
        self.end = file_header_len(self.block_size)
        self.rename_unsynced = True
        return old

    # -- queries ----------------------------------------------------------

    def __len__(self) -> int:
        return len(self.map)

    def __contains__(self, block: int) -> bool:
        return block in self.map

    @property
    def data_bytes(self) -> int:
        return len(self.map) * self.block_size

    def damaged(self, offset: int, reason: str) -> BlockDamaged:
        """The error for a block found damaged at ``offset``; tells ``on_damage`` first."""
        err = BlockDamaged(f"{self.label}: {self.path} at offset {offset}: {reason}", self.path, offset, reason)
        if self.on_damage is not None:
            self.on_damage(err)
        return err

    def verify(self, first: int, data: memoryview) -> None:
        """Check whole blocks ``first, first+1, ...`` read from this log against their digests.

        Raises :class:`BlockDamaged` (after telling ``on_damage``) on a mismatch.
        """
        sums = self.sums
        if not sums:
            return
        bs = self.block_size
        n = len(data) // bs
        if n == 1:  # the common 4 KiB read: no lists
            if block_digest(data) == sums.get(first, -1):
                return
            want = [sums.get(first)]
            got = [block_digest(data)]
        else:
            want = sums.run(first, n) if isinstance(sums, DigestView) else list(map(sums.get, range(first, first + n)))
            got = [block_digest(data[i * bs : (i + 1) * bs]) for i in range(n)]
            if got == want:
                return
        for i in range(n):
            if want[i] is not None and got[i] != want[i]:
                b = first + i
                raise self.damaged(self.map.get(b, -1), f"block {b} fails its digest")

    # -- updates ----------------------------------------------------------

    @property
    def takes_zeros(self) -> bool:
        """Whether ZERO records (a block reading as zeros, no data) can be appended: write-once, format 2."""
        return not self.mutable and not self.legacy

    def append(self, blocks: Sequence[int], bufs: Sequence[Buffer], zeros: Sequence[int] = ()) -> None:
        """Add ``blocks`` whose contents are ``bufs`` concatenated, and ``zeros`` reading as zeros; one ``pwritev``.

        ``zeros`` cost a record each and no data where :attr:`takes_zeros`
        (else blocks of zeros are written). The map is updated only once the
        write succeeded, so a failed append (ENOSPC, EIO) leaves the log as it was.
        """
        n = len(blocks)
        bs = self.block_size
        if zeros and not self.takes_zeros:
            step = max(1, (8 << 20) // bs)
            self.append(blocks, bufs)
            for i in range(0, len(zeros), step):
                part = zeros[i : i + step]
                self.append(part, [bytes(len(part) * bs)])
            return
        if n + len(zeros) <= MAX_RECORDS:
            if n or zeros:
                self._append_segment(blocks, bufs, zeros)
            return
        for start in range(0, n, MAX_RECORDS):
            chunk = blocks[start : start + MAX_RECORDS]
            self._append_segment(chunk, _slice_bufs(bufs, start * bs, len(chunk) * bs))
        for start in range(0, len(zeros), MAX_RECORDS):
            self._append_segment([], [], zeros[start : start + MAX_RECORDS])

    def _lead(self) -> list[Buffer]:
        """The file header, if this is the log's first write (its length moves ``end``)."""
        if self.end or self.legacy:
            return []
        self.end = file_header_len(self.block_size)
        return [encode_file_header(self.block_size, self.mutable).ljust(self.end, b"\0")]

    def _append_segment(self, blocks: Sequence[int], bufs: Sequence[Buffer], zeros: Sequence[int] = ()) -> None:
        n = len(blocks)
        bs = self.block_size
        total = sum(len(b) for b in bufs)
        if total != n * bs:
            raise ValueError(f"{self.label}: {n} blocks need {n * bs} bytes, got {total}")
        records = array("Q", bytes(16 * n))
        records[0::2] = array("Q", blocks)
        flags = data_digest = 0
        sums: list[int] = []
        if self.legacy:  # a format-1 file keeps its format until it is started over
            records[1::2] = array("Q", [PUT]) * n
            if not self.mutable:
                h = xxhash.xxh3_64()
                for b in bufs:
                    h.update(b)
                data_digest = h.intdigest()
                flags = F_DATA_DIGEST
        elif not self.mutable:
            sums = block_digests(bufs, bs)
            records[1::2] = array("Q", sums)
            flags = F_BLOCK_DIGESTS
        if zeros:  # records (block | ZERO_BIT, 0) after the PUT records; no data
            zrec = array("Q", bytes(16 * len(zeros)))
            zrec[0::2] = array("Q", [b | ZERO_BIT for b in zeros])
            records += zrec
            flags |= F_ZERO_RECORDS
        old_end = self.end
        lead = self._lead()
        header = self._header(records, len(records) // 2, flags, data_digest)
        seg_off = self.end
        try:
            write_all(self.fd, [*lead, header, *bufs], old_end)
        except OSError as e:
            self.end = old_end
            raise DiskIOError(
                f"{self.label}: writing {n} blocks to {self.path} at {seg_off} failed: {e.strerror}", e.errno
            ) from e
        data_off = seg_off + len(header)
        self.map.put_many(blocks, range(data_off, data_off + n * bs, bs), sums or None)
        if zeros:
            self.map.put_many(zeros, [ZERO_AT] * len(zeros))
        self.end = data_off + n * bs

    def drop(self, blocks: Iterable[int], checked: bool = False) -> None:
        """Remove blocks durably-to-be (tombstones); the caller syncs.

        ``checked``: the caller knows every block is in the log (a failover's
        commit, which took them from the map), so none is looked up first.
        """
        present = blocks if checked and isinstance(blocks, list) else [b for b in blocks if b in self.map]
        if not present:
            return
        n = len(present)
        records = array("Q", bytes(16 * n))
        if self.legacy:
            records[0::2] = array("Q", present)
            records[1::2] = array("Q", [DROP]) * n
        else:
            records[0::2] = array("Q", [b | DROP_BIT for b in present])
        old_end = self.end
        lead = self._lead()
        header = self._header(records, n, 0, 0)
        try:
            write_all(self.fd, [*lead, header], old_end)
        except OSError as e:
            self.end = old_end
            raise DiskIOError(f"{self.label}: writing tombstones to {self.path} failed: {e.strerror}", e.errno) from e
        self.end += len(header)
        for b in present:
            self.map.pop(b)

    def overwrite(self, file_off: int, bufs: Sequence[Buffer]) -> None:
        """Rewrite blocks in place (mutable logs only)."""
        assert self.mutable, "write-once log overwritten"
        try:
            write_all(self.fd, bufs, file_off)
        except OSError as e:
            raise DiskIOError(
                f"{self.label}: writing {self.path} at {file_off} failed: {e.strerror}", e.errno
            ) from e

    def _header(self, records: array, nrec: int, flags: int, data_digest: int) -> bytes:
        magic = MAGIC_V1 if self.legacy else MAGIC
        head = SEG_HDR.pack(magic, self.gen, nrec, flags, data_digest, 0)[:32]
        rec_bytes = records.tobytes()
        digest = records_digest(head, rec_bytes)
        body = head + struct.pack("<Q", digest) + rec_bytes
        return body + bytes(segment_header_len(nrec, self.block_size) - len(body))

    def commit(self, length: int, fd: int) -> None:
        """Record that the first ``length`` bytes were written and synced (see the module docstring).

        ``fd`` is the descriptor the sync covered: if the log was started
        over meanwhile, the record is not for this file and is skipped.
        """
        if fd != self.fd or self.legacy or length <= self.committed:
            return
        self._slot_counter += 1
        off = SLOT_OFFSETS[self._slot_counter % 2]
        try:
            write_all(self.fd, [encode_slot(self._slot_counter, length)], off)
        except OSError as e:
            raise DiskIOError(f"{self.label}: writing the commit record of {self.path} failed: {e.strerror}",
                              e.errno) from e
        self.committed = length


def _slice_bufs(bufs: Sequence[Buffer], start: int, length: int) -> list[memoryview]:
    """The byte range ``[start, start+length)`` of the concatenation of ``bufs``, as views."""
    out: list[memoryview] = []
    pos = 0
    end = start + length
    for b in bufs:
        blen = len(b)
        lo = max(start, pos)
        hi = min(end, pos + blen)
        if lo < hi:
            out.append(memoryview(b)[lo - pos : hi - pos])
        pos += blen
        if pos >= end:
            break
    return out
