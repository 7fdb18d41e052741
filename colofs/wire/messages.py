"""colofs messages: one frozen dataclass per frame type, with a binary payload codec.

Every message validates its fields on construction, so an invalid message can
neither be sent nor come out of :func:`decode_message`: the decoder builds
messages through the same constructors and turns any validation failure into
:class:`~colofs.wire.errors.MalformedMessage`.  All integers are little-endian.

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
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Self

from colofs.wire.errors import MalformedMessage, UnknownType


class MessageType(IntEnum):
    """Frame type codes; fixed forever, new types get new numbers."""

    HELLO = 1
    AUTH = 2
    AUTH_OK = 3
    ATTACH = 4
    ATTACHED = 5
    BATCH = 6
    ACK = 7
    CHECKPOINT = 8
    CHECKPOINT_DONE = 9
    DISK_ADD = 10
    RESYNC_REQUEST = 11
    RESYNC_DATA = 12
    RESYNC_DONE = 13
    ERROR = 15
    PING = 16
    PONG = 17
    RESYNC_QUERY = 18
    VERIFY_QUERY = 21
    VERIFY_DIGESTS = 22
    VERIFY_LIVE_QUERY = 23


class Role(IntEnum):
    """The role a node announces in HELLO."""

    PRIMARY = 1
    SECONDARY = 2


class ErrorCode(IntEnum):
    """ERROR codes used by the wire layer; the layers above may define others."""

    AUTH_FAILED = 1
    HANDSHAKE_REFUSED = 2
    PROTOCOL_ERROR = 3


NONCE_LEN = 32
MAC_LEN = 32
MAX_STR_LEN = 255
ATTACHED_NEEDS_FULL_SYNC = 0x1
_ATTACHED_KNOWN_FLAGS = ATTACHED_NEEDS_FULL_SYNC

_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFF_FFFF
_U64_MAX = 0xFFFF_FFFF_FFFF_FFFF

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_U64X2 = struct.Struct("<QQ")
_DISK_TAIL = struct.Struct("<QI")  # size, block_size (after the name)
_ATTACH_TAIL = struct.Struct("<QQH")  # epoch, next_seq, disk count (after vm)
_ATTACHED_TAIL = struct.Struct("<QQQI")  # epoch, last_applied, last_checkpoint, flags
_BATCH_HEAD = struct.Struct("<QI")  # first_seq, count
_WRITE_HEAD = struct.Struct("<HQI")  # disk, offset, data length
_RESYNC_REQ_HEAD = struct.Struct("<HQI")  # disk, first_block, count
_RESYNC_QUERY = struct.Struct("<HQI")  # disk, first_block, count
_RESYNC_DATA_HEAD = struct.Struct("<HII")  # disk, block_size, count
_VERIFY_QUERY = struct.Struct("<QHQI")  # token, disk, first_block, count
_VERIFY_DIGESTS_HEAD = struct.Struct("<QHQQI")  # token, disk, first_block, seq, count
_VERIFY_LIVE_QUERY = struct.Struct("<QHQIQ")  # token, disk, first_block, count, seq
_BLOCK_HEAD = struct.Struct("<QI")  # block, data length
_HELLO_MID = struct.Struct("<B32sI")  # role, nonce, features (after node_id)
_ERROR_HEAD = struct.Struct("<H")


# --------------------------------------------------------------------------- validation


def _check_uint(name: str, value: object, maximum: int) -> None:
    # bool is an int subclass, but a True sequence number is always a bug.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= maximum:
        raise ValueError(f"{name} = {value} is outside 0..{maximum}")


def _check_bytes(name: str, value: object, length: int | None = None) -> None:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"{name} must be bytes, not {type(value).__name__}")
    if isinstance(value, memoryview) and not (
        value.itemsize == 1 and value.ndim == 1 and value.c_contiguous
    ):
        # len() of such a view counts items, not bytes: the length prefix would lie.
        raise TypeError(f"{name} must be a flat byte view, not format {value.format!r}")
    if length is not None and len(value) != length:
        raise ValueError(f"{name} is {len(value)} bytes, expected exactly {length}")


def _check_str(name: str, value: object) -> bytes:
    """Validate a wire string and return its UTF-8 encoding."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    raw = value.encode("utf-8")  # lone surrogates raise UnicodeEncodeError (a ValueError)
    if len(raw) > MAX_STR_LEN:
        raise ValueError(f"{name} is {len(raw)} bytes of UTF-8, at most {MAX_STR_LEN} allowed")
    return raw


def _check_name(name: str, value: object) -> bytes:
    """Validate an identifier that may end up as a file name on the peer."""
    raw = _check_str(name, value)
    text = str(value)
    if not raw:
        raise ValueError(f"{name} must not be empty")
    if text in (".", "..") or "/" in text:
        raise ValueError(f"{name} {text!r} is not a valid name (no '/', '.' or '..')")
    for ch in text:
        if ord(ch) < 0x20 or ch == "\x7f":
            raise ValueError(f"{name} {text!r} contains control character {ord(ch):#04x}")
    return raw


def _check_block_size(name: str, value: object) -> None:
    _check_uint(name, value, _U32_MAX)
    size = int(value)  # type: ignore[call-overload]
    if size == 0 or size & (size - 1):
        raise ValueError(f"{name} = {value} is not a non-zero power of two")


def _as_tuple(obj: object, field: str, items: object, kind: type) -> None:
    """Freeze a list argument into a tuple and type-check its items."""
    if not isinstance(items, tuple):
        if not isinstance(items, Iterable) or isinstance(items, str | bytes):
            raise TypeError(f"{field} must be a sequence of {kind.__name__}")
        items = tuple(items)
        object.__setattr__(obj, field, items)
    for item in items:  # type: ignore[union-attr]
        if not isinstance(item, kind):
            raise TypeError(f"{field} items must be {kind.__name__}, not {type(item).__name__}")


def _str_field(raw: bytes) -> bytes:
    return _U16.pack(len(raw)) + raw


# --------------------------------------------------------------------------- decoding cursor


class _Reader:
    """A bounds-checked cursor over a payload; every shortfall is a MalformedMessage."""

    __slots__ = ("buf", "end", "pos", "what")

    def __init__(self, buf: memoryview, what: str) -> None:
        self.buf = buf
        self.pos = 0
        self.end = len(buf)
        self.what = what

    def need(self, n: int, item: str) -> None:
        left = self.end - self.pos
        if left < n:
            raise MalformedMessage(
                f"{self.what} payload truncated: {item} needs {n} bytes at offset "
                f"{self.pos}, only {left} left"
            )

    def unpack(self, st: struct.Struct, item: str) -> tuple:
        self.need(st.size, item)
        values = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return values

    def take(self, n: int, item: str) -> bytes:
        self.need(n, item)
        data = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return data

    def string(self, item: str) -> str:
        (n,) = self.unpack(_U16, f"{item} length")
        if n > MAX_STR_LEN:
            raise MalformedMessage(
                f"{self.what} {item} is {n} bytes long, at most {MAX_STR_LEN} allowed"
            )
        raw = self.take(n, item)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedMessage(f"{self.what} {item} is not valid UTF-8: {exc}") from None

    def count(self, st: struct.Struct, item: str, n: int, min_item_size: int) -> None:
        """Refuse a count that cannot possibly fit in what is left (before looping)."""
        left = self.end - self.pos
        if n * min_item_size > left:
            raise MalformedMessage(
                f"{self.what} claims {n} {item}, which needs at least {n * min_item_size} "
                f"bytes, but only {left} are left"
            )

    def finish(self) -> None:
        if self.pos != self.end:
            raise MalformedMessage(
                f"{self.what} payload has {self.end - self.pos} trailing bytes after "
                f"the {self.pos} bytes of the message"
            )


# --------------------------------------------------------------------------- messages


class Message:
    """Base of all messages: ``TYPE`` is the frame type, ``encode()`` the payload."""

    __slots__ = ()
    TYPE: ClassVar[MessageType]

    def encode(self) -> bytes:
        """Return the frame payload (before any compression)."""
        raise NotImplementedError

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First message of each side: identity, role and a fresh challenge nonce."""

    TYPE: ClassVar[MessageType] = MessageType.HELLO
    proto: int
    node_id: str
    role: int
    nonce: bytes
    features: int = 0

    def __post_init__(self) -> None:
        _check_uint("proto", self.proto, _U16_MAX)
        _check_name("node_id", self.node_id)
        _check_uint("role", self.role, 0xFF)
        if self.role not in (Role.PRIMARY, Role.SECONDARY):
            raise ValueError(f"role = {self.role!r} is neither 1 (primary) nor 2 (secondary)")
        _check_bytes("nonce", self.nonce, NONCE_LEN)
        _check_uint("features", self.features, _U32_MAX)

    def encode(self) -> bytes:
        return (
            _U16.pack(self.proto)
            + _str_field(self.node_id.encode("utf-8"))
            + _HELLO_MID.pack(self.role, bytes(self.nonce), self.features)
        )

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        (proto,) = r.unpack(_U16, "proto")
        node_id = r.string("node_id")
        role, nonce, features = r.unpack(_HELLO_MID, "role/nonce/features")
        return cls(proto, node_id, role, nonce, features)


@dataclass(frozen=True, slots=True)
class Auth(Message):
    """Answer to the peer's challenge: HMAC-SHA256 over its nonce and our identity."""

    TYPE: ClassVar[MessageType] = MessageType.AUTH
    mac: bytes

    def __post_init__(self) -> None:
        _check_bytes("mac", self.mac, MAC_LEN)

    def encode(self) -> bytes:
        return bytes(self.mac)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(r.take(MAC_LEN, "mac"))


@dataclass(frozen=True, slots=True)
class AuthOk(Message):
    """The sender verified the peer's MAC."""

    TYPE: ClassVar[MessageType] = MessageType.AUTH_OK

    def encode(self) -> bytes:
        return b""

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls()


@dataclass(frozen=True, slots=True)
class DiskInfo:
    """One disk of a VM: its name (a file name on the secondary), size and block size."""

    name: str
    size: int
    block_size: int

    def __post_init__(self) -> None:
        _check_name("disk name", self.name)
        _check_uint("disk size", self.size, _U64_MAX)
        _check_block_size("block_size", self.block_size)

    def encode(self) -> bytes:
        return _str_field(self.name.encode("utf-8")) + _DISK_TAIL.pack(self.size, self.block_size)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        name = r.string("disk name")
        size, block_size = r.unpack(_DISK_TAIL, "disk size/block_size")
        return cls(name, size, block_size)


@dataclass(frozen=True, slots=True)
class Attach(Message):
    """Primary -> secondary: replicate this VM; disk ``i`` is index ``i`` in writes."""

    TYPE: ClassVar[MessageType] = MessageType.ATTACH
    vm: str
    epoch: int
    next_seq: int
    disks: tuple[DiskInfo, ...] = ()

    def __post_init__(self) -> None:
        _check_name("vm", self.vm)
        _check_uint("epoch", self.epoch, _U64_MAX)
        _check_uint("next_seq", self.next_seq, _U64_MAX)
        _as_tuple(self, "disks", self.disks, DiskInfo)
        if len(self.disks) > _U16_MAX:
            raise ValueError(f"{len(self.disks)} disks, at most {_U16_MAX} allowed")
        names = [d.name for d in self.disks]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"disk name {dup!r} appears more than once")

    def encode(self) -> bytes:
        head = _str_field(self.vm.encode("utf-8"))
        tail = _ATTACH_TAIL.pack(self.epoch, self.next_seq, len(self.disks))
        return b"".join([head, tail, *(d.encode() for d in self.disks)])

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        vm = r.string("vm")
        epoch, next_seq, n = r.unpack(_ATTACH_TAIL, "epoch/next_seq/disk count")
        r.count(_DISK_TAIL, "disks", n, 2 + 1 + _DISK_TAIL.size)
        disks = tuple(DiskInfo._decode(r) for _ in range(n))
        return cls(vm, epoch, next_seq, disks)


@dataclass(frozen=True, slots=True)
class Attached(Message):
    """Secondary -> primary: where the secondary stands, so the primary can resume."""

    TYPE: ClassVar[MessageType] = MessageType.ATTACHED
    vm: str
    epoch: int
    last_applied: int
    last_checkpoint: int
    flags: int = 0

    def __post_init__(self) -> None:
        _check_name("vm", self.vm)
        _check_uint("epoch", self.epoch, _U64_MAX)
        _check_uint("last_applied", self.last_applied, _U64_MAX)
        _check_uint("last_checkpoint", self.last_checkpoint, _U64_MAX)
        _check_uint("flags", self.flags, _U32_MAX)
        if self.flags & ~_ATTACHED_KNOWN_FLAGS:
            raise ValueError(
                f"ATTACHED flags {self.flags:#010x} set undefined bits "
                f"{self.flags & ~_ATTACHED_KNOWN_FLAGS:#010x}"
            )

    @property
    def needs_full_sync(self) -> bool:
        """The secondary is new or wiped and must be copied in full."""
        return bool(self.flags & ATTACHED_NEEDS_FULL_SYNC)

    def encode(self) -> bytes:
        return _str_field(self.vm.encode("utf-8")) + _ATTACHED_TAIL.pack(
            self.epoch, self.last_applied, self.last_checkpoint, self.flags
        )

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        vm = r.string("vm")
        return cls(vm, *r.unpack(_ATTACHED_TAIL, "epoch/last_applied/last_checkpoint/flags"))


@dataclass(frozen=True, slots=True, repr=False)
class Write:
    """One forwarded primary write: ``data`` at byte ``offset`` of disk ``disk``."""

    disk: int
    offset: int
    data: bytes

    def __post_init__(self) -> None:
        _check_uint("disk", self.disk, _U16_MAX)
        _check_uint("offset", self.offset, _U64_MAX)
        _check_bytes("data", self.data)
        if len(self.data) > _U32_MAX:
            raise ValueError(f"write of {len(self.data)} bytes exceeds {_U32_MAX}")
        if self.offset + len(self.data) > _U64_MAX + 1:
            raise ValueError(f"write of {len(self.data)} bytes at {self.offset} ends past 2**64")

    def __repr__(self) -> str:  # never dump megabytes of data into a log line
        return f"Write(disk={self.disk}, offset={self.offset}, len={len(self.data)})"


_SET_WRITE_DISK = Write.__dict__["disk"].__set__
_SET_WRITE_OFFSET = Write.__dict__["offset"].__set__
_SET_WRITE_DATA = Write.__dict__["data"].__set__


def _trusted_write(disk: int, offset: int, data: bytes) -> Write:
    """Build a Write from values already range-checked by the decoder.

    Decoding a batch of small writes is dominated by per-object overhead; this
    skips the (frozen) ``__init__`` and the redundant checks, which the decoder
    has done inline.  Three times faster than ``Write(...)``.
    """
    w = object.__new__(Write)
    _SET_WRITE_DISK(w, disk)
    _SET_WRITE_OFFSET(w, offset)
    _SET_WRITE_DATA(w, data)
    return w


@dataclass(frozen=True, slots=True, repr=False)
class Batch(Message):
    """Forwarded writes with sequence numbers ``first_seq .. first_seq + len - 1``."""

    TYPE: ClassVar[MessageType] = MessageType.BATCH
    first_seq: int
    writes: tuple[Write, ...]

    def __post_init__(self) -> None:
        _check_uint("first_seq", self.first_seq, _U64_MAX)
        _as_tuple(self, "writes", self.writes, Write)
        n = len(self.writes)
        if n == 0:
            raise ValueError("a BATCH must carry at least one write")
        if n > _U32_MAX:
            raise ValueError(f"{n} writes in one BATCH, at most {_U32_MAX} allowed")
        if self.first_seq + n - 1 > _U64_MAX:
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
    def _decode(cls, r: _Reader) -> Self:
        first_seq, n = r.unpack(_BATCH_HEAD, "first_seq/count")
        r.count(_WRITE_HEAD, "writes", n, _WRITE_HEAD.size)
        # Hot path: a 4 MiB batch is thousands of writes; stay in local variables.
        buf, pos, end = r.buf, r.pos, r.end
        unpack_from, head = _WRITE_HEAD.unpack_from, _WRITE_HEAD.size
        limit = _U64_MAX + 1
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
            append(_trusted_write(disk, offset, bytes(buf[pos : pos + length])))
            pos += length
        r.pos = pos
        return cls(first_seq, tuple(writes))


@dataclass(frozen=True, slots=True)
class Ack(Message):
    """Secondary -> primary: every write with sequence <= ``seq`` is durably applied."""

    TYPE: ClassVar[MessageType] = MessageType.ACK
    seq: int

    def __post_init__(self) -> None:
        _check_uint("seq", self.seq, _U64_MAX)

    def encode(self) -> bytes:
        return _U64.pack(self.seq)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(*r.unpack(_U64, "seq"))


@dataclass(frozen=True, slots=True)
class Checkpoint(Message):
    """Checkpoint ``id`` taken after write ``seq``; applies to all disks of the VM."""

    TYPE: ClassVar[MessageType] = MessageType.CHECKPOINT
    seq: int
    id: int

    def __post_init__(self) -> None:
        _check_uint("seq", self.seq, _U64_MAX)
        _check_uint("id", self.id, _U64_MAX)

    def encode(self) -> bytes:
        return _U64X2.pack(self.seq, self.id)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(*r.unpack(_U64X2, "seq/id"))


@dataclass(frozen=True, slots=True)
class CheckpointDone(Message):
    """Secondary -> primary: checkpoint ``id`` at ``seq`` is durable, buffers emptied."""

    TYPE: ClassVar[MessageType] = MessageType.CHECKPOINT_DONE
    seq: int
    id: int

    def __post_init__(self) -> None:
        _check_uint("seq", self.seq, _U64_MAX)
        _check_uint("id", self.id, _U64_MAX)

    def encode(self) -> bytes:
        return _U64X2.pack(self.seq, self.id)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(*r.unpack(_U64X2, "seq/id"))


@dataclass(frozen=True, slots=True)
class DiskAdd(Message):
    """Primary -> secondary: a disk joins the VM's table at ``index``."""

    TYPE: ClassVar[MessageType] = MessageType.DISK_ADD
    index: int
    disk: DiskInfo

    def __post_init__(self) -> None:
        _check_uint("index", self.index, _U16_MAX)
        if not isinstance(self.disk, DiskInfo):
            raise TypeError(f"disk must be a DiskInfo, not {type(self.disk).__name__}")

    def encode(self) -> bytes:
        return _U16.pack(self.index) + self.disk.encode()

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        (index,) = r.unpack(_U16, "index")
        return cls(index, DiskInfo._decode(r))


@dataclass(frozen=True, slots=True, repr=False)
class ResyncRequest(Message):
    """Secondary -> primary: my xxhash digests of blocks ``first_block ..``; send what differs."""

    TYPE: ClassVar[MessageType] = MessageType.RESYNC_REQUEST
    disk: int
    first_block: int
    digests: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check_uint("disk", self.disk, _U16_MAX)
        _check_uint("first_block", self.first_block, _U64_MAX)
        if not isinstance(self.digests, tuple):
            object.__setattr__(self, "digests", tuple(self.digests))
        n = len(self.digests)
        if n > _U32_MAX:
            raise ValueError(f"{n} digests, at most {_U32_MAX} allowed")
        if self.first_block + n > _U64_MAX + 1:
            raise ValueError(f"{n} blocks from block {self.first_block} overflow u64")
        if n:
            if not all(type(d) is int for d in self.digests):
                raise TypeError("digests must be ints")
            if min(self.digests) < 0 or max(self.digests) > _U64_MAX:
                raise ValueError("a digest is outside the u64 range")

    def __repr__(self) -> str:
        return (
            f"ResyncRequest(disk={self.disk}, first_block={self.first_block}, "
            f"digests={len(self.digests)})"
        )

    def encode(self) -> bytes:
        n = len(self.digests)
        head = _RESYNC_REQ_HEAD.pack(self.disk, self.first_block, n)
        return head + struct.pack(f"<{n}Q", *self.digests)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        disk, first_block, n = r.unpack(_RESYNC_REQ_HEAD, "disk/first_block/count")
        r.count(_U64, "digests", n, 8)
        digests = struct.unpack_from(f"<{n}Q", r.buf, r.pos)
        r.pos += 8 * n
        return cls(disk, first_block, digests)


@dataclass(frozen=True, slots=True, repr=False)
class ResyncBlock:
    """Content of block ``block``; shorter than the block size only at the end of a disk."""

    block: int
    data: bytes

    def __post_init__(self) -> None:
        _check_uint("block", self.block, _U64_MAX)
        _check_bytes("data", self.data)

    def __repr__(self) -> str:
        return f"ResyncBlock(block={self.block}, len={len(self.data)})"


@dataclass(frozen=True, slots=True, repr=False)
class ResyncData(Message):
    """Primary -> secondary: block contents during a (full or partial) resync."""

    TYPE: ClassVar[MessageType] = MessageType.RESYNC_DATA
    disk: int
    block_size: int
    blocks: tuple[ResyncBlock, ...] = ()

    def __post_init__(self) -> None:
        _check_uint("disk", self.disk, _U16_MAX)
        _check_block_size("block_size", self.block_size)
        _as_tuple(self, "blocks", self.blocks, ResyncBlock)
        if len(self.blocks) > _U32_MAX:
            raise ValueError(f"{len(self.blocks)} blocks, at most {_U32_MAX} allowed")
        for b in self.blocks:
            if len(b.data) > self.block_size:
                raise ValueError(
                    f"block {b.block} carries {len(b.data)} bytes, more than the "
                    f"block size {self.block_size}"
                )

    def __repr__(self) -> str:
        return (
            f"ResyncData(disk={self.disk}, block_size={self.block_size}, blocks={len(self.blocks)})"
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
    def _decode(cls, r: _Reader) -> Self:
        disk, block_size, n = r.unpack(_RESYNC_DATA_HEAD, "disk/block_size/count")
        r.count(_BLOCK_HEAD, "blocks", n, _BLOCK_HEAD.size)
        blocks = []
        for i in range(n):
            block, length = r.unpack(_BLOCK_HEAD, f"block {i} header")
            blocks.append(ResyncBlock(block, r.take(length, f"block {i} data")))
        return cls(disk, block_size, tuple(blocks))


@dataclass(frozen=True, slots=True)
class ResyncDone(Message):
    """Primary -> secondary: the resync is complete up to write ``seq``."""

    TYPE: ClassVar[MessageType] = MessageType.RESYNC_DONE
    seq: int

    def __post_init__(self) -> None:
        _check_uint("seq", self.seq, _U64_MAX)

    def encode(self) -> bytes:
        return _U64.pack(self.seq)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(*r.unpack(_U64, "seq"))


@dataclass(frozen=True, slots=True)
class ResyncQuery(Message):
    """Primary -> secondary: send your digests of blocks ``first_block .. + count`` (answer: RESYNC_REQUEST).

    The primary knows which blocks may differ (its dirty bitmap, or all of
    them for a full sync); the secondary answers with the xxh3 digests of its
    base so that only blocks whose digests differ travel.
    """

    TYPE: ClassVar[MessageType] = MessageType.RESYNC_QUERY
    disk: int
    first_block: int
    count: int

    def __post_init__(self) -> None:
        _check_uint("disk", self.disk, _U16_MAX)
        _check_uint("first_block", self.first_block, _U64_MAX)
        _check_uint("count", self.count, _U32_MAX)
        if self.count == 0:
            raise ValueError("a RESYNC_QUERY must ask for at least one block")
        if self.first_block + self.count > _U64_MAX + 1:
            raise ValueError(f"{self.count} blocks from block {self.first_block} overflow u64")

    def encode(self) -> bytes:
        return _RESYNC_QUERY.pack(self.disk, self.first_block, self.count)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(*r.unpack(_RESYNC_QUERY, "disk/first_block/count"))


@dataclass(frozen=True, slots=True)
class VerifyQuery(Message):
    """Primary -> secondary: digests of your last checkpoint's image of these blocks (answer: VERIFY_DIGESTS).

    An online verify compares the two copies at a checkpoint without
    changing either; ``token`` pairs each answer with its query.
    """

    TYPE: ClassVar[MessageType] = MessageType.VERIFY_QUERY
    token: int
    disk: int
    first_block: int
    count: int

    def __post_init__(self) -> None:
        _check_uint("token", self.token, _U64_MAX)
        _check_uint("disk", self.disk, _U16_MAX)
        _check_uint("first_block", self.first_block, _U64_MAX)
        _check_uint("count", self.count, _U32_MAX)
        if self.count == 0:
            raise ValueError("a VERIFY_QUERY must ask for at least one block")
        if self.first_block + self.count > _U64_MAX + 1:
            raise ValueError(f"{self.count} blocks from block {self.first_block} overflow u64")

    def encode(self) -> bytes:
        return _VERIFY_QUERY.pack(self.token, self.disk, self.first_block, self.count)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(*r.unpack(_VERIFY_QUERY, "token/disk/first_block/count"))


@dataclass(frozen=True, slots=True, repr=False)
class VerifyDigests(Message):
    """Secondary -> primary: xxh3 digests of blocks ``first_block ..`` as of write ``seq``.

    Answering VERIFY_QUERY, ``seq`` is the checkpoint whose image was read;
    answering VERIFY_LIVE_QUERY, the last write applied to base when it was read.
    """

    TYPE: ClassVar[MessageType] = MessageType.VERIFY_DIGESTS
    token: int
    disk: int
    first_block: int
    seq: int
    digests: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check_uint("token", self.token, _U64_MAX)
        _check_uint("disk", self.disk, _U16_MAX)
        _check_uint("first_block", self.first_block, _U64_MAX)
        _check_uint("seq", self.seq, _U64_MAX)
        if not isinstance(self.digests, tuple):
            object.__setattr__(self, "digests", tuple(self.digests))
        n = len(self.digests)
        if n > _U32_MAX:
            raise ValueError(f"{n} digests, at most {_U32_MAX} allowed")
        if self.first_block + n > _U64_MAX + 1:
            raise ValueError(f"{n} blocks from block {self.first_block} overflow u64")
        if n:
            if not all(type(d) is int for d in self.digests):
                raise TypeError("digests must be ints")
            if min(self.digests) < 0 or max(self.digests) > _U64_MAX:
                raise ValueError("a digest is outside the u64 range")

    def __repr__(self) -> str:
        return (
            f"VerifyDigests(token={self.token}, disk={self.disk}, first_block={self.first_block}, "
            f"seq={self.seq}, digests={len(self.digests)})"
        )

    def encode(self) -> bytes:
        n = len(self.digests)
        head = _VERIFY_DIGESTS_HEAD.pack(self.token, self.disk, self.first_block, self.seq, n)
        return head + struct.pack(f"<{n}Q", *self.digests)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        token, disk, first_block, seq, n = r.unpack(_VERIFY_DIGESTS_HEAD, "token/disk/first_block/seq/count")
        r.count(_U64, "digests", n, 8)
        digests = struct.unpack_from(f"<{n}Q", r.buf, r.pos)
        r.pos += 8 * n
        return cls(token, disk, first_block, seq, digests)


@dataclass(frozen=True, slots=True)
class VerifyLiveQuery(Message):
    """Primary -> secondary: once you applied write ``seq``, digests of your base's blocks (answer: VERIFY_DIGESTS).

    Settles blocks the primary keeps rewriting between checkpoints: it read
    them as of write ``seq``, and a block it has not written since must
    read the same in the secondary's base once ``seq`` is applied there.
    """

    TYPE: ClassVar[MessageType] = MessageType.VERIFY_LIVE_QUERY
    token: int
    disk: int
    first_block: int
    count: int
    seq: int

    def __post_init__(self) -> None:
        _check_uint("token", self.token, _U64_MAX)
        _check_uint("disk", self.disk, _U16_MAX)
        _check_uint("first_block", self.first_block, _U64_MAX)
        _check_uint("count", self.count, _U32_MAX)
        _check_uint("seq", self.seq, _U64_MAX)
        if self.count == 0:
            raise ValueError("a VERIFY_LIVE_QUERY must ask for at least one block")
        if self.first_block + self.count > _U64_MAX + 1:
            raise ValueError(f"{self.count} blocks from block {self.first_block} overflow u64")

    def encode(self) -> bytes:
        return _VERIFY_LIVE_QUERY.pack(self.token, self.disk, self.first_block, self.count, self.seq)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(*r.unpack(_VERIFY_LIVE_QUERY, "token/disk/first_block/count/seq"))


def truncate_utf8(text: str, limit: int = MAX_STR_LEN) -> bytes:
    """Encode ``text`` as UTF-8 cut to at most ``limit`` bytes on a character boundary.

    Unencodable characters (lone surrogates from ``surrogateescape`` file names)
    become ``?`` so that reporting an error can never itself fail.
    """
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return raw
    cut = limit
    while cut > 0 and raw[cut] & 0xC0 == 0x80:  # raw[cut] continues a character
        cut -= 1
    return raw[:cut]


@dataclass(frozen=True, slots=True)
class Error(Message):
    """The sender refuses something and says why; ``message`` is cut to 255 bytes on encode."""

    TYPE: ClassVar[MessageType] = MessageType.ERROR
    code: int
    message: str = ""

    def __post_init__(self) -> None:
        _check_uint("code", self.code, _U16_MAX)
        if not isinstance(self.message, str):
            raise TypeError(f"message must be a str, not {type(self.message).__name__}")

    def encode(self) -> bytes:
        return _ERROR_HEAD.pack(self.code) + _str_field(truncate_utf8(self.message))

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        (code,) = r.unpack(_ERROR_HEAD, "code")
        return cls(code, r.string("message"))


@dataclass(frozen=True, slots=True)
class Ping(Message):
    """Liveness probe; the peer answers PONG with the same token."""

    TYPE: ClassVar[MessageType] = MessageType.PING
    token: int

    def __post_init__(self) -> None:
        _check_uint("token", self.token, _U64_MAX)

    def encode(self) -> bytes:
        return _U64.pack(self.token)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(*r.unpack(_U64, "token"))


@dataclass(frozen=True, slots=True)
class Pong(Message):
    """Answer to PING, echoing its token."""

    TYPE: ClassVar[MessageType] = MessageType.PONG
    token: int

    def __post_init__(self) -> None:
        _check_uint("token", self.token, _U64_MAX)

    def encode(self) -> bytes:
        return _U64.pack(self.token)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(*r.unpack(_U64, "token"))


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
        r = _Reader(buf, what)
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
