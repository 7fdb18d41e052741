"""Errors of the replication engine, and the ERROR codes it puts on the wire.

A peer that breaks the protocol raises a :class:`ReplProtocolError` (a
:class:`~colofs.wire.errors.ProtocolError`, so one ``except`` clause covers
both framing and meaning); the session refuses it with the code it carries
and closes the connection. Errors the caller of the engine sees (a
checkpoint that cannot complete, a bad configuration) are
:class:`~colofs.core.errors.ColofsError` subclasses, like the core's.
"""

from __future__ import annotations

from enum import IntEnum

from colofs.core.errors import ColofsError
from colofs.wire.errors import ProtocolError


class ReplCode(IntEnum):
    """ERROR codes of the replication layer (the wire layer uses 1..99)."""

    STALE_EPOCH = 100
    FAILED_OVER = 101
    DISK_MISMATCH = 102
    BAD_REQUEST = 103
    APPLY_FAILED = 104
    REPLACED = 105
    WRONG_ROLE = 106
    NO_KEY = 107
    CANNOT_RESUME = 108


class ReplError(ColofsError):
    """Base of the replication engine's own errors."""


class ReplConfigError(ReplError):
    """A setting that cannot be used (an unauthenticated non-loopback endpoint, a bad mode)."""


class CheckpointError(ReplError):
    """A checkpoint did not complete: the secondary is unreachable, too slow, or refused it."""


class CheckpointTimeout(CheckpointError):
    """The checkpoint was not confirmed in time (the secondary is unreachable, or too slow)."""


class PeerRefused(ReplError):
    """The peer answered with ERROR; ``code`` says why (a :class:`ReplCode` or a wire code)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class PeerTimeout(ReplError):
    """The peer sent nothing for longer than the configured timeout."""


class ReplProtocolError(ProtocolError):
    """A well-formed frame whose meaning the protocol does not allow (bad index, range, seq)."""

    code: int = ReplCode.BAD_REQUEST

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class AttachRefused(ReplProtocolError):
    """The secondary will not take this primary for this VM (epoch, failover, disk mismatch)."""
