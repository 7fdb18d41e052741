"""Keeping the kernel's page cache of the disk files in step with the core.

With the writeback cache on, the kernel holds dirty pages of buffered writes
and clean pages of earlier reads. Whenever the content of a file changes
behind the kernel's back (a checkpoint empties the active and hidden
layers), the mount must first push the dirty pages down, so they land
*before* the change, and afterwards drop every cached page, so no reader sees
data from before it.

Both steps wait on the kernel, and the kernel waits on this process to serve
the writes it sends meanwhile, so they run in worker threads while the trio
loop keeps serving:

* ``fsync`` of the file opened through the mount: writes back every dirty
  page and waits for writes already in flight (an invalidation alone does not
  wait for pages whose writeback has started);
* ``pyfuse3.invalidate_inode(ino)``: drops the cached pages (laundering any
  page dirtied meanwhile) and unmaps them from ``mmap`` users.
  ``fuse_lowlevel_notify_inval_inode`` runs without the GIL, so the loop
  thread keeps going.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence

import pyfuse3
import trio

from colofs.fs.inodes import InodeTable, Node

log = logging.getLogger(__name__)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _invalidate(ino: int) -> None:
    try:
        pyfuse3.invalidate_inode(ino, False)
    except OSError as e:
        if e.errno != errno.ENOENT:  # ENOENT: the kernel holds no such inode any more
            raise


class PageCache:
    """Write-back and invalidation of the kernel's cache for disk files of one mount."""

    def __init__(self, mountpoint: str, inodes: InodeTable) -> None:
        self.mountpoint = mountpoint
        self.inodes = inodes
        # Each call parks a thread until the kernel is done; a few at once suffice.
        self._limiter = trio.CapacityLimiter(4)

    async def write_back(self, nodes: Sequence[Node]) -> None:
        """Make every write the kernel holds for ``nodes`` reach the core."""
        for node in nodes:
            if not self.inodes.known_to_kernel(node):
                continue  # the kernel has no inode, hence no pages
            path = os.path.join(self.mountpoint, node.vm, node.name)
            try:
                await trio.to_thread.run_sync(_fsync_path, path, limiter=self._limiter)
            except OSError as e:
                # A failed writeback was already logged by the write handler;
                # an unreachable path (lazy unmount) leaves only the invalidation.
                log.warning("%s: writing back cached pages through %s: %s", node.label, path, e)

    async def drop(self, nodes: Sequence[Node]) -> None:
        """Drop every cached page of ``nodes`` (dirty ones are written back first)."""
        for node in nodes:
            if not self.inodes.known_to_kernel(node):
                continue
            try:
                await trio.to_thread.run_sync(_invalidate, node.ino, limiter=self._limiter)
            except OSError as e:
                log.error("%s: invalidating the kernel's cache failed: %s", node.label, e)
                raise

    async def reset_size(self, node: Node, size: int) -> None:
        """Make the kernel take ``size`` as the file's size again (see ``Operations.write``)."""
        path = os.path.join(self.mountpoint, node.vm, node.name)
        try:
            await trio.to_thread.run_sync(os.truncate, path, size, limiter=self._limiter)
        except OSError as e:
            log.warning("%s: resetting the cached size through %s: %s", node.label, path, e)
        else:
            log.info("%s: the kernel's cached size is back to %d after a write past the end", node.label, size)
