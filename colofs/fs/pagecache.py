"""Keeping the kernel's page cache of the disk files in step with the core.

With the writeback cache on, the kernel holds dirty pages of buffered writes
and clean pages of earlier reads. Whenever the content of a file changes
behind the kernel's back (a checkpoint empties the active and hidden
layers), the mount must first push the dirty pages down, so they land
*before* the change, and afterwards drop every cached page, so no reader sees
data from before it.

Both steps wait on the kernel, and the kernel waits on this process to serve
the writes it sends meanwhile, so they run in worker threads while the trio
loop keeps serving. Both are one call: ``pyfuse3.invalidate_inode(ino)``
writes each dirty page back synchronously (through this mount, to the
core), waits for pages already under writeback (since Linux 6.16 a FUSE page
stays under writeback until the daemon answered the write), then drops
every cached page and unmaps it from ``mmap`` users.
``fuse_lowlevel_notify_inval_inode`` runs without the GIL, so the loop
thread keeps going.

The daemon never writes back by opening the files through its own mount:
every control request is a ``setxattr`` that holds the inode lock of its
node (a disk file, or a VM directory), and a path lookup below a VM
directory whose entries the kernel evicted takes that directory's lock too,
so an ``open`` + ``fsync`` there deadlocks the request (and the daemon with
it). The price of the invalidation is the file's clean cached pages, which
are read again; a checkpoint on a secondary drops them anyway.

A disk the primary creates on a secondary appears behind the kernel's back
too: ``refresh_dir`` drops what the kernel cached of its VM directory. Once
the mount is gone (``close``), nothing here talks to the kernel any more.
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

ENTRY_INVALIDATE_TIMEOUT = 5.0


def _invalidate_entry(parent_ino: int, name: bytes) -> None:
    try:
        # Without ``deleted``: that variant takes the child's inode lock, which
        # the removexattr request that deletes it still holds.
        pyfuse3.invalidate_entry(parent_ino, name)
    except OSError as e:
        if e.errno != errno.ENOENT:  # the kernel never looked the name up
            raise


def _invalidate(ino: int) -> None:
    try:
        pyfuse3.invalidate_inode(ino, False)
    except OSError as e:
        if e.errno != errno.ENOENT:  # ENOENT: the kernel holds no such inode any more
            raise


def _invalidate_attributes(ino: int) -> None:
    try:
        pyfuse3.invalidate_inode(ino, True)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise


class PageCache:
    """Write-back and invalidation of the kernel's cache for disk files of one mount."""

    def __init__(self, mountpoint: str, inodes: InodeTable) -> None:
        self.mountpoint = mountpoint
        self.inodes = inodes
        # Each call parks a thread until the kernel is done; a few at once suffice.
        self._limiter = trio.CapacityLimiter(4)
        self.live = True

    def close(self) -> None:
        """The mount is gone: the kernel holds no pages any more, and its session must not be used."""
        self.live = False

    def _held(self, node: Node) -> bool:
        """Whether the kernel may hold pages or attributes of ``node``."""
        return self.live and self.inodes.known_to_kernel(node)

    async def write_back(self, nodes: Sequence[Node]) -> None:
        """Make every write the kernel holds for ``nodes`` reach the core (by invalidation, see above)."""
        await self.drop(nodes)

    async def forget_entry(self, parent: Node, node: Node) -> None:
        """Make the kernel forget a deleted file's name now: the next lookup asks again and misses."""
        if not self.live:
            return
        with trio.move_on_after(ENTRY_INVALIDATE_TIMEOUT) as scope:
            try:
                await trio.to_thread.run_sync(_invalidate_entry, parent.ino, node.name.encode(),
                                              limiter=self._limiter, abandon_on_cancel=True)
            except OSError as e:
                log.warning("%s: invalidating the kernel's entry failed: %s", node.label, e)
        if scope.cancelled_caught:
            log.warning("%s: the kernel did not drop its entry within %.0f s; it expires on its own",
                        node.label, ENTRY_INVALIDATE_TIMEOUT)

    async def drop(self, nodes: Sequence[Node]) -> None:
        """Drop every cached page of ``nodes`` (dirty ones are written back first)."""
        for node in nodes:
            if not self._held(node):
                continue
            try:
                await trio.to_thread.run_sync(_invalidate, node.ino, limiter=self._limiter)
            except OSError as e:
                log.error("%s: invalidating the kernel's cache failed: %s", node.label, e)
                raise

    async def refresh_dir(self, node: Node, name: str) -> None:
        """A file appeared in directory ``node`` behind the kernel's back: drop what it cached of both."""
        if not self._held(node):
            return
        with trio.move_on_after(ENTRY_INVALIDATE_TIMEOUT) as scope:
            try:
                await trio.to_thread.run_sync(_invalidate_attributes, node.ino, limiter=self._limiter,
                                              abandon_on_cancel=True)
                await trio.to_thread.run_sync(_invalidate_entry, node.ino, name.encode(),
                                              limiter=self._limiter, abandon_on_cancel=True)
            except OSError as e:
                log.warning("%s: refreshing the kernel's view of the directory failed: %s", node.label, e)
        if scope.cancelled_caught:
            log.warning("%s: the kernel did not refresh the directory within %.0f s; its entries expire "
                        "on their own", node.label, ENTRY_INVALIDATE_TIMEOUT)

    async def reset_size(self, node: Node, size: int) -> None:
        """Make the kernel take ``size`` as the file's size again (see ``Operations.write``)."""
        if not self.live:
            return
        path = os.path.join(self.mountpoint, node.vm, node.name)
        try:
            await trio.to_thread.run_sync(os.truncate, path, size, limiter=self._limiter)
        except OSError as e:
            log.warning("%s: resetting the cached size through %s: %s", node.label, path, e)
        else:
            log.info("%s: the kernel's cached size is back to %d after a write past the end", node.label, size)
