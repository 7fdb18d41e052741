"""Per-frame authentication after the handshake: session keys and the frame MAC.

The handshake proves both nodes hold the shared key; this module makes every
later frame prove it too, so a node on the path that recomputes the (keyless)
xxh3 digest still cannot alter, inject, replay, reorder, drop or splice frames.

Session keys (HKDF-SHA256, RFC 5869), one per direction::

    prk      = HKDF-Extract(salt = nonce_initiator + nonce_responder, ikm = shared key)
    key_i2r  = HKDF-Expand(prk, CONTEXT + b"i2r" + ids, 32)
    key_r2i  = HKDF-Expand(prk, CONTEXT + b"r2i" + ids, 32)

where ``ids`` is each node id (initiator first) prefixed by its length. Both
nonces are fresh per connection, so keys never repeat across connections and
a frame recorded on one connection is worthless on another; separate keys
per direction mean a frame cannot be reflected back to its sender.

Frame MAC (HMAC-SHA256 truncated to 16 bytes), sent after the payload::

    tag = HMAC(direction key, payload + header + counter as u64 little-endian)[:16]

``counter`` is the frame's number in its direction since the handshake
(0, 1, 2, ...). It is not sent: each side counts, so a replayed, reordered,
dropped or spliced frame is verified against the wrong number and refused.
The payload comes first so a multi-megabyte payload can be hashed in a
worker thread before its place in the stream (its counter) is known; the
input is unambiguous because the header is fixed-size and holds the
payload length.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

TAG_LEN = 16
"""Bytes of MAC tag after each authenticated frame's payload."""

KDF_CONTEXT = b"colofs-frame-keys-v2\0"
SESSION_KEY_LEN = 32
_COUNTER_MAX = 0xFFFF_FFFF_FFFF_FFFF
_HASH = "sha256"


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF (RFC 5869) with SHA-256: extract a pseudorandom key, expand it to ``length`` bytes."""
    if not 0 < length <= 255 * 32:
        raise ValueError(f"HKDF-SHA256 output must be 1..{255 * 32} bytes, not {length}")
    prk = hmac.digest(salt, ikm, _HASH)
    out = b""
    block = b""
    i = 1
    while len(out) < length:
        block = hmac.digest(prk, block + info + bytes([i]), _HASH)
        out += block
        i += 1
    return out[:length]


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """One connection's frame keys, as seen from one side."""

    send: bytes
    receive: bytes


def derive_session_keys(
    key: bytes,
    initiator_nonce: bytes,
    responder_nonce: bytes,
    initiator_id: str,
    responder_id: str,
    *,
    initiator: bool,
) -> SessionKeys:
    """Both directions' frame keys for this connection (see the module docstring)."""
    ids = b""
    for node in (initiator_id, responder_id):
        raw = node.encode("utf-8")
        ids += len(raw).to_bytes(2, "little") + raw
    salt = bytes(initiator_nonce) + bytes(responder_nonce)
    i2r = hkdf_sha256(bytes(key), salt, KDF_CONTEXT + b"i2r" + ids, SESSION_KEY_LEN)
    r2i = hkdf_sha256(bytes(key), salt, KDF_CONTEXT + b"r2i" + ids, SESSION_KEY_LEN)
    return SessionKeys(i2r, r2i) if initiator else SessionKeys(r2i, i2r)


class FrameMac:
    """One direction's MAC: its key and the number of the next frame.

    The sender and the receiver of a direction each hold one with the same
    key; both count frames, so the counter never travels.
    """

    __slots__ = ("_keyed", "counter")

    def __init__(self, key: bytes) -> None:
        if len(key) != SESSION_KEY_LEN:
            raise ValueError(f"a frame key is {SESSION_KEY_LEN} bytes, not {len(key)}")
        self._keyed = hmac.new(bytes(key), digestmod=_HASH)
        """Keyed once; each frame starts from a copy (cheaper than keying per frame)."""
        self.counter = 0

    def absorb(self, payload: bytes | bytearray | memoryview) -> hmac.HMAC:
        """Start a frame's MAC over its payload; safe in a worker thread (touches no counter)."""
        partial = self._keyed.copy()
        partial.update(payload)
        return partial

    def seal(self, partial: hmac.HMAC, header: bytes) -> bytes:
        """Finish the MAC of the next frame in this direction and count it."""
        tag = self._finish(partial, header, self.counter)
        self.counter += 1
        return tag

    def verify(self, header: bytes | memoryview, payload: bytes | memoryview, tag: bytes | memoryview) -> bool:
        """Whether ``tag`` authenticates this frame as the next one; counts it if so."""
        expected = self._finish(self.absorb(payload), bytes(header), self.counter)
        if not hmac.compare_digest(expected, bytes(tag)):
            return False
        self.counter += 1
        return True

    @staticmethod
    def _finish(partial: hmac.HMAC, header: bytes, counter: int) -> bytes:
        if counter > _COUNTER_MAX:
            raise OverflowError("2**64 frames in one direction: reconnect for fresh keys")
        partial.update(header + counter.to_bytes(8, "little"))
        return partial.digest()[:TAG_LEN]


__all__ = [
    "KDF_CONTEXT",
    "SESSION_KEY_LEN",
    "TAG_LEN",
    "FrameMac",
    "SessionKeys",
    "derive_session_keys",
    "hkdf_sha256",
]
