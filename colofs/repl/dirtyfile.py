"""The dirty map on disk: ``DISK_DIR/repl-dirty.bitmap``, one file per disk.

Format 2 (written now) holds a :class:`~colofs.repl.blockset.BlockSet` as it
is in memory, so the file is as small as the set::

    COLOFS-DIRTY 2\\n
    NBLOCKS BLOCK_SIZE COVERED_SEQ CHUNK_SHIFT NRUNS NPARTS\\n
    NRUNS x (first_chunk u64, stop_chunk u64)          whole chunks
    NPARTS x (chunk u64, mask of 2**CHUNK_SHIFT bits)  touched chunks
    xxh3-64 of everything before it

Format 1 (written before) is a flat bitmap, one bit per block::

    COLOFS-DIRTY 1\\n
    NBLOCKS BLOCK_SIZE COVERED_SEQ\\n
    bits (bit b & 7 of byte b >> 3 is block b)
    xxh3-64

Both are read. A file that is damaged, of an unknown format or for another
geometry reads as None: the caller then falls back to a full sync, the safe
direction.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import xxhash

from colofs.repl.blockset import CHUNK_SHIFT, BlockSet, mask_runs

BITMAP_FILE = "repl-dirty.bitmap"
_MAGIC_V1 = b"COLOFS-DIRTY 1\n"
_MAGIC_V2 = b"COLOFS-DIRTY 2\n"
_MAX_SHIFT = 20


def bitmap_path(disk_dir: str) -> str:
    return os.path.join(disk_dir, BITMAP_FILE)


# -- format 2 ----------------------------------------------------------------------------


def encode_dirty(blocks: BlockSet, block_size: int, covered_seq: int) -> bytes:
    runs = blocks.chunk_runs()
    parts = blocks.parts()
    mask_len = (1 << CHUNK_SHIFT) >> 3
    out = bytearray(_MAGIC_V2)
    out += f"{blocks.nblocks} {block_size} {covered_seq} {CHUNK_SHIFT} {len(runs)} {len(parts)}\n".encode()
    out += struct.pack(f"<{2 * len(runs)}Q", *(c for run in runs for c in run))
    for chunk, mask in parts:
        out += struct.pack("<Q", chunk)
        out += mask.to_bytes(mask_len, "little")
    out += xxhash.xxh3_64_digest(out)
    return bytes(out)


def _decode_v2(body: bytes, head: list[int], nblocks: int) -> BlockSet | None:
    if len(head) != 6:
        return None
    _n, _bs, _covered, shift, nruns, nparts = head
    if not 0 <= shift <= _MAX_SHIFT:
        return None
    mask_len = max(1, (1 << shift) >> 3)
    if len(body) != 16 * nruns + nparts * (8 + mask_len):
        return None
    nchunks = (nblocks + (1 << shift) - 1) >> shift
    out = BlockSet(nblocks)
    bounds = struct.unpack_from(f"<{2 * nruns}Q", body)
    prev = -1
    for k in range(0, len(bounds), 2):
        lo, hi = bounds[k], bounds[k + 1]
        if not prev < lo < hi <= nchunks:  # sorted, disjoint, not touching, inside the disk
            return None
        prev = hi
        out.add(lo << shift, hi << shift)
    pos = 16 * nruns
    for _ in range(nparts):
        (chunk,) = struct.unpack_from("<Q", body, pos)
        mask = int.from_bytes(body[pos + 8 : pos + 8 + mask_len], "little")
        pos += 8 + mask_len
        if chunk >= nchunks:
            return None
        for lo, hi in mask_runs(mask, chunk << shift):
            out.add(lo, hi)
    return out


# -- format 1 (flat bitmaps) ----------------------------------------------------------------


def bitmap_len(nblocks: int) -> int:
    return (nblocks + 7) >> 3


def set_bits(bits: bytearray, lo: int, hi: int) -> None:
    """Set bits ``lo .. hi-1`` (block numbers) in a little-endian-per-byte bitmap."""
    if lo >= hi:
        return
    lo_byte = lo >> 3
    hi_byte = (hi - 1) >> 3
    if lo_byte == hi_byte:
        bits[lo_byte] |= ((1 << (hi - lo)) - 1) << (lo & 7)
        return
    bits[lo_byte] |= (0xFF << (lo & 7)) & 0xFF
    if hi_byte > lo_byte + 1:
        bits[lo_byte + 1 : hi_byte] = b"\xff" * (hi_byte - lo_byte - 1)
    bits[hi_byte] |= (1 << (((hi - 1) & 7) + 1)) - 1


def bit_runs(bits: bytes | bytearray, nblocks: int) -> Iterator[tuple[int, int]]:
    """``(first, stop)`` runs of consecutive set bits of a flat bitmap, below ``nblocks``."""
    return BlockSet.from_bitmap(bits, nblocks).runs()


def encode_bitmap(nblocks: int, block_size: int, covered_seq: int, bits: bytes | bytearray) -> bytes:
    """A format-1 file (what older versions wrote; kept to test that they are still read)."""
    body = _MAGIC_V1 + f"{nblocks} {block_size} {covered_seq}\n".encode() + bytes(bits)
    return body + xxhash.xxh3_64_digest(body)


# -- reading either --------------------------------------------------------------------------


def decode_dirty(data: bytes, nblocks: int, block_size: int) -> tuple[int, BlockSet] | None:
    """``(covered_seq, blocks)`` from a file of either format, or None (damaged, unknown, other geometry)."""
    magic = data[: len(_MAGIC_V2)]
    if len(data) < len(_MAGIC_V2) + 8 or magic not in (_MAGIC_V1, _MAGIC_V2):
        return None
    body, digest = data[:-8], data[-8:]
    if xxhash.xxh3_64_digest(body) != digest:
        return None
    line_end = body.find(b"\n", len(magic))
    if line_end < 0:
        return None
    try:
        head = [int(x) for x in body[len(magic) : line_end].split()]
    except ValueError:
        return None
    if len(head) < 3 or head[0] != nblocks or head[1] != block_size:
        return None
    rest = body[line_end + 1 :]
    if magic == _MAGIC_V1:
        if len(head) != 3 or len(rest) != bitmap_len(nblocks):
            return None
        return head[2], BlockSet.from_bitmap(rest, nblocks)
    try:
        blocks = _decode_v2(rest, head, nblocks)
    except struct.error:
        return None
    return None if blocks is None else (head[2], blocks)


__all__ = ["BITMAP_FILE", "bit_runs", "bitmap_path", "decode_dirty", "encode_bitmap", "encode_dirty", "set_bits"]
