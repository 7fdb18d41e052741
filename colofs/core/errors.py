"""Exceptions of the core. Each names the disk (or VM, or store) and the problem.

The hierarchy lets callers map errors without parsing messages: the FUSE
adapter turns :class:`BadRange` into EINVAL/EFBIG, :class:`DiskIOError` into
EIO, the wire turns :class:`SequenceError` into a refused batch.
"""

from __future__ import annotations


class ColofsError(Exception):
    """Base of every error colofs raises on purpose."""


class StoreError(ColofsError):
    """The on-disk store cannot be used as it is."""


class StoreVersionError(StoreError):
    """The store (or a state file in it) was written by an incompatible format version."""


class StateMissing(StoreError):
    """A state file the store needs is not there."""


class StateCorrupt(StoreError):
    """A state file is truncated, unparsable or fails its checksum."""


class MapMissing(StoreError):
    """A block-map log (hidden, active, snapshot) is not there."""


class MapCorrupt(StoreError):
    """A block-map log has damage that is not a torn tail from a crash.

    ``path`` and ``offset`` say where (``offset`` is None when the damage
    has no single place, e.g. a wrong length); ``reason`` is the bare cause.
    """

    def __init__(self, message: str, path: str = "", offset: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset
        self.reason = reason or message


class MapTruncated(MapCorrupt):
    """A block-map log is shorter than the state recorded at the last clean close (or than acknowledged)."""


class NotFound(ColofsError):
    """No VM, disk or snapshot of that name."""


class AlreadyExists(ColofsError):
    """A VM, disk or snapshot of that name already exists."""


class InUse(ColofsError):
    """The object is needed by another (a snapshot that a clone is built on)."""


class InvalidName(ColofsError):
    """A VM, disk or snapshot name that cannot be used."""


class BadRange(ColofsError):
    """An offset or length outside the disk, or negative."""


class BadArgument(ColofsError):
    """A parameter that makes no sense (block size not a power of two, size 0, ...)."""


class SequenceError(ColofsError):
    """A primary write batch or checkpoint out of sequence."""


class RoleError(ColofsError):
    """The operation does not fit the disk's role or phase (e.g. apply on a primary)."""


class DiskIOError(ColofsError):
    """The underlying file system reported an error; names disk, layer and offset."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class BlockDamaged(DiskIOError):
    """A layer block read back does not match the digest recorded when it was written.

    Served as EIO (never the wrong bytes); the VM it belongs to is quarantined.
    """

    def __init__(self, message: str, path: str, offset: int, reason: str) -> None:
        super().__init__(message, 5)  # EIO
        self.path = path
        self.offset = offset
        self.reason = reason


class VMDamaged(DiskIOError):
    """The VM is quarantined: its store holds damage, so nothing of it is served until it is repaired."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 5)  # EIO
