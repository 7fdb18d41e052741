"""The FUSE handlers of open files: handles, read, write, fsync, release.

This is the data path, every request of the VM's I/O, kept apart from the
namespace and attribute handlers of :mod:`colofs.fs.operations` (which mixes
it in). Reads and writes of a disk file are the VM's view of the disk on
this host (``Disk.read``/``Disk.write``: the core routes by role). A
snapshot file reads a past image and refuses writes (``EROFS``); a clone
file reads and writes its own image, never the disk's.

``read`` and ``write`` are the hot path: no ``_guarded`` wrapper (one
coroutine less per request), the same errors raised by hand. Every handler
raises only ``pyfuse3.FUSEError``: an escaping exception would end the FUSE
main loop and leave a dead mount.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable

import pyfuse3
import trio

from colofs.core.disk import Disk
from colofs.core.errors import DiskIOError
from colofs.core.snapshot import Snapshot
from colofs.core.store import Store
from colofs.fs.control import Control
from colofs.fs.errnos import fuse_error
from colofs.fs.inodes import SNAP_KINDS, InodeTable, Kind, Node
from colofs.fs.iostats import IOStats
from colofs.fs.pagecache import PageCache
from colofs.fs.replication import Replication

log = logging.getLogger(__name__)


def refuse(code: int, message: str, *args: object) -> pyfuse3.FUSEError:
    """Log why a request is refused and make its error."""
    log.warning(message, *args)
    return pyfuse3.FUSEError(code)


class FileHandlers:
    """Open files' handles and I/O; mixed into :class:`colofs.fs.operations.Operations`, which sets the state."""

    store: Store
    inodes: InodeTable
    cache: PageCache
    repl: Replication
    control: Control
    io: IOStats
    nursery: trio.Nursery | None
    _handles: dict[int, Node]
    _next_fh: int
    _size_repairs: set[int]
    _size_repairs_again: set[int]
    _damage_reported: set[str]
    on_write: Callable[[int], None] | None

    # -- handles ---------------------------------------------------------------------------

    def _handle(self, fh: int) -> Node:
        node = self._handles.get(fh)
        if node is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return node

    def _new_handle(self, node: Node) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = node
        node.open_handles += 1
        return fh

    # -- errors and repairs ------------------------------------------------------------------

    def _io_error(self, node: Node, exc: Exception, what: str) -> pyfuse3.FUSEError:
        if isinstance(exc, DiskIOError | OSError):
            self.control.io_errors[node.label] = self.control.io_errors.get(node.label, 0) + 1
            vm = self.store.vms.get(node.vm)
            if vm is not None and vm.damage is not None and node.vm not in self._damage_reported:
                self._damage_reported.add(node.vm)
                self.repl.events.emit("vm-damaged", vm=node.vm, damage=vm.damage.describe())
        return fuse_error(exc, f"{node.label}: {what}")

    def _repair_size_later(self, node: Node) -> None:
        """After a refused write past the end, reset the size the kernel caches.

        With the writeback cache a buffered write past the end succeeds in the
        page cache and grows the kernel's idea of the size; its writeback then
        fails here with EFBIG. A truncate to the disk's own size (accepted by
        ``setattr``) makes the kernel take the real size again and drop
        the pages past it. It must run after this reply: the kernel holds the
        failed page until then.
        """
        if self.nursery is None:
            return
        if node.ino in self._size_repairs:
            self._size_repairs_again.add(node.ino)  # this failure may postdate the repair under way
            return
        self._size_repairs.add(node.ino)
        self.nursery.start_soon(self._repair_size, node)

    async def _repair_size(self, node: Node) -> None:
        try:
            while True:
                self._size_repairs_again.discard(node.ino)
                await self.cache.reset_size(node, self.inodes.size_of(node))
                if node.ino not in self._size_repairs_again:
                    break
        finally:
            self._size_repairs.discard(node.ino)
            self._size_repairs_again.discard(node.ino)

    # -- I/O -----------------------------------------------------------------------------------

    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray:
        node = self._handles.get(fh)
        if node is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        try:
            kind = node.kind
            if kind is Kind.DISK:
                image: Disk | Snapshot = self.inodes.disk(node)
            elif kind in SNAP_KINDS:
                image = self.inodes.snapshot(node)
            else:
                return b""
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            raise fuse_error(e, f"read({fh}, {off}, {size})") from None
        if off >= image.size or size <= 0:
            return b""
        if size > image.size - off:
            size = image.size - off
        t0 = time.perf_counter()
        try:
            data = await image.read(off, size)
        except Exception as e:
            raise self._io_error(node, e, f"read of {size} bytes at {off}") from None
        self.io.of(node.vm, node.disk).read(len(data), time.perf_counter() - t0)
        return data

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node = self._handles.get(fh)
        if node is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        kind = node.kind
        if kind is Kind.SNAPSHOT:
            raise refuse(errno.EROFS, "%s: write refused: a snapshot is read-only", node.label)
        if kind is not Kind.DISK and kind is not Kind.CLONE:
            self._repair_size_later(node)
            raise refuse(errno.EFBIG, "%s: write of %d bytes at %d refused: no disk yet (truncate it to its size first)",
                         node.label, len(buf), off)
        try:
            image: Disk | Snapshot = self.inodes.disk(node) if kind is Kind.DISK else self.inodes.snapshot(node)
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            raise fuse_error(e, f"write({fh}, {off})") from None
        if off + len(buf) > image.size:
            self._repair_size_later(node)
            raise refuse(errno.EFBIG, "%s: write of %d bytes at %d refused: it ends past the disk's size of %d",
                         node.label, len(buf), off, image.size)
        if self.on_write is not None:
            self.on_write(len(buf))
        t0 = time.perf_counter()
        try:
            await image.write(off, buf)
        except Exception as e:
            raise self._io_error(node, e, f"write of {len(buf)} bytes at {off}") from None
        self.io.of(node.vm, node.disk).write(len(buf), time.perf_counter() - t0)
        return len(buf)

    async def fsync(self, fh: int, datasync: bool) -> None:
        try:
            node = self._handle(fh)
            # A snapshot's saved blocks are durable before the disk changes; nothing to do for it.
            if node.kind not in (Kind.DISK, Kind.CLONE):
                return
            image: Disk | Snapshot = self.inodes.disk(node) if node.kind is Kind.DISK else self.inodes.snapshot(node)
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            raise fuse_error(e, f"fsync({fh})") from None
        try:
            await image.flush()
        except Exception as e:
            raise self._io_error(node, e, "fsync") from None

    async def flush(self, fh: int) -> None:
        # close(2): the kernel has written the dirty pages back already; durability is fsync's job.
        self._handle(fh)

    async def release(self, fh: int) -> None:
        node = self._handles.pop(fh, None)
        if node is not None:
            node.open_handles -= 1
