"""The messages of a resync and of an online verify, declared as wire layouts.

A resync: the primary asks for digests (RESYNC_QUERY), the secondary answers
with its digests (RESYNC_REQUEST), the primary sends the blocks that differ
(RESYNC_DATA) and ends with RESYNC_DONE.  A verify compares digests of the two
copies without changing either (VERIFY_QUERY / VERIFY_LIVE_QUERY, answered
by VERIFY_DIGESTS).  Every block range must fit below block 2**64.
"""

from __future__ import annotations

from typing import ClassVar, Self

from colofs.wire.checks import Reader, check_span
from colofs.wire.codes import MessageType
from colofs.wire.fields import BLOCK_SIZE, U16, U32, U64, Blob, ListOf
from colofs.wire.layout import Message, Record, record, trusted_builder, wire


def _check_query(what: str, first_block: int, count: int) -> None:
    if count == 0:
        raise ValueError(f"a {what} must ask for at least one block")
    check_span(first_block, count)


@record(repr=False)
class ResyncRequest(Message):
    """Secondary -> primary: my xxhash digests of blocks ``first_block ..``; send what differs."""

    TYPE: ClassVar[MessageType] = MessageType.RESYNC_REQUEST
    disk: int = wire(U16)
    first_block: int = wire(U64)
    digests: tuple[int, ...] = wire(ListOf(U64, U32), default=())

    def _check(self) -> None:
        check_span(self.first_block, len(self.digests))

    def __repr__(self) -> str:
        return (
            f"ResyncRequest(disk={self.disk}, first_block={self.first_block}, "
            f"digests={len(self.digests)})"
        )


@record(repr=False)
class ResyncBlock(Record):
    """Content of block ``block``; shorter than the block size only at the end of a disk."""

    block: int = wire(U64)
    data: bytes = wire(Blob())

    def __repr__(self) -> str:
        return f"ResyncBlock(block={self.block}, len={len(self.data)})"


_trusted_block = trusted_builder(ResyncBlock)
_BLOCK_HEAD = ResyncBlock.LAYOUT.head  # block, data length


@record(repr=False)
class ResyncData(Message):
    """Primary -> secondary: block contents during a (full or partial) resync.

    The layout is declared like every other message's, but ``encode`` and
    ``_decode`` are written out by hand: a full sync sends the whole disk
    through them, and the generic layout's per-block overhead made encoding
    a thousand 4 KiB blocks several times slower.  The golden-bytes test pins
    both to the declared layout.
    """

    TYPE: ClassVar[MessageType] = MessageType.RESYNC_DATA
    disk: int = wire(U16)
    block_size: int = wire(BLOCK_SIZE)
    blocks: tuple[ResyncBlock, ...] = wire(ListOf(ResyncBlock, U32), default=())

    def _check(self) -> None:
        for b in self.blocks:
            if len(b.data) > self.block_size:
                raise ValueError(
                    f"block {b.block} carries {len(b.data)} bytes, more than the "
                    f"block size {self.block_size}"
                )

    def encode(self) -> bytes:
        pack = _BLOCK_HEAD.pack
        parts: list[bytes | bytearray | memoryview] = [
            _RESYNC_DATA_HEAD.pack(self.disk, self.block_size, len(self.blocks))
        ]
        for b in self.blocks:
            parts.append(pack(b.block, len(b.data)))
            parts.append(b.data)
        return b"".join(parts)

    @classmethod
    def _decode(cls, r: Reader) -> Self:
        disk, block_size, n = r.unpack(_RESYNC_DATA_HEAD, "disk/block_size/blocks length")
        r.count("blocks", n, _BLOCK_HEAD.size)
        blocks = []
        for i in range(n):
            block, length = r.unpack(_BLOCK_HEAD, f"block {i} header")
            blocks.append(_trusted_block(block, r.take(length, f"block {i} data")))
        return cls(disk, block_size, tuple(blocks))

    def __repr__(self) -> str:
        return (
            f"ResyncData(disk={self.disk}, block_size={self.block_size}, blocks={len(self.blocks)})"
        )


_RESYNC_DATA_HEAD = ResyncData.LAYOUT.head  # disk, block_size, count


@record
class ResyncDone(Message):
    """Primary -> secondary: the resync is complete up to write ``seq``."""

    TYPE: ClassVar[MessageType] = MessageType.RESYNC_DONE
    seq: int = wire(U64)


@record
class ResyncQuery(Message):
    """Primary -> secondary: send your digests of blocks ``first_block .. + count`` (answer: RESYNC_REQUEST).

    The primary knows which blocks may differ (its dirty bitmap, or all of
    them for a full sync); the secondary answers with the xxh3 digests of its
    base so that only blocks whose digests differ travel.
    """

    TYPE: ClassVar[MessageType] = MessageType.RESYNC_QUERY
    disk: int = wire(U16)
    first_block: int = wire(U64)
    count: int = wire(U32)

    def _check(self) -> None:
        _check_query("RESYNC_QUERY", self.first_block, self.count)


@record
class VerifyQuery(Message):
    """Primary -> secondary: digests of your last checkpoint's image of these blocks (answer: VERIFY_DIGESTS).

    An online verify compares the two copies at a checkpoint without
    changing either; ``token`` pairs each answer with its query.
    """

    TYPE: ClassVar[MessageType] = MessageType.VERIFY_QUERY
    token: int = wire(U64)
    disk: int = wire(U16)
    first_block: int = wire(U64)
    count: int = wire(U32)

    def _check(self) -> None:
        _check_query("VERIFY_QUERY", self.first_block, self.count)


@record(repr=False)
class VerifyDigests(Message):
    """Secondary -> primary: xxh3 digests of blocks ``first_block ..`` as of write ``seq``.

    Answering VERIFY_QUERY, ``seq`` is the checkpoint whose image was read;
    answering VERIFY_LIVE_QUERY, the last write applied to base when it was read.
    """

    TYPE: ClassVar[MessageType] = MessageType.VERIFY_DIGESTS
    token: int = wire(U64)
    disk: int = wire(U16)
    first_block: int = wire(U64)
    seq: int = wire(U64)
    digests: tuple[int, ...] = wire(ListOf(U64, U32), default=())

    def _check(self) -> None:
        check_span(self.first_block, len(self.digests))

    def __repr__(self) -> str:
        return (
            f"VerifyDigests(token={self.token}, disk={self.disk}, first_block={self.first_block}, "
            f"seq={self.seq}, digests={len(self.digests)})"
        )


@record
class VerifyLiveQuery(Message):
    """Primary -> secondary: once you applied write ``seq``, digests of your base's blocks (answer: VERIFY_DIGESTS).

    Settles blocks the primary keeps rewriting between checkpoints: it read
    them as of write ``seq``, and a block it has not written since must
    read the same in the secondary's base once ``seq`` is applied there.
    """

    TYPE: ClassVar[MessageType] = MessageType.VERIFY_LIVE_QUERY
    token: int = wire(U64)
    disk: int = wire(U16)
    first_block: int = wire(U64)
    count: int = wire(U32)
    seq: int = wire(U64)

    def _check(self) -> None:
        _check_query("VERIFY_LIVE_QUERY", self.first_block, self.count)


__all__ = [
    "ResyncBlock",
    "ResyncData",
    "ResyncDone",
    "ResyncQuery",
    "ResyncRequest",
    "VerifyDigests",
    "VerifyLiveQuery",
    "VerifyQuery",
]
