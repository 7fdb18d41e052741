"""colofs messages: one frozen dataclass per frame type, each field declared once with its wire kind.

Validation, encoding and decoding are derived from the declarations
(:mod:`~colofs.wire.layout`), so an invalid message can neither be sent nor
come out of :func:`decode_message`: the decoder builds messages through the
same constructors and turns any validation failure into
:class:`~colofs.wire.errors.MalformedMessage`.  All integers are
little-endian.  The resync and verify messages live in
:mod:`~colofs.wire.resync_messages`; this module is the one to import.

Choices the layers above rely on:

* Names (node ids, VM names, disk names) are 1..255 bytes of UTF-8 with no
  control characters, no ``/`` and not ``.`` or ``..``: a disk name becomes a
  file name on the secondary, so a hostile or buggy peer must not be able to
  smuggle a path through it.
* A BATCH carries at least one write; write ``i`` has sequence number
  ``first_seq + i`` and the whole range must fit in u64, so the receiver never
  sees an empty or wrapping sequence range.
* Block sizes are non-zero powers of two; RESYNC_DATA blocks may be shorter
  than the block size (the last block of a disk) but never longer.
* Bulk data (``Write.data``, ``ResyncBlock.data``) is copied exactly once out
  of the received payload: the decoder slices a memoryview and takes ``bytes``
  of the slice.
"""

from __future__ import annotations

import struct
from typing import ClassVar, Self

from colofs.wire.checks import Reader, truncate_utf8
from colofs.wire.codes import (
    ATTACHED_KNOWN_FLAGS,
    ATTACHED_NEEDS_FULL_SYNC,
    MAC_LEN,
    MAX_STR_LEN,
    NONCE_LEN,
    U64_MAX,
    ErrorCode,
    MessageType,
    Role,
)
from colofs.wire.errors import MalformedMessage, UnknownType
from colofs.wire.fields import (
    BLOCK_SIZE,
    U8,
    U16,
    U32,
    U64,
    Blob,
    FixedBytes,
    Inline,
    ListOf,
    Text,
)
from colofs.wire.layout import Message, Record, record, trusted_builder, wire
from colofs.wire.resync_messages import (
    ResyncBlock,
    ResyncData,
    ResyncDone,
    ResyncQuery,
    ResyncRequest,
    VerifyDigests,
    VerifyLiveQuery,
    VerifyQuery,
)

NAME = Text(name=True)


@record
class Hello(Message):
    """First message of each side: identity, role and a fresh challenge nonce."""

    TYPE: ClassVar[MessageType] = MessageType.HELLO
    proto: int = wire(U16)
    node_id: str = wire(NAME)
    role: int = wire(U8)
    nonce: bytes = wire(FixedBytes(NONCE_LEN))
    features: int = wire(U32, default=0)

    def _check(self) -> None:
        if self.role not in (Role.PRIMARY, Role.SECONDARY):
            raise ValueError(f"role = {self.role!r} is neither 1 (primary) nor 2 (secondary)")


@record
class Auth(Message):
    """Answer to the peer's challenge: HMAC-SHA256 over its nonce and our identity."""

    TYPE: ClassVar[MessageType] = MessageType.AUTH
    mac: bytes = wire(FixedBytes(MAC_LEN))


@record
class AuthOk(Message):
    """The sender verified the peer's MAC."""

    TYPE: ClassVar[MessageType] = MessageType.AUTH_OK


@record
class DiskInfo(Record):
    """One disk of a VM: its name (a file name on the secondary), size and block size."""

    name: str = wire(NAME, label="disk name")
    size: int = wire(U64, label="disk size")
    block_size: int = wire(BLOCK_SIZE)


@record
class Attach(Message):
    """Primary -> secondary: replicate this VM; disk ``i`` is index ``i`` in writes."""

    TYPE: ClassVar[MessageType] = MessageType.ATTACH
    vm: str = wire(NAME)
    epoch: int = wire(U64)
    next_seq: int = wire(U64)
    disks: tuple[DiskInfo, ...] = wire(ListOf(DiskInfo, U16), default=())

    def _check(self) -> None:
        names = [d.name for d in self.disks]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"disk name {dup!r} appears more than once")


@record
class Attached(Message):
    """Secondary -> primary: where the secondary stands, so the primary can resume."""

    TYPE: ClassVar[MessageType] = MessageType.ATTACHED
    vm: str = wire(NAME)
    epoch: int = wire(U64)
    last_applied: int = wire(U64)
    last_checkpoint: int = wire(U64)
    flags: int = wire(U32, default=0)

    def _check(self) -> None:
        if self.flags & ~ATTACHED_KNOWN_FLAGS:
            raise ValueError(
                f"ATTACHED flags {self.flags:#010x} set undefined bits "
                f"{self.flags & ~ATTACHED_KNOWN_FLAGS:#010x}"
            )

    @property
    def needs_full_sync(self) -> bool:
        """The secondary is new or wiped and must be copied in full."""
        return bool(self.flags & ATTACHED_NEEDS_FULL_SYNC)


@record(repr=False)
class Write(Record):
    """One forwarded primary write: ``data`` at byte ``offset`` of disk ``disk``.

    A decoded BATCH's writes hold read-only views into the frame's one
    decompressed buffer (which they keep alive), not copies of their own.
    """

    disk: int = wire(U16)
    offset: int = wire(U64)
    data: bytes | memoryview = wire(Blob())

    def _check(self) -> None:
        if self.offset + len(self.data) > U64_MAX + 1:
            raise ValueError(f"write of {len(self.data)} bytes at {self.offset} ends past 2**64")

    def __repr__(self) -> str:  # never dump megabytes of data into a log line
        return f"Write(disk={self.disk}, offset={self.offset}, len={len(self.data)})"


_WRITE_HEAD = Write.LAYOUT.head  # disk, offset, data length
_trusted_write = trusted_builder(Write)
"""``Write(disk, offset, data)`` without its checks, for callers that made them already."""


@record(repr=False)
class Batch(Message):
    """Forwarded writes with sequence numbers ``first_seq .. first_seq + len - 1``.

    The layout is declared like every other message's, but ``encode`` and
    ``_decode`` are written out by hand: a 4 MiB batch is a thousand writes and
    more, and the per-write overhead of the generic layout (and of building
    each Write through its checks) halves the decode rate.  The golden-bytes
    test pins both to the declared layout.
    """

    TYPE: ClassVar[MessageType] = MessageType.BATCH
    first_seq: int = wire(U64)
    writes: tuple[Write, ...] = wire(ListOf(Write, U32))

    def _check(self) -> None:
        n = len(self.writes)
        if n == 0:
            raise ValueError("a BATCH must carry at least one write")
        if self.first_seq + n - 1 > U64_MAX:
            raise ValueError(f"{n} writes from sequence {self.first_seq} overflow u64")

    @property
    def last_seq(self) -> int:
        """Sequence number of the last write."""
        return self.first_seq + len(self.writes) - 1

    @property
    def data_bytes(self) -> int:
        """Total bytes of write data carried (not counting per-write headers)."""
        return sum(len(w.data) for w in self.writes)

    def __repr__(self) -> str:
        return (
            f"Batch(first_seq={self.first_seq}, writes={len(self.writes)}, "
            f"data_bytes={self.data_bytes})"
        )

    def encode(self) -> bytes:
        pack = _WRITE_HEAD.pack
        parts: list[bytes | bytearray | memoryview] = [
            _BATCH_HEAD.pack(self.first_seq, len(self.writes))
        ]
        for w in self.writes:
            parts.append(pack(w.disk, w.offset, len(w.data)))
            parts.append(w.data)
        return b"".join(parts)

    @classmethod
    def _decode(cls, r: Reader) -> Self:
        first_seq, n = r.unpack(_BATCH_HEAD, "first_seq/writes length")
        r.count("writes", n, _WRITE_HEAD.size)
        # Stay in local variables; the checks Write's constructor would make are inline.
        buf, pos, end = r.buf, r.pos, r.end
        # A payload that is its own immutable ``bytes`` (a frame just decompressed) is shared:
        # each write's data is a read-only view into it, not a copy. Anything else (the
        # receive buffer, reused for the next frame) is copied.
        share = isinstance(buf.obj, bytes)
        unpack_from, head = _WRITE_HEAD.unpack_from, _WRITE_HEAD.size
        limit = U64_MAX + 1
        writes = []
        append = writes.append
        for i in range(n):
            if end - pos < head:
                r.pos = pos
                r.need(head, f"write {i} header")
            disk, offset, length = unpack_from(buf, pos)
            pos += head
            if end - pos < length:
                r.pos = pos
                r.need(length, f"write {i} data")
            if offset + length > limit:
                raise MalformedMessage(
                    f"BATCH write {i} of {length} bytes at offset {offset} ends past 2**64"
                )
            data = buf[pos : pos + length]
            append(_trusted_write(disk, offset, data if share else bytes(data)))
            pos += length
        r.pos = pos
        return cls(first_seq, tuple(writes))


_BATCH_HEAD = Batch.LAYOUT.head  # first_seq, count


@record
class Ack(Message):
    """Secondary -> primary: every write with sequence <= ``seq`` is durably applied."""

    TYPE: ClassVar[MessageType] = MessageType.ACK
    seq: int = wire(U64)


@record
class Receipt(Message):
    """Secondary -> primary: every write with sequence <= ``seq`` arrived, passed its checks and is
    queued, in order, to be applied (not yet durable: :class:`Ack` says that).

    Sent only on a connection whose primary asked for receipts in its HELLO
    (``FEATURE_RECEIPTS``); a sync write completes on it.
    """

    TYPE: ClassVar[MessageType] = MessageType.RECEIPT
    seq: int = wire(U64)


@record
class Checkpoint(Message):
    """Checkpoint ``id`` taken after write ``seq``; applies to all disks of the VM."""

    TYPE: ClassVar[MessageType] = MessageType.CHECKPOINT
    seq: int = wire(U64)
    id: int = wire(U64)


@record
class CheckpointDone(Message):
    """Secondary -> primary: checkpoint ``id`` at ``seq`` is durable, buffers emptied."""

    TYPE: ClassVar[MessageType] = MessageType.CHECKPOINT_DONE
    seq: int = wire(U64)
    id: int = wire(U64)


@record
class DiskAdd(Message):
    """Primary -> secondary: a disk joins the VM's table at ``index``."""

    TYPE: ClassVar[MessageType] = MessageType.DISK_ADD
    index: int = wire(U16)
    disk: DiskInfo = wire(Inline(DiskInfo))


@record
class Error(Message):
    """The sender refuses something and says why; ``message`` is cut to 255 bytes on encode."""

    TYPE: ClassVar[MessageType] = MessageType.ERROR
    code: int = wire(U16)
    message: str = wire(Text(truncate=True), default="")


@record
class Ping(Message):
    """Liveness probe; the peer answers PONG with the same token."""

    TYPE: ClassVar[MessageType] = MessageType.PING
    token: int = wire(U64)


@record
class Pong(Message):
    """Answer to PING, echoing its token."""

    TYPE: ClassVar[MessageType] = MessageType.PONG
    token: int = wire(U64)


MESSAGE_CLASSES: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Auth,
        AuthOk,
        Attach,
        Attached,
        Batch,
        Ack,
        Checkpoint,
        CheckpointDone,
        DiskAdd,
        ResyncRequest,
        ResyncData,
        ResyncDone,
        Error,
        Ping,
        Pong,
        ResyncQuery,
        VerifyQuery,
        VerifyDigests,
        VerifyLiveQuery,
        Receipt,
    )
}
assert set(MESSAGE_CLASSES) == set(MessageType)


def decode_message(msg_type: int, payload: bytes | bytearray | memoryview) -> Message:
    """Decode one payload of frame type ``msg_type``.

    Raises only :class:`UnknownType` or :class:`MalformedMessage`, whatever the
    bytes are; the payload must be consumed exactly.
    """
    cls = MESSAGE_CLASSES.get(msg_type)
    if cls is None:
        raise UnknownType(f"unknown message type {msg_type}")
    what = cls.TYPE.name
    with memoryview(payload) as view:
        buf = view if view.format == "B" and view.ndim == 1 else view.cast("B")
        r = Reader(buf, what)
        try:
            msg = cls._decode(r)
            r.finish()
        except (ValueError, struct.error) as exc:
            # Field validation in the constructors; re-raise as the peer's fault.
            raise MalformedMessage(f"{what} is invalid: {exc}") from None
        finally:
            if buf is not view:
                buf.release()
    return msg


__all__ = [
    "ATTACHED_NEEDS_FULL_SYNC",
    "MAC_LEN",
    "MAX_STR_LEN",
    "MESSAGE_CLASSES",
    "NONCE_LEN",
    "Ack",
    "Attach",
    "Attached",
    "Auth",
    "AuthOk",
    "Batch",
    "Checkpoint",
    "CheckpointDone",
    "DiskAdd",
    "DiskInfo",
    "Error",
    "ErrorCode",
    "Hello",
    "Message",
    "MessageType",
    "Ping",
    "Pong",
    "Receipt",
    "ResyncBlock",
    "ResyncData",
    "ResyncDone",
    "ResyncQuery",
    "ResyncRequest",
    "Role",
    "VerifyDigests",
    "VerifyLiveQuery",
    "VerifyQuery",
    "Write",
    "decode_message",
    "truncate_utf8",
]
