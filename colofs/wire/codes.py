"""Numbers fixed by the colofs wire protocol: frame type codes, roles, error codes, sizes.

Kept apart from the message classes so that every message module, and the
layers above, can name them without importing the codec.
"""

from __future__ import annotations

from enum import IntEnum


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
    RECEIPT = 24


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
ATTACHED_KNOWN_FLAGS = ATTACHED_NEEDS_FULL_SYNC

U16_MAX = 0xFFFF
U32_MAX = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF

__all__ = [
    "ATTACHED_KNOWN_FLAGS",
    "ATTACHED_NEEDS_FULL_SYNC",
    "MAC_LEN",
    "MAX_STR_LEN",
    "NONCE_LEN",
    "U16_MAX",
    "U32_MAX",
    "U64_MAX",
    "ErrorCode",
    "MessageType",
    "Role",
]
