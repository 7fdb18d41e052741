"""Exceptions raised by the colofs wire layer.

Everything that can go wrong while decoding bytes from the peer is a
:class:`ProtocolError`, so a connection handler needs exactly one ``except``
clause to refuse a misbehaving peer; the subclasses let it log (or count) the
precise reason.  Transport failures of the underlying trio stream
(``trio.BrokenResourceError``, ``OSError``) are deliberately *not* wrapped:
they say nothing about the peer's honesty and keep their own tracebacks.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """The peer sent something the protocol does not allow; drop the connection."""


class BadMagic(ProtocolError):
    """The bytes do not start with the frame magic (not a colofs peer, or framing lost)."""


class BadVersion(ProtocolError):
    """The frame or handshake carries a protocol version this node does not speak."""


class UnknownType(ProtocolError):
    """The frame's message type code is not one this node knows."""


class BadFlags(ProtocolError):
    """The frame sets flag bits that are not defined."""


class FrameTooLarge(ProtocolError):
    """A frame's payload exceeds the configured size limit.

    Also raised by ``FrameStream.send`` before writing a frame the peer (with
    the same limits) would refuse, so a caller can split its batch instead.
    """


class DecompressionBomb(ProtocolError):
    """A compressed frame claims a decompressed size beyond the limit.

    Raised from the header alone, before the payload is read, so a peer cannot
    make this node allocate or inflate an arbitrarily large buffer.
    """


class DigestMismatch(ProtocolError):
    """The xxh3 digest in the header does not match the header and payload."""


class BadMac(ProtocolError):
    """A frame after the handshake fails its MAC, or lacks one.

    It was altered, injected, replayed, reordered or spliced on the way, or a
    frame before it was dropped: nothing of it may be used.
    """


class BadCompression(ProtocolError):
    """The compression metadata or the lz4 block itself is inconsistent.

    Covers a corrupt lz4 block, a block that inflates to the wrong size, a
    "compressed" payload not smaller than its raw size, and an uncompressed
    frame whose raw_len differs from its wire_len.
    """


class MalformedMessage(ProtocolError):
    """The (valid) frame's payload does not decode to a well-formed message."""


class AuthError(ProtocolError):
    """The authentication handshake failed."""


class WrongKey(AuthError):
    """The peer's MAC did not verify, or the peer rejected ours: the keys differ."""


class ReflectedChallenge(AuthError):
    """The peer replayed one of our own nonces or claims our node id."""


class UnexpectedMessage(AuthError):
    """The peer sent a message other than the one the handshake expects next."""


class ConnectionClosed(ProtocolError):
    """The peer closed the stream cleanly, on a frame boundary."""


class TruncatedFrame(ProtocolError):
    """The stream ended in the middle of a frame.

    Deliberately not a :class:`ConnectionClosed`: code that treats a clean
    close as a normal end of session must not also swallow a cut-off frame.
    """


__all__ = [
    "AuthError",
    "BadCompression",
    "BadFlags",
    "BadMac",
    "BadMagic",
    "BadVersion",
    "ConnectionClosed",
    "DecompressionBomb",
    "DigestMismatch",
    "FrameTooLarge",
    "MalformedMessage",
    "ProtocolError",
    "ReflectedChallenge",
    "TruncatedFrame",
    "UnexpectedMessage",
    "UnknownType",
    "WrongKey",
]
