"""Whether a disk of a given size fits the store, decided before anything is made for it.

A size the store's file system cannot hold used to fail half way through a
creation (``File too large`` from ``ftruncate``, or an integer overflow past
``off_t``), after the VM and a temporary disk directory had been made. Here
it is refused up front: first against a fixed bound, then by growing an
unnamed sparse file (``O_TMPFILE``, so even a crash leaves nothing) to the
size on the store's own file system, which answers ``EFBIG`` exactly when
base would not fit.
"""

from __future__ import annotations

import errno
import os
import secrets

from colofs.core.errors import BadArgument, DiskIOError

MAX_DISK_BYTES = 1 << 50
"""1 PiB: beyond any disk a VM is given; the primary keeps a bit per block of it in memory."""


class DiskTooLarge(BadArgument):
    """The size is more than the store can hold (answered as ``EFBIG``)."""


def check_disk_size(directory: str, label: str, size: int) -> None:
    """Raise :class:`DiskTooLarge` unless a base image of ``size`` bytes fits in ``directory``.

    Blocking system calls: run it in a worker thread.
    """
    if size > MAX_DISK_BYTES:
        raise DiskTooLarge(f"{label}: {size} bytes is more than the largest disk colofs takes "
                           f"({MAX_DISK_BYTES} bytes, 1 PiB)")
    try:
        _grow_probe(directory, size)
    except OSError as e:
        if e.errno in (errno.EFBIG, errno.EINVAL):
            raise DiskTooLarge(f"{label}: {size} bytes is more than the store's file system holds in one "
                               f"file ({directory}: {e.strerror})") from None
        raise DiskIOError(f"{label}: cannot check the store for a {size}-byte disk: {e.strerror}", e.errno) from e


def _grow_probe(directory: str, size: int) -> None:
    """Grow a throwaway sparse file in ``directory`` to ``size`` bytes; OSError if it cannot."""
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        named = None
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT, errno.ENOSYS):
            raise
        # A file system without unnamed files (some FUSE file systems answer ENOENT): a named one,
        # removed at once; a directory that really is missing fails the named open too.
        named = os.path.join(directory, f".size-probe-{secrets.token_hex(6)}")
        fd = os.open(named, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
        if named is not None:  # removed after the probe: some FUSE file systems lose an unlinked inode
            os.unlink(named)
