"""Which errno a FUSE request fails with, for every error the core raises.

Handlers may raise only ``pyfuse3.FUSEError``: any other exception escaping a
handler would end ``pyfuse3.main`` and leave a dead mount behind. So every
handler goes through :func:`fuse_error`, which maps the core's exception
hierarchy to an errno and logs what an operator needs (disk, offset, cause).

Choices (documented in the README section):

* a write that ends past the disk's size fails with ``EFBIG``;
* resizing a disk (truncate to another size, ``O_TRUNC`` on a disk) fails
  with ``EPERM``; so do unlink, rename and other changes the layout forbids;
* a snapshot in use (a clone built on it, an open file handle) cannot be
  deleted: ``EBUSY``;
* ``ENOSPC`` and ``EDQUOT`` from the store's file system pass through; every
  other failure of the store's file system becomes ``EIO``.
"""

from __future__ import annotations

import errno
import logging

import pyfuse3

from colofs.core.errors import (
    AlreadyExists,
    BadArgument,
    BadRange,
    ColofsError,
    DiskIOError,
    InUse,
    InvalidName,
    NotFound,
    RoleError,
    SequenceError,
    StoreError,
)

log = logging.getLogger(__name__)

# Errors of the store's file system that a client can act on; the rest are EIO.
PASSTHROUGH = frozenset({errno.ENOSPC, errno.EDQUOT})

_BY_CLASS: tuple[tuple[type[ColofsError], int], ...] = (
    (NotFound, errno.ENOENT),
    (AlreadyExists, errno.EEXIST),
    (InUse, errno.EBUSY),
    (InvalidName, errno.EINVAL),
    (BadRange, errno.EINVAL),
    (BadArgument, errno.EINVAL),
    (SequenceError, errno.EINVAL),
    (RoleError, errno.EPERM),
    (StoreError, errno.EIO),
)


def errno_for(exc: BaseException) -> int:
    """The errno a client sees for ``exc``."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc.errno
    if isinstance(exc, DiskIOError):
        return exc.errno if exc.errno in PASSTHROUGH else errno.EIO
    for cls, code in _BY_CLASS:
        if isinstance(exc, cls):
            return code
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno if exc.errno in PASSTHROUGH else errno.EIO
    return errno.EIO


def fuse_error(exc: Exception, what: str) -> pyfuse3.FUSEError:
    """The ``FUSEError`` to raise for ``exc``, logged as an operator needs it.

    ``what`` names the request (``"VM/DISK: write of 4096 bytes at 8192"``).
    I/O errors are logged as errors, refusals of bad requests as warnings, and
    anything unexpected with its traceback.
    """
    if isinstance(exc, pyfuse3.FUSEError):
        return exc
    code = errno_for(exc)
    if isinstance(exc, DiskIOError | StoreError):
        log.error("%s failed (%s): %s", what, errno.errorcode.get(code, code), exc)
    elif isinstance(exc, ColofsError):
        log.warning("%s refused (%s): %s", what, errno.errorcode.get(code, code), exc)
    elif isinstance(exc, OSError):
        log.error("%s failed (%s): %s", what, errno.errorcode.get(code, code), exc)
    else:
        log.exception("%s failed with an unexpected error; answering EIO", what)
    return pyfuse3.FUSEError(code)
