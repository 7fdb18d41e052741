"""When what a block log holds, and the name it holds it under, are durable.

:func:`make_durable` is the one sync of appended blocks (a group commit,
then each log's commit record; see ``colofs.core.blocklog``) before what
they protect (base) is touched. A log a checkpoint renamed into place
(``BlockLog.take_spare``) is named by its directory only once that
directory is synced: :func:`settle_renames` does it, from
:func:`make_durable` the first time after the rename, and from a clean
close, so the checkpoint itself does not wait for it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

import trio

from colofs.core.errors import DiskIOError
from colofs.core.fileio import fsync_dir
from colofs.core.ioctx import IOContext
from colofs.core.together import together

if TYPE_CHECKING:
    from colofs.core.blocklog import BlockLog

__all__ = ["fsync_dirs", "make_durable", "settle_renames"]


async def make_durable(io: IOContext, logs: Sequence[BlockLog]) -> None:
    """Sync ``logs`` (one group commit of the store's ``io``), then write each one's commit record.

    Call it after appending and *before* touching what the appended blocks
    protect (base): the records are what lets recovery tell damage from a
    torn tail. The record rides the next sync of the same file; see the
    module docstring for why it needs none of its own.
    """
    if not logs:
        return
    marks = [(lg, lg.fd, lg.end) for lg in logs]
    if any(lg.rename_unsynced for lg in logs):  # the first sync since a checkpoint renamed the file into place
        await together(partial(io.syncs.datasync_all, [fd for _, fd, _ in marks]), partial(settle_renames, logs))
    else:
        await io.syncs.datasync_all([fd for _, fd, _ in marks])
    for lg, fd, end in marks:
        lg.commit(end, fd)


async def settle_renames(logs: Sequence[BlockLog]) -> None:
    """Make the renames :meth:`BlockLog.take_spare` left unsynced durable (``fsync`` of their directories).

    A flag is cleared only once its directory's sync has returned, and only
    for the file the sync was for, so a concurrent caller never skips a sync
    still under way and a later rename is never taken as synced.
    """
    pending = [(lg, lg.fd) for lg in logs if lg.rename_unsynced]
    if not pending:
        return
    await trio.to_thread.run_sync(fsync_dirs, sorted({os.path.dirname(lg.path) for lg, _ in pending}))
    for lg, fd in pending:
        if lg.fd == fd:
            lg.rename_unsynced = False


def fsync_dirs(paths: Sequence[str]) -> None:
    """``fsync`` each directory (blocking): renames and creations in them become durable."""
    for path in paths:
        try:
            fsync_dir(path)
        except OSError as e:
            raise DiskIOError(f"cannot make the block logs in {path} durable: {e.strerror}", e.errno) from e
