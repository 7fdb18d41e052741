"""The on-disk format of block logs (format 2), and the digests that protect it.

    offset 0     file header block (max(4 KiB, block size)):
                   magic COLFSLOG, format, block size, flags, xxh3 of those;
                   commit slot 0 at byte 512, slot 1 at byte 1024:
                   magic COLFSCMT, counter, committed length, xxh3 of those
    then         segments: a header padded to whole blocks
                   (magic COLFSEG2, generation, record count, flags, -, xxh3 of header and records;
                    records of 16 bytes: block number (top bit set: DROP), xxh3 of the block's data)
                 followed by the data of its PUT records, one block each;
                 a segment with flag F_ZERO_RECORDS may also hold ZERO records
                   (bit 62 of the block number set, digest 0): the block reads as
                   zeros and has no data in the file (a copy-before-write of a
                   block of base that was a hole or zero costs a record, not 4 KiB)

The file header is written when the file is created, so even an empty log
is one header block long: a format-2 log that is empty or missing lost what
it held (see ``colofs.core.blocklog``). Format 1 (no file header; segments COLFSEG1 with records ``(block,
kind)`` and one data digest per segment) is still read. Why the commit slots
let recovery tell damage from a torn tail is explained in
``colofs.core.blocklog``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import xxhash

from colofs.core.fileio import Buffer

LOG_FORMAT = 2
FILE_MAGIC = b"COLFSLOG"
FILE_HDR = struct.Struct("<8sIIIIQ")  # magic, format, block size, flags, reserved, digest
SLOT = struct.Struct("<8sQQQ")  # magic, counter, committed length, digest
SLOT_MAGIC = b"COLFSCMT"
SLOT_OFFSETS = (512, 1024)  # one sector each: a torn slot write leaves the other intact
FILE_HDR_MIN = 4096
MAGIC_V1 = b"COLFSEG1"
MAGIC = b"COLFSEG2"
SEG_HDR = struct.Struct("<8sQIIQQ")  # magic, gen, nrec, flags, data digest (v1), header digest
HDR_SIZE = SEG_HDR.size
REC_SIZE = 16  # v2: block u64 (top bit: DROP), digest u64; v1: block u64, kind u64
DROP_BIT = 1 << 63
ZERO_BIT = 1 << 62
ZERO_AT = -1
"""The map's file offset of a ZERO record's block: no data in the file, it reads as zeros."""
PUT = 1
DROP = 2
F_DATA_DIGEST = 1  # v1: one digest over the segment's data
F_BLOCK_DIGESTS = 2  # v2: each PUT record holds its block's digest
F_ZERO_RECORDS = 4  # v2: some records are ZERO records (readers without it refuse the segment)
MAX_RECORDS = 1 << 20
NEW_SUFFIX = ".new"  # a fresh log file before it is renamed over the old one

block_digest = xxhash.xxh3_64_intdigest


def file_header_len(block_size: int) -> int:
    """Bytes before the first segment: one block, at least 4 KiB (both are powers of two)."""
    return max(FILE_HDR_MIN, block_size)


def segment_header_len(nrec: int, block_size: int) -> int:
    raw = HDR_SIZE + nrec * REC_SIZE
    return (raw + block_size - 1) // block_size * block_size


def records_digest(head: bytes, records: Buffer) -> int:
    h = xxhash.xxh3_64(head)
    h.update(records)
    return h.intdigest()


def encode_file_header(block_size: int, mutable: bool) -> bytes:
    head = FILE_HDR.pack(FILE_MAGIC, LOG_FORMAT, block_size, int(mutable), 0, 0)[:-8]
    return head + struct.pack("<Q", block_digest(head))


def empty_log(block_size: int, mutable: bool) -> bytes:
    """The whole first block of a new log: its file header, both commit slots zero (nothing committed)."""
    return encode_file_header(block_size, mutable).ljust(file_header_len(block_size), b"\0")


def encode_slot(counter: int, length: int) -> bytes:
    head = SLOT.pack(SLOT_MAGIC, counter, length, 0)[:-8]
    return head + struct.pack("<Q", block_digest(head))


def block_digests(bufs: Sequence[Buffer], bs: int) -> list[int]:
    """The digest of each ``bs`` bytes of the concatenation of ``bufs`` (copied only if blocks straddle them)."""
    if any(len(b) % bs for b in bufs):
        bufs = [b"".join(bufs)]
    out: list[int] = []
    for b in bufs:
        mv = memoryview(b)
        out += [block_digest(mv[i : i + bs]) for i in range(0, len(mv), bs)]
    return out
