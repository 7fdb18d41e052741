"""Block arithmetic every layer shares: which blocks a byte range touches, what a range or block size may be.

One place for the rules, so the disk, its snapshots, the stream, the NBD
exports and the control plane cannot disagree about them.
"""

from __future__ import annotations

from colofs.core.errors import BadArgument, BadRange

MIN_BLOCK = 512
MAX_BLOCK = 1 << 20


def block_span(offset: int, length: int, shift: int) -> tuple[int, int]:
    """The blocks ``[first, stop)`` that ``length > 0`` bytes at ``offset`` touch, blocks being ``1 << shift`` bytes."""
    return offset >> shift, ((offset + length - 1) >> shift) + 1


def block_count(size: int, shift: int) -> int:
    """Blocks of ``1 << shift`` bytes needed to hold ``size`` bytes (the last one may be partial)."""
    return (size + (1 << shift) - 1) >> shift


def check_range(label: str, size: int, offset: int, length: int, size_is: str = "the size") -> None:
    """Refuse a request that is negative or ends past ``size``, naming the image ``label`` (and ``size_is``)."""
    if offset < 0 or length < 0:
        raise BadRange(f"{label}: negative offset or length ({offset}, {length})")
    if offset + length > size:
        raise BadRange(f"{label}: {length} bytes at {offset} end past {size_is} of {size}")


def block_size_ok(block_size: int) -> bool:
    """Whether disks may have blocks of ``block_size`` bytes: a power of two from MIN_BLOCK to MAX_BLOCK."""
    return not block_size & (block_size - 1) and MIN_BLOCK <= block_size <= MAX_BLOCK


def check_block_size(label: str, block_size: int) -> None:
    """Raise :class:`BadArgument` naming ``label`` unless :func:`block_size_ok`."""
    if not block_size_ok(block_size):
        raise BadArgument(
            f"{label}: block size must be a power of two from {MIN_BLOCK} to {MAX_BLOCK}, not {block_size}"
        )
