"""The colofs frame codec: 24-byte header, optional lz4 block compression, xxh3 digest, MAC.

Header layout (little-endian)::

    0  magic     4s   b"COLF"
    4  version   u8   1
    5  type      u8   MessageType
    6  flags     u16  bit 0: payload is an lz4 block;
                      bit 1: a 16-byte MAC tag follows the payload; other bits must be 0
    8  wire_len  u32  payload bytes that follow the header (the tag not counted)
    12 raw_len   u32  payload bytes after decompression (== wire_len if not compressed)
    16 digest    u64  xxh3_64(header[0:16] + payload as on the wire)

The digest catches damage; it has no key, so anyone on the path can
recompute it.  With a shared key, every frame after the handshake also
carries a MAC tag (:mod:`~colofs.wire.mac`) that a decoder given the
session's receive MAC (:meth:`FrameDecoder.require_mac`) checks before
anything else of the payload is looked at; from then on a frame without the
tag is refused too.

The decoder checks the header in a fixed order -- magic, version, type,
flags, wire_len limit, raw_len limit, length consistency -- and only then
waits for the payload.  That way an oversized frame or an lz4 bomb is refused
from 24 bytes, before this node buffers or inflates anything.  The digest
covers the bytes as sent, so corruption is caught before lz4 ever sees them.

Choices beyond the bare layout:

* A compressed frame must be strictly smaller than its raw size (the encoder
  only keeps lz4 output that saves bytes), and ``raw_len`` must equal
  ``wire_len`` otherwise; both inconsistencies raise :class:`BadCompression`.
* Any message type may arrive compressed; by default the encoder compresses
  the two bulk-data types, BATCH and RESYNC_DATA (a full resync of a mostly
  empty disk is where lz4 pays off most).
* After a decoding error the :class:`FrameDecoder` is poisoned: framing is
  lost, so every later call re-raises the same error.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NoReturn

import lz4.block
import xxhash

from colofs.wire.errors import (
    BadCompression,
    BadFlags,
    BadMac,
    BadMagic,
    BadVersion,
    ConnectionClosed,
    DecompressionBomb,
    DigestMismatch,
    FrameTooLarge,
    MalformedMessage,
    ProtocolError,
    TruncatedFrame,
    UnknownType,
)
from colofs.wire.mac import TAG_LEN, FrameMac
from colofs.wire.messages import Message, MessageType, decode_message

MAGIC = b"COLF"
FRAME_VERSION = 1
HEADER_LEN = 24
FLAG_LZ4 = 0x0001
FLAG_MAC = 0x0002
KNOWN_FLAGS = FLAG_LZ4 | FLAG_MAC
DEFAULT_MAX_WIRE_LEN = 32 * 1024 * 1024
DEFAULT_MAX_RAW_LEN = 64 * 1024 * 1024
COMPRESSED_BY_DEFAULT = frozenset({MessageType.BATCH, MessageType.RESYNC_DATA})

_U32_MAX = 0xFFFF_FFFF
_HEADER = struct.Struct("<4sBBHIIQ")
_PREFIX = struct.Struct("<4sBBHII")  # the digested part, header[0:16]
_DIGEST = struct.Struct("<Q")
_KNOWN_TYPES = frozenset(int(t) for t in MessageType)
KEEP_BUFFER = 2 * 1024 * 1024
"""A decoder's receive buffer larger than this is dropped, not reused, once it is decoded."""
_MIN_GROWTH = 4096

assert _HEADER.size == HEADER_LEN and _PREFIX.size == 16


def _check_limit(name: str, value: int) -> None:
    if not isinstance(value, int) or not 0 <= value <= _U32_MAX:
        raise ValueError(f"{name} must be an int in 0..{_U32_MAX}, got {value!r}")


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """A parsed and validated frame header."""

    type: MessageType
    flags: int
    wire_len: int
    raw_len: int
    digest: int

    @property
    def compressed(self) -> bool:
        """The payload is an lz4 block."""
        return bool(self.flags & FLAG_LZ4)

    @property
    def authenticated(self) -> bool:
        """A MAC tag follows the payload."""
        return bool(self.flags & FLAG_MAC)

    @property
    def frame_len(self) -> int:
        """Header, payload and tag (if any) as on the wire."""
        return HEADER_LEN + self.wire_len + (TAG_LEN if self.flags & FLAG_MAC else 0)


def parse_header(
    header: bytes | bytearray | memoryview,
    *,
    max_wire_len: int = DEFAULT_MAX_WIRE_LEN,
    max_raw_len: int = DEFAULT_MAX_RAW_LEN,
) -> FrameHeader:
    """Validate the 24 header bytes; raises a :class:`ProtocolError` subclass."""
    if len(header) != HEADER_LEN:
        raise TruncatedFrame(f"frame header is {len(header)} bytes, expected {HEADER_LEN}")
    magic, version, mtype, flags, wire_len, raw_len, digest = _HEADER.unpack(header)
    if magic != MAGIC:
        raise BadMagic(f"bad frame magic {magic!r}, expected {MAGIC!r}")
    if version != FRAME_VERSION:
        raise BadVersion(
            f"frame version {version} is not supported (this node speaks {FRAME_VERSION})"
        )
    if mtype not in _KNOWN_TYPES:
        raise UnknownType(f"unknown frame type {mtype}")
    if flags & ~KNOWN_FLAGS:
        raise BadFlags(f"frame flags {flags:#06x} set undefined bits {flags & ~KNOWN_FLAGS:#06x}")
    compressed = bool(flags & FLAG_LZ4)
    if wire_len > max_wire_len:
        raise FrameTooLarge(f"frame payload {wire_len} bytes exceeds the limit of {max_wire_len}")
    if raw_len > max_raw_len:
        if compressed:
            raise DecompressionBomb(
                f"compressed frame of {wire_len} bytes claims {raw_len} bytes decompressed, "
                f"exceeding the limit of {max_raw_len}"
            )
        raise FrameTooLarge(f"frame raw size {raw_len} bytes exceeds the limit of {max_raw_len}")
    if compressed:
        if wire_len >= raw_len:
            raise BadCompression(
                f"compressed payload of {wire_len} bytes is not smaller than its declared "
                f"raw size of {raw_len} bytes"
            )
    elif raw_len != wire_len:
        raise BadCompression(
            f"uncompressed frame declares raw size {raw_len} but carries {wire_len} bytes"
        )
    return FrameHeader(MessageType(mtype), flags, wire_len, raw_len, digest)


def encode_frame_parts(
    msg: Message, compress: bool | None = None, *, mac: bool = False
) -> tuple[bytes, bytes]:
    """Return ``(header, payload)`` for ``msg``, ready to be written back to back.

    Kept as two buffers so a multi-megabyte batch is not copied once more
    just to prepend 24 bytes.  ``compress=None`` compresses the bulk-data types
    (:data:`COMPRESSED_BY_DEFAULT`); lz4 output is kept only if it is smaller.
    ``mac=True`` sets :data:`FLAG_MAC`: the caller sends the tag after the payload.
    """
    payload = msg.encode()
    raw_len = len(payload)
    if raw_len > _U32_MAX:
        raise FrameTooLarge(
            f"{msg.TYPE.name} payload {raw_len} bytes exceeds the limit of {_U32_MAX}"
        )
    if compress is None:
        compress = msg.TYPE in COMPRESSED_BY_DEFAULT
    flags = FLAG_MAC if mac else 0
    if compress and raw_len:
        packed = lz4.block.compress(payload, store_size=False)
        if len(packed) < raw_len:
            payload, flags = packed, flags | FLAG_LZ4
    prefix = _PREFIX.pack(MAGIC, FRAME_VERSION, msg.TYPE, flags, len(payload), raw_len)
    digest = xxhash.xxh3_64(prefix)
    digest.update(payload)
    return prefix + _DIGEST.pack(digest.intdigest()), payload


def encode_frame(msg: Message, compress: bool | None = None) -> bytes:
    """Return the complete frame for ``msg`` as one buffer (see :func:`encode_frame_parts`)."""
    header, payload = encode_frame_parts(msg, compress)
    return header + payload


class FrameDecoder:
    """Incremental (sans-I/O) frame decoder: feed bytes, pull messages.

    The header is validated as soon as its 24 bytes are buffered (the magic as
    soon as its first byte is), so a caller that feeds only what :attr:`needed`
    asks for never holds more than one frame within the limits.  Uncompressed
    payloads are decoded straight out of the receive buffer; the only copy of
    bulk data is the one each message field keeps, except a BATCH's writes,
    which share one buffer per frame (the decompressed payload, or one copy).

    Bytes come in either by :meth:`feed` (a copy of what the transport
    returned) or straight from the socket: :meth:`receive_buffer` lends the
    free space after the buffered bytes for a ``recv_into`` and
    :meth:`received` counts what it wrote, so a frame's payload is copied
    out of the kernel once, not once more into this buffer. The buffer is
    reused once every frame in it is decoded (decoded messages hold no view
    of it), up to :data:`KEEP_BUFFER` bytes.
    """

    __slots__ = ("_buf", "_end", "_error", "_header", "_mac", "_pos", "max_raw_len", "max_wire_len")

    def __init__(
        self,
        *,
        max_wire_len: int = DEFAULT_MAX_WIRE_LEN,
        max_raw_len: int = DEFAULT_MAX_RAW_LEN,
    ) -> None:
        _check_limit("max_wire_len", max_wire_len)
        _check_limit("max_raw_len", max_raw_len)
        self.max_wire_len = max_wire_len
        self.max_raw_len = max_raw_len
        self._buf = bytearray()
        self._pos = 0
        self._end = 0
        self._header: FrameHeader | None = None
        self._error: ProtocolError | None = None
        self._mac: FrameMac | None = None

    def require_mac(self, mac: FrameMac) -> None:
        """From the next frame on, accept only frames whose tag ``mac`` verifies.

        Call it on a frame boundary (right after the handshake's last frame was
        returned); frames already decoded are not affected.
        """
        if self._header is not None:
            raise RuntimeError("require_mac() called in the middle of a frame")
        self._mac = mac

    @property
    def authenticated(self) -> bool:
        """Frames must carry a MAC tag (:meth:`require_mac` was called)."""
        return self._mac is not None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed by a decoded frame."""
        return self._end - self._pos

    @property
    def needed(self) -> int:
        """Bytes still missing before the next header or frame is complete (at least 1)."""
        if self._header is None:
            return max(HEADER_LEN - self.buffered, 1)
        return max(self._header.frame_len - self.buffered, 1)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes."""
        n = len(data)
        if n == 0:
            if self._error is not None:
                raise self._error
            return
        with self.receive_buffer(n) as view:
            view[:] = data
        self._end += n

    def receive_buffer(self, size: int) -> memoryview:
        """Room for ``size`` more bytes after the buffered ones, to receive into.

        Release the view before anything else is called on this decoder, then
        say with :meth:`received` how many bytes were written into it.
        """
        if self._error is not None:
            raise self._error
        if size < 1:
            raise ValueError(f"receive_buffer() needs a size of at least 1, got {size}")
        buf, pos, end = self._buf, self._pos, self._end
        if pos == end:  # every byte decoded: start over at the front
            pos = end = self._pos = self._end = 0
            if len(buf) > KEEP_BUFFER and size <= KEEP_BUFFER:
                buf = self._buf = bytearray()
        if len(buf) - end < size:
            # A fresh buffer, never a resize in place (that would fail while a view
            # lives); the bytes carried over are at most one unfinished frame.
            tail = end - pos
            fresh = bytearray(tail + max(size, _MIN_GROWTH))
            fresh[:tail] = buf[pos:end]
            buf, self._buf, self._pos, self._end, end = fresh, fresh, 0, tail, tail
        return memoryview(buf)[end : end + size]

    def received(self, n: int) -> None:
        """Count ``n`` bytes written into the view :meth:`receive_buffer` returned."""
        if not 0 <= n <= len(self._buf) - self._end:
            raise ValueError(f"received({n}) is more than the room lent")
        self._end += n

    def next_message(self) -> Message | None:
        """Decode and return the next complete message, or ``None`` if more bytes are needed.

        Raises only :class:`ProtocolError` subclasses, whatever was fed.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except ProtocolError as exc:
            self._error = exc
            raise

    def _next(self) -> Message | None:
        buf, pos = self._buf, self._pos
        avail = self._end - pos
        header = self._header
        if header is None:
            if avail == 0:
                return None
            n = min(avail, len(MAGIC))
            if buf[pos : pos + n] != MAGIC[:n]:
                got = bytes(buf[pos : pos + n])
                hint = ""
                if got[:1] == b"\x16":  # a TLS handshake record
                    hint = " (the peer starts TLS: it has --tls-* options and this node has none)"
                raise BadMagic(f"bad frame magic {got!r}, expected {MAGIC!r}{hint}")
            if avail < HEADER_LEN:
                return None
            header = parse_header(
                buf[pos : pos + HEADER_LEN],
                max_wire_len=self.max_wire_len,
                max_raw_len=self.max_raw_len,
            )
            self._header = header
        if avail < header.frame_len:
            return None
        start = pos + HEADER_LEN
        end = start + header.wire_len
        with memoryview(buf) as view:
            payload = view[start:end]
            try:
                digest = xxhash.xxh3_64(view[pos : pos + 16])
                digest.update(payload)
                computed = digest.intdigest()
                if header.authenticated or self._mac is not None:
                    self._check_mac(header, view[pos:start], payload, view[end : end + TAG_LEN],
                                    computed == header.digest)
                    end += TAG_LEN
                if computed != header.digest:
                    raise DigestMismatch(
                        f"{header.type.name} frame digest {header.digest:#018x} does not match "
                        f"the computed {computed:#018x} over {header.wire_len} payload bytes"
                    )
                if header.compressed:
                    msg = decode_message(header.type, _decompress(payload, header))
                elif header.type == MessageType.BATCH:
                    # One copy of the whole payload, which its writes then share (see
                    # Batch._decode), rather than one small allocation per write.
                    msg = decode_message(header.type, bytes(payload))
                else:
                    msg = decode_message(header.type, payload)
            finally:
                payload.release()
        self._pos = end
        self._header = None
        return msg

    def _check_mac(self, header: FrameHeader, raw_header: memoryview, payload: memoryview,
                   tag: memoryview, digest_ok: bool) -> None:
        mac = self._mac
        name = header.type.name
        if mac is None:
            raise BadMac(f"{name} frame carries a MAC but no session key was agreed")
        if not header.authenticated:
            raise BadMac(
                f"{name} frame #{mac.counter} after the handshake carries no MAC; "
                f"every frame of an authenticated session must"
            )
        if not mac.verify(raw_header, payload, tag):
            how = ("its xxh3 digest matches, so it was altered or forged on purpose, "
                   "or replayed, reordered or spliced, or a frame before it was dropped"
                   if digest_ok else "it is also corrupt (xxh3 digest mismatch)")
            raise BadMac(
                f"{name} frame #{mac.counter} ({header.wire_len} payload bytes) fails "
                f"authentication: {how}"
            )

    def feed_eof(self) -> NoReturn:
        """Report the end of the stream; always raises.

        :class:`ConnectionClosed` if it came on a frame boundary,
        :class:`TruncatedFrame` if it cut a frame short.
        """
        if self._error is not None:
            raise self._error
        avail = self.buffered
        if avail == 0:
            raise ConnectionClosed("peer closed the connection")
        if self._header is None:
            raise TruncatedFrame(
                f"connection closed after {avail} of the {HEADER_LEN} frame header bytes"
            )
        header = self._header
        raise TruncatedFrame(
            f"connection closed {avail} bytes into a {header.frame_len}-byte "
            f"{header.type.name} frame"
        )


def _decompress(payload: memoryview, header: FrameHeader) -> bytes:
    try:
        raw = lz4.block.decompress(payload, uncompressed_size=header.raw_len)
    except lz4.block.LZ4BlockError as exc:
        raise BadCompression(
            f"{header.type.name} lz4 payload of {header.wire_len} bytes does not decompress "
            f"into {header.raw_len} bytes: {exc}"
        ) from None
    if len(raw) != header.raw_len:
        raise BadCompression(
            f"{header.type.name} lz4 payload decompressed to {len(raw)} bytes, "
            f"the header says {header.raw_len}"
        )
    return raw


def decode_frame(
    data: bytes | bytearray | memoryview,
    *,
    max_wire_len: int = DEFAULT_MAX_WIRE_LEN,
    max_raw_len: int = DEFAULT_MAX_RAW_LEN,
) -> Message:
    """Decode a buffer holding exactly one complete frame."""
    decoder = FrameDecoder(max_wire_len=max_wire_len, max_raw_len=max_raw_len)
    decoder.feed(data)
    msg = decoder.next_message()
    if msg is None:
        decoder.feed_eof()
    if decoder.buffered:
        raise MalformedMessage(f"{decoder.buffered} bytes follow the frame")
    return msg


__all__ = [
    "COMPRESSED_BY_DEFAULT",
    "DEFAULT_MAX_RAW_LEN",
    "DEFAULT_MAX_WIRE_LEN",
    "FLAG_LZ4",
    "FLAG_MAC",
    "FRAME_VERSION",
    "HEADER_LEN",
    "KNOWN_FLAGS",
    "MAGIC",
    "FrameDecoder",
    "FrameHeader",
    "decode_frame",
    "encode_frame",
    "encode_frame_parts",
    "parse_header",
]
