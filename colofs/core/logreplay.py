"""Replaying a block log at open: rebuild the map, and tell a torn tail from damage.

After a clean close the log must be exactly the recorded length and
flawless. A log created with its header (the VM's state says so) is never
empty: an empty file lost its content. After a crash, what lies past the committed length (the newer
commit slot) is the batch in flight and is dropped; anything wrong before it
is damage, raised as :class:`MapCorrupt` with the file, offset and reason
(see ``colofs.core.blocklog`` for why the slot proves it).
"""

from __future__ import annotations

import os
from array import array

import xxhash

from colofs.core.blockindex import BlockIndex, DigestView
from colofs.core.errors import MapCorrupt, MapTruncated, StoreVersionError
from colofs.core.fileio import read_into_blocking
from colofs.core.logformat import (
    DROP,
    DROP_BIT,
    F_BLOCK_DIGESTS,
    F_DATA_DIGEST,
    F_ZERO_RECORDS,
    FILE_HDR,
    FILE_MAGIC,
    HDR_SIZE,
    LOG_FORMAT,
    MAGIC,
    MAGIC_V1,
    MAX_RECORDS,
    PUT,
    REC_SIZE,
    SEG_HDR,
    SLOT,
    SLOT_MAGIC,
    SLOT_OFFSETS,
    ZERO_AT,
    ZERO_BIT,
    block_digest,
    file_header_len,
    records_digest,
    segment_header_len,
)


class LogReplay:
    """The replay half of :class:`~colofs.core.blocklog.BlockLog` (a mixin: it fills the log's map)."""

    path: str
    fd: int
    block_size: int
    gen: int
    mutable: bool
    label: str
    map: BlockIndex
    sums: DigestView | None
    end: int
    legacy: bool
    committed: int
    _slot_counter: int

    def _corrupt(self, offset: int | None, reason: str, cls: type[MapCorrupt] = MapCorrupt) -> MapCorrupt:
        where = f" at offset {offset}" if offset is not None else ""
        return cls(f"{self.label}: block map {self.path}: {reason}{where}", self.path, offset, reason)

    def _read_file_header(self, size: int) -> int:
        """Parse the file header and the commit slots; returns the offset of the first segment."""
        if size < 8:
            raise self._corrupt(0, f"a {size}-byte file, too short for a log header")
        head = self._read(0, min(size, FILE_HDR.size))
        if bytes(head[:8]) == MAGIC_V1:
            self.legacy = True
            self.map.keep_digests(False)  # format 1 has no per-block digests
            self.sums = None
            return 0
        if bytes(head[:8]) != FILE_MAGIC or len(head) < FILE_HDR.size:
            raise self._corrupt(0, "no log header")
        _, fmt, bs, _flags, _, digest = FILE_HDR.unpack(head)
        if digest != block_digest(bytes(head[:-8])):
            raise self._corrupt(0, "a log header that fails its checksum")
        if fmt != LOG_FORMAT:
            raise StoreVersionError(f"{self.label}: {self.path} has log format {fmt}, this colofs reads {LOG_FORMAT}")
        if bs != self.block_size:
            raise self._corrupt(0, f"a log header for {bs}-byte blocks, the disk has {self.block_size}")
        hlen = file_header_len(self.block_size)
        best = (0, hlen)
        for off in SLOT_OFFSETS:
            if off + SLOT.size > size:
                continue
            raw = self._read(off, SLOT.size)
            magic, counter, length, sdigest = SLOT.unpack(raw)
            if magic == SLOT_MAGIC and sdigest == block_digest(bytes(raw[:-8])) and counter > best[0]:
                best = (counter, length)
        self._slot_counter, self.committed = best
        if self.committed == hlen and self._slot_counter == 0:
            self.committed = 0
        return hlen

    def _replay(self, expected_len: int | None, verify_data: bool, headed: bool = False) -> None:
        """Rebuild the map; ``headed``: the log was created with its header, so it is never empty."""
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
            if headed:
                raise self._corrupt(
                    None, "an empty file, but the log was created with its header: what it held is lost", MapTruncated
                )
            return  # a log from before headers were written at creation, and nothing was ever added
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
        nrec = len(records) // 2
        if sums is not None and len(sums) == nrec or sums == [] and nrec and nput_only(records):
            # Only PUT records (the usual segment): one batch into the index.
            m.put_many(records[0::2], range(data_off, data_off + nrec * bs, bs), sums or None)
            return
        i = 0
        legacy = sums is None
        for rec in range(0, len(records), 2):
            word = records[rec]
            if legacy:
                b, put = word, records[rec + 1] == PUT
            else:
                b, put = word & ~DROP_BIT, not word & DROP_BIT
                if put and b & ZERO_BIT:  # no data: the block reads as zeros
                    m.put(b & ~ZERO_BIT, ZERO_AT)
                    continue
            if put:
                m.put(b, data_off + i * bs, sums[i] if sums else None)
                i += 1
            else:
                m.pop(b, None)

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
        magic, gen, nrec, flags, data_digest, hdr_digest = SEG_HDR.unpack(head)
        v1 = magic == MAGIC_V1
        if magic != (MAGIC_V1 if self.legacy else MAGIC):
            return "no segment header"
        allowed = F_DATA_DIGEST if v1 else F_BLOCK_DIGESTS | F_ZERO_RECORDS
        if nrec > MAX_RECORDS or flags & ~allowed:
            return "an impossible segment header"
        hlen = segment_header_len(nrec, bs)
        if off + hlen > limit:
            return "a header cut short"
        rec_bytes = self._read(off + HDR_SIZE, nrec * REC_SIZE)
        if records_digest(bytes(head[:32]), rec_bytes) != hdr_digest:
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
            nput = sum(1 for w in records[0::2] if not w & (DROP_BIT | ZERO_BIT))
            if not flags & F_ZERO_RECORDS and any(w & ZERO_BIT for w in records[0::2]):
                return "a zero record in a segment not flagged for them"
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
        sums = [w for r, w in zip(records[0::2], records[1::2], strict=True) if not r & (DROP_BIT | ZERO_BIT)]
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


def nput_only(records: array) -> bool:
    """Whether a format-2 segment's records are all PUTs (no DROP or ZERO record)."""
    return not any(w & (DROP_BIT | ZERO_BIT) for w in records[0::2])
