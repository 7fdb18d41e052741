"""Persistent block maps: the one on-disk structure behind hidden, active and snapshot layers.

A log file is a sequence of *segments*, each a header followed by the data
of the blocks it adds. The header (padded to whole blocks, so data stays
block aligned) holds the generation, the records ``(block, PUT|DROP)`` and
two xxh3 digests: one over the header and records, and, for write-once logs,
one over the segment's data. Appending a batch of blocks is therefore one
``pwritev`` and one ``fdatasync``; a contiguous run of new blocks lands in
contiguous file space, so it is later read back with one ``preadv``.

Records carry the VM's generation: emptying a layer at a checkpoint is an
atomic bump of the generation in the VM's state file (all disks at once),
after which older segments are ignored and the file is truncated at leisure.

Write-once logs (hidden, snapshots) carry a data digest, which tells a
segment torn by a crash from a complete one. Mutable logs (active, clone
overlays) overwrite a block in place, like a disk, and have no data digest.
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Iterable, Sequence

import xxhash

from colofs.core.errors import DiskIOError, MapCorrupt, MapMissing, MapTruncated
from colofs.core.fileio import Buffer, read_into_blocking, write_all

MAGIC = b"COLFSEG1"
_HDR = struct.Struct("<8sQIIQQ")  # magic, gen, nrec, flags, data digest, header digest
HDR_SIZE = _HDR.size
_REC_SIZE = 16  # block u64, kind u64
PUT = 1
DROP = 2
F_DATA_DIGEST = 1
MAX_RECORDS = 1 << 20
NEW_SUFFIX = ".new"  # a fresh log file before it is renamed over the old one


def _header_len(nrec: int, block_size: int) -> int:
    raw = HDR_SIZE + nrec * _REC_SIZE
    return (raw + block_size - 1) // block_size * block_size


def _digest(head: bytes, records: Buffer) -> int:
    h = xxhash.xxh3_64(head)
    h.update(records)
    return h.intdigest()


class BlockLog:
    """A block map (block -> file offset of its data) backed by one segment log file."""

    def __init__(self, path: str, fd: int, block_size: int, gen: int, mutable: bool, label: str) -> None:
        self.path = path
        self.fd = fd
        self.block_size = block_size
        self.gen = gen
        self.mutable = mutable
        self.label = label
        self.map: dict[int, int] = {}
        self.end = 0

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
        process died: a torn tail is dropped (its blocks never reached base,
        because a segment is durable before base changes), but damage followed
        by a valid segment of this generation is corruption.
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

    def reset(self, gen: int) -> None:
        """Empty the log for a new generation (after the state file already says so)."""
        self.gen = gen
        self.map.clear()
        self.end = 0
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
        self.gen = gen
        self.map.clear()
        self.end = 0
        return old

    # -- queries ----------------------------------------------------------

    def __len__(self) -> int:
        return len(self.map)

    def __contains__(self, block: int) -> bool:
        return block in self.map

    @property
    def data_bytes(self) -> int:
        return len(self.map) * self.block_size

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

    def _append_segment(self, blocks: Sequence[int], bufs: Sequence[Buffer]) -> None:
        n = len(blocks)
        bs = self.block_size
        records = array("Q", bytes(16 * n))
        records[0::2] = array("Q", blocks)
        records[1::2] = array("Q", [PUT]) * n
        flags = 0
        data_digest = 0
        if not self.mutable:
            h = xxhash.xxh3_64()
            for b in bufs:
                h.update(b)
            data_digest = h.intdigest()
            flags = F_DATA_DIGEST
        header = self._header(records, n, flags, data_digest)
        total = sum(len(b) for b in bufs)
        if total != n * bs:
            raise ValueError(f"{self.label}: {n} blocks need {n * bs} bytes, got {total}")
        seg_off = self.end
        try:
            write_all(self.fd, [header, *bufs], seg_off)
        except OSError as e:
            raise DiskIOError(
                f"{self.label}: writing {n} blocks to {self.path} at {seg_off} failed: {e.strerror}", e.errno
            ) from e
        data_off = seg_off + len(header)
        self.map.update(zip(blocks, range(data_off, data_off + n * bs, bs), strict=True))
        self.end = data_off + n * bs

    def drop(self, blocks: Iterable[int]) -> None:
        """Remove blocks durably-to-be (tombstones); the caller syncs."""
        present = [b for b in blocks if b in self.map]
        if not present:
            return
        n = len(present)
        records = array("Q", bytes(16 * n))
        records[0::2] = array("Q", present)
        records[1::2] = array("Q", [DROP]) * n
        header = self._header(records, n, 0, 0)
        try:
            write_all(self.fd, [header], self.end)
        except OSError as e:
            raise DiskIOError(f"{self.label}: writing tombstones to {self.path} failed: {e.strerror}", e.errno) from e
        self.end += len(header)
        for b in present:
            del self.map[b]

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
        head = _HDR.pack(MAGIC, self.gen, nrec, flags, data_digest, 0)[:32]
        rec_bytes = records.tobytes()
        digest = _digest(head, rec_bytes)
        body = head + struct.pack("<Q", digest) + rec_bytes
        return body + bytes(_header_len(nrec, self.block_size) - len(body))

    # -- replay -----------------------------------------------------------

    def _replay(self, expected_len: int | None, verify_data: bool) -> None:
        size = os.fstat(self.fd).st_size
        limit = size
        if expected_len is not None:
            if size < expected_len:
                raise MapTruncated(
                    f"{self.label}: block map {self.path} is {size} bytes, the state recorded {expected_len}"
                )
            if size > expected_len:
                raise MapCorrupt(
                    f"{self.label}: block map {self.path} is {size} bytes, longer than the {expected_len} recorded at close"
                )
        off = 0
        while off < limit:
            seg = self._parse_segment(off, limit, verify_data)
            if isinstance(seg, str):
                if expected_len is not None:
                    raise MapCorrupt(f"{self.label}: block map {self.path}: {seg} at offset {off}")
                later = self._find_valid_segment(off + self.block_size, limit)
                if later is not None:
                    raise MapCorrupt(
                        f"{self.label}: block map {self.path}: {seg} at offset {off}, "
                        f"but a valid segment follows at {later}"
                    )
                # A torn tail: the batch in flight when the process died.
                os.ftruncate(self.fd, off)
                break
            gen, records, data_off, seg_end = seg
            if gen == self.gen:
                bs = self.block_size
                i = 0
                m = self.map
                for rec in range(0, len(records), 2):
                    b, kind = records[rec], records[rec + 1]
                    if kind == PUT:
                        m[b] = data_off + i * bs
                        i += 1
                    else:
                        m.pop(b, None)
            off = seg_end
        self.end = off

    def _read(self, off: int, length: int) -> bytearray:
        buf = bytearray(length)
        read_into_blocking(self.fd, memoryview(buf), off)
        return buf

    def _parse_segment(
        self, off: int, limit: int, verify_data: bool
    ) -> str | tuple[int, array, int, int]:
        """One segment at ``off``: ``(gen, records, data offset, end)`` or a description of the damage."""
        bs = self.block_size
        if off + HDR_SIZE > limit:
            return "a header cut short"
        head = self._read(off, HDR_SIZE)
        magic, gen, nrec, flags, data_digest, hdr_digest = _HDR.unpack(head)
        if magic != MAGIC:
            return "no segment header"
        if nrec > MAX_RECORDS or flags & ~F_DATA_DIGEST:
            return "an impossible segment header"
        hlen = _header_len(nrec, bs)
        if off + hlen > limit:
            return "a header cut short"
        rec_bytes = self._read(off + HDR_SIZE, nrec * _REC_SIZE)
        if _digest(bytes(head[:32]), rec_bytes) != hdr_digest:
            return "a header that fails its checksum"
        records = array("Q")
        records.frombytes(rec_bytes)
        nput = 0
        for kind in records[1::2]:
            if kind == PUT:
                nput += 1
            elif kind != DROP:
                return "an unknown record kind"
        data_off = off + hlen
        end = data_off + nput * bs
        if end > limit:
            return "data cut short"
        if flags & F_DATA_DIGEST and verify_data:
            h = xxhash.xxh3_64()
            pos = data_off
            chunk = 1 << 20
            while pos < end:
                h.update(self._read(pos, min(chunk, end - pos)))
                pos += chunk
            if h.intdigest() != data_digest:
                return "data that fails its checksum"
        return gen, records, data_off, end

    def _find_valid_segment(self, start: int, limit: int) -> int | None:
        """Is there a complete segment of this generation anywhere after damage?"""
        bs = self.block_size
        off = (start + bs - 1) // bs * bs
        while off + HDR_SIZE <= limit:
            head = self._read(off, HDR_SIZE)
            if head[:8] == MAGIC:
                seg = self._parse_segment(off, limit, verify_data=True)
                if not isinstance(seg, str) and seg[0] == self.gen:
                    return off
            off += bs
        return None


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
