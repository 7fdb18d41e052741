"""Persistent block maps: the one on-disk structure behind hidden, active and snapshot layers.

A log file (format 2) starts with a *file header* block, followed by a
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

The file header is written with the first segment, so an empty log is an
empty file. Logs of format 1 (no file header, records ``(block, kind)``,
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

from colofs.core.errors import (
    BlockDamaged,
    DiskIOError,
    MapCorrupt,
    MapMissing,
    MapTruncated,
    StoreVersionError,
)
from colofs.core.fileio import Buffer, datasync_all, read_into_blocking, write_all

LOG_FORMAT = 2
FILE_MAGIC = b"COLFSLOG"
_FILE_HDR = struct.Struct("<8sIIIIQ")  # magic, format, block size, flags, reserved, digest
_SLOT = struct.Struct("<8sQQQ")  # magic, counter, committed length, digest
SLOT_MAGIC = b"COLFSCMT"
SLOT_OFFSETS = (512, 1024)  # one sector each: a torn slot write leaves the other intact
FILE_HDR_MIN = 4096
MAGIC_V1 = b"COLFSEG1"
MAGIC = b"COLFSEG2"
_HDR = struct.Struct("<8sQIIQQ")  # magic, gen, nrec, flags, data digest (v1), header digest
HDR_SIZE = _HDR.size
_REC_SIZE = 16  # v2: block u64 (top bit: DROP), digest u64; v1: block u64, kind u64
DROP_BIT = 1 << 63
PUT = 1
DROP = 2
F_DATA_DIGEST = 1  # v1: one digest over the segment's data
F_BLOCK_DIGESTS = 2  # v2: each PUT record holds its block's digest
MAX_RECORDS = 1 << 20
NEW_SUFFIX = ".new"  # a fresh log file before it is renamed over the old one

block_digest = xxhash.xxh3_64_intdigest


def file_header_len(block_size: int) -> int:
    """Bytes before the first segment: one block, at least 4 KiB (both are powers of two)."""
    return max(FILE_HDR_MIN, block_size)


def _header_len(nrec: int, block_size: int) -> int:
    raw = HDR_SIZE + nrec * _REC_SIZE
    return (raw + block_size - 1) // block_size * block_size


def _digest(head: bytes, records: Buffer) -> int:
    h = xxhash.xxh3_64(head)
    h.update(records)
    return h.intdigest()


def _file_header(block_size: int, mutable: bool) -> bytes:
    head = _FILE_HDR.pack(FILE_MAGIC, LOG_FORMAT, block_size, int(mutable), 0, 0)[:-8]
    return head + struct.pack("<Q", block_digest(head))


def _slot(counter: int, length: int) -> bytes:
    head = _SLOT.pack(SLOT_MAGIC, counter, length, 0)[:-8]
    return head + struct.pack("<Q", block_digest(head))


class BlockLog:
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
        self.map: dict[int, int] = {}
        self.sums: dict[int, int] | None = None if mutable else {}
        self.end = 0
        self.legacy = False  # a format-1 file: no file header, no commit slots
        self.committed = 0  # the length the last commit slot names
        self._slot_counter = 0
        self.on_damage: Callable[[BlockDamaged], None] | None = None

    # -- life cycle -------------------------------------------------------

    @classmethod
    def create(cls, path: str, block_size: int, gen: int, *, mutable: bool, label: str) -> BlockLog:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        return cls(path, fd, block_size, gen, mutable, label)

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
    ) -> BlockLog:
        """Open and replay a log.

        ``expected_len`` is the length recorded at the last clean close: the
        log must then be exactly that long and flawless. ``None`` means the
        process died: what lies past the committed length is a torn tail and
        is dropped (no base block depends on it); anything wrong before it
        is damage (:class:`MapCorrupt`, with the file, offset and reason).
        """
        try:
            # A fresh file a crash caught before its rename: the old one still stands.
            os.unlink(path + NEW_SUFFIX)
        except FileNotFoundError:
            pass
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise MapMissing(f"{label}: block map {path} is missing") from None
        log = cls(path, fd, block_size, gen, mutable, label)
        try:
            log._replay(expected_len, verify_data)
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
        if self.sums is not None:
            self.sums.clear()
        self.end = 0
        self.legacy = False
        self.committed = 0
        self._slot_counter = 0

    def reset(self, gen: int) -> None:
        """Empty the log for a new generation (after the state file already says so)."""
        self._start_empty(gen)
        try:
            os.ftruncate(self.fd, 0)
        except OSError as e:
            raise DiskIOError(f"{self.label}: cannot truncate {self.path}: {e.strerror}", e.errno) from e

    def start_over(self, gen: int) -> int:
        """Empty the log for a new generation by renaming a fresh file over it; returns the old descriptor.

        Unlike :meth:`reset` this costs no block freeing now: that happens
        when the caller closes the returned descriptor, off the critical
        path. Either file is valid after a crash (the old one holds only
        older generations), but the caller must make the rename durable
        (``fsync`` of the directory) before the new file takes data that
        base depends on.
        """
        tmp = self.path + NEW_SUFFIX
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise DiskIOError(f"{self.label}: cannot create {tmp}: {e.strerror}", e.errno) from e
        try:
            os.rename(tmp, self.path)
        except OSError as e:
            os.close(fd)
            raise DiskIOError(f"{self.label}: cannot replace {self.path}: {e.strerror}", e.errno) from e
        old, self.fd = self.fd, fd
        self._start_empty(gen)
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
            want = list(map(sums.get, range(first, first + n)))
            got = [block_digest(data[i * bs : (i + 1) * bs]) for i in range(n)]
            if got == want:
                return
        for i in range(n):
            if want[i] is not None and got[i] != want[i]:
                b = first + i
                raise self.damaged(self.map.get(b, -1), f"block {b} fails its digest")

    # -- updates ----------------------------------------------------------

    def append(self, blocks: Sequence[int], bufs: Sequence[Buffer]) -> None:
        """Add ``blocks`` whose contents are ``bufs`` concatenated; one ``pwritev``.

        The map is updated only once the write succeeded, so a failed append
        (ENOSPC, EIO) leaves the log as it was.
        """
        n = len(blocks)
        if n == 0:
            return
        bs = self.block_size
        for start in range(0, n, MAX_RECORDS):
            chunk = blocks[start : start + MAX_RECORDS]
            chunk_bufs = bufs if n <= MAX_RECORDS else _slice_bufs(bufs, start * bs, len(chunk) * bs)
            self._append_segment(chunk, chunk_bufs)

    def _lead(self) -> list[Buffer]:
        """The file header, if this is the log's first write (its length moves ``end``)."""
        if self.end or self.legacy:
            return []
        self.end = file_header_len(self.block_size)
        return [_file_header(self.block_size, self.mutable).ljust(self.end, b"\0")]

    def _append_segment(self, blocks: Sequence[int], bufs: Sequence[Buffer]) -> None:
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
            sums = _block_digests(bufs, bs)
            records[1::2] = array("Q", sums)
            flags = F_BLOCK_DIGESTS
        old_end = self.end
        lead = self._lead()
        header = self._header(records, n, flags, data_digest)
        seg_off = self.end
        try:
            write_all(self.fd, [*lead, header, *bufs], old_end)
        except OSError as e:
            self.end = old_end
            raise DiskIOError(
                f"{self.label}: writing {n} blocks to {self.path} at {seg_off} failed: {e.strerror}", e.errno
            ) from e
        data_off = seg_off + len(header)
        self.map.update(zip(blocks, range(data_off, data_off + n * bs, bs), strict=True))
        if self.sums is not None:
            if sums:
                self.sums.update(zip(blocks, sums, strict=True))
            else:
                for b in blocks:
                    self.sums.pop(b, None)
        self.end = data_off + n * bs

    def drop(self, blocks: Iterable[int]) -> None:
        """Remove blocks durably-to-be (tombstones); the caller syncs."""
        present = [b for b in blocks if b in self.map]
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
            del self.map[b]
            if self.sums is not None:
                self.sums.pop(b, None)

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
        head = _HDR.pack(magic, self.gen, nrec, flags, data_digest, 0)[:32]
        rec_bytes = records.tobytes()
        digest = _digest(head, rec_bytes)
        body = head + struct.pack("<Q", digest) + rec_bytes
        return body + bytes(_header_len(nrec, self.block_size) - len(body))

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
            write_all(self.fd, [_slot(self._slot_counter, length)], off)
        except OSError as e:
            raise DiskIOError(f"{self.label}: writing the commit record of {self.path} failed: {e.strerror}",
                              e.errno) from e
        self.committed = length

    # -- replay -----------------------------------------------------------

    def _corrupt(self, offset: int | None, reason: str, cls: type[MapCorrupt] = MapCorrupt) -> MapCorrupt:
        where = f" at offset {offset}" if offset is not None else ""
        return cls(f"{self.label}: block map {self.path}: {reason}{where}", self.path, offset, reason)

    def _read_file_header(self, size: int) -> int:
        """Parse the file header and the commit slots; returns the offset of the first segment."""
        if size < 8:
            raise self._corrupt(0, f"a {size}-byte file, too short for a log header")
        head = self._read(0, min(size, _FILE_HDR.size))
        if bytes(head[:8]) == MAGIC_V1:
            self.legacy = True
            return 0
        if bytes(head[:8]) != FILE_MAGIC or len(head) < _FILE_HDR.size:
            raise self._corrupt(0, "no log header")
        _, fmt, bs, _flags, _, digest = _FILE_HDR.unpack(head)
        if digest != block_digest(bytes(head[:-8])):
            raise self._corrupt(0, "a log header that fails its checksum")
        if fmt != LOG_FORMAT:
            raise StoreVersionError(f"{self.label}: {self.path} has log format {fmt}, this colofs reads {LOG_FORMAT}")
        if bs != self.block_size:
            raise self._corrupt(0, f"a log header for {bs}-byte blocks, the disk has {self.block_size}")
        hlen = file_header_len(self.block_size)
        best = (0, hlen)
        for off in SLOT_OFFSETS:
            if off + _SLOT.size > size:
                continue
            raw = self._read(off, _SLOT.size)
            magic, counter, length, sdigest = _SLOT.unpack(raw)
            if magic == SLOT_MAGIC and sdigest == block_digest(bytes(raw[:-8])) and counter > best[0]:
                best = (counter, length)
        self._slot_counter, self.committed = best
        if self.committed == hlen and self._slot_counter == 0:
            self.committed = 0
        return hlen

    def _replay(self, expected_len: int | None, verify_data: bool) -> None:
        size = os.fstat(self.fd).st_size
        limit = size
        if expected_len is not None:
            if size < expected_len:
                raise self._corrupt(
                    None, f"{size} bytes, the state recorded {expected_len} at the last clean close", MapTruncated
                )
            if size > expected_len:
                raise self._corrupt(None, f"{size} bytes, longer than the {expected_len} recorded at close")
        if size == 0:
            return  # nothing was ever added
        off = self._read_file_header(size)
        committed = self.committed
        if size < committed:
            raise self._corrupt(
                size, f"the file ends early: {committed} bytes were synced and acknowledged", MapTruncated
            )
        while off < limit:
            seg = self._parse_segment(off, limit, verify_data)
            if isinstance(seg, str):
                if expected_len is not None or off < committed:
                    raise self._corrupt(off, seg)
                if self.legacy or self.mutable:
                    later = self._find_valid_segment(off + self.block_size, limit)
                    if later is not None:
                        raise self._corrupt(off, f"{seg}, but a valid segment follows at {later}")
                # A torn tail: the batch in flight when the process died (never acknowledged).
                os.ftruncate(self.fd, off)
                break
            gen, records, data_off, seg_end, sums = seg
            if off < committed < seg_end:
                raise self._corrupt(off, f"a segment that runs past the acknowledged length {committed}")
            if gen == self.gen:
                self._apply_records(records, data_off, sums)
            off = seg_end
        self.end = off

    def _apply_records(self, records: array, data_off: int, sums: list[int] | None) -> None:
        bs = self.block_size
        m = self.map
        own = self.sums
        i = 0
        legacy = sums is None
        for rec in range(0, len(records), 2):
            word = records[rec]
            if legacy:
                b, put = word, records[rec + 1] == PUT
            else:
                b, put = word & ~DROP_BIT, not word & DROP_BIT
            if put:
                m[b] = data_off + i * bs
                if own is not None:
                    if sums:
                        own[b] = records[rec + 1]
                    else:
                        own.pop(b, None)
                i += 1
            else:
                m.pop(b, None)
                if own is not None:
                    own.pop(b, None)

    def _read(self, off: int, length: int) -> bytearray:
        buf = bytearray(length)
        read_into_blocking(self.fd, memoryview(buf), off)
        return buf

    def _parse_segment(
        self, off: int, limit: int, verify_data: bool
    ) -> str | tuple[int, array, int, int, list[int] | None]:
        """One segment at ``off``: ``(gen, records, data offset, end, digests)`` or a description of the damage.

        ``digests`` is None for a format-1 segment, else the list of the
        PUT records' digests (empty for a mutable log, which keeps none).
        """
        bs = self.block_size
        if off + HDR_SIZE > limit:
            return "a header cut short"
        head = self._read(off, HDR_SIZE)
        magic, gen, nrec, flags, data_digest, hdr_digest = _HDR.unpack(head)
        v1 = magic == MAGIC_V1
        if magic != (MAGIC_V1 if self.legacy else MAGIC):
            return "no segment header"
        allowed = F_DATA_DIGEST if v1 else F_BLOCK_DIGESTS
        if nrec > MAX_RECORDS or flags & ~allowed:
            return "an impossible segment header"
        hlen = _header_len(nrec, bs)
        if off + hlen > limit:
            return "a header cut short"
        rec_bytes = self._read(off + HDR_SIZE, nrec * _REC_SIZE)
        if _digest(bytes(head[:32]), rec_bytes) != hdr_digest:
            return "a header that fails its checksum"
        records = array("Q")
        records.frombytes(rec_bytes)
        if v1:
            nput = 0
            for kind in records[1::2]:
                if kind == PUT:
                    nput += 1
                elif kind != DROP:
                    return "an unknown record kind"
        else:
            nput = sum(1 for w in records[0::2] if not w & DROP_BIT)
        data_off = off + hlen
        end = data_off + nput * bs
        if end > limit:
            return "data cut short"
        if v1:
            if flags & F_DATA_DIGEST and verify_data:
                h = xxhash.xxh3_64()
                pos = data_off
                chunk = 1 << 20
                while pos < end:
                    h.update(self._read(pos, min(chunk, end - pos)))
                    pos += chunk
                if h.intdigest() != data_digest:
                    return "data that fails its checksum"
            return gen, records, data_off, end, None
        sums = [w for r, w in zip(records[0::2], records[1::2], strict=True) if not r & DROP_BIT]
        if flags & F_BLOCK_DIGESTS:
            if verify_data:
                bad = self._check_data(data_off, sums)
                if bad is not None:
                    return f"data that fails its checksum (block at {bad})"
        else:
            sums = []
        return gen, records, data_off, end, sums

    def _check_data(self, data_off: int, sums: list[int]) -> int | None:
        """The file offset of the first block whose data fails its digest, or None."""
        bs = self.block_size
        per = max(1, (1 << 20) // bs)
        for i in range(0, len(sums), per):
            want = sums[i : i + per]
            buf = memoryview(self._read(data_off + i * bs, len(want) * bs))
            for j, w in enumerate(want):
                if block_digest(buf[j * bs : (j + 1) * bs]) != w:
                    return data_off + (i + j) * bs
        return None

    def _find_valid_segment(self, start: int, limit: int) -> int | None:
        """Is there a complete segment of this generation anywhere after damage?"""
        bs = self.block_size
        off = (start + bs - 1) // bs * bs
        magic = MAGIC_V1 if self.legacy else MAGIC
        while off + HDR_SIZE <= limit:
            head = self._read(off, HDR_SIZE)
            if head[:8] == magic:
                seg = self._parse_segment(off, limit, verify_data=True)
                if not isinstance(seg, str) and seg[0] == self.gen:
                    return off
            off += bs
        return None


async def make_durable(logs: Sequence[BlockLog]) -> None:
    """Sync ``logs`` (one group commit), then write each one's commit record.

    Call it after appending and *before* touching what the appended blocks
    protect (base): the records are what lets recovery tell damage from a
    torn tail. The record rides the next sync of the same file; see the
    module docstring for why it needs none of its own.
    """
    if not logs:
        return
    marks = [(lg, lg.fd, lg.end) for lg in logs]
    await datasync_all([fd for _, fd, _ in marks])
    for lg, fd, end in marks:
        lg.commit(end, fd)


def _block_digests(bufs: Sequence[Buffer], bs: int) -> list[int]:
    """The digest of each ``bs`` bytes of the concatenation of ``bufs`` (copied only if blocks straddle them)."""
    if any(len(b) % bs for b in bufs):
        bufs = [b"".join(bufs)]
    out: list[int] = []
    for b in bufs:
        mv = memoryview(b)
        out += [block_digest(mv[i : i + bs]) for i in range(0, len(mv), bs)]
    return out


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
