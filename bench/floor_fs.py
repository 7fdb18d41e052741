"""The pyfuse3 floor: the least a pyfuse3 + trio filesystem can do per request, to measure colofs against.

    python bench/floor_fs.py SOURCE MOUNTPOINT

Serves one file, ``MOUNTPOINT/disk.raw``, as a passthrough to ``SOURCE``:
``os.pread``/``os.pwrite`` straight on the event loop, the kernel's
writeback cache on, a stable mtime so the kernel keeps its page cache. No
locks, no threads, no bookkeeping: whatever a request costs here is the cost
of pyfuse3's one-thread session loop and trio's scheduler, which any handler
written in Python pays on top of its own work. That loop is the installed
pyfuse3's: ``make deps`` builds it with patches/pyfuse3 (queued requests are
read without a trip through the scheduler), stock pyfuse3 if that failed;
``pyfuse3.NONBLOCKING_SESSION_LOOP`` tells which. ``bench.compare`` mounts it
beside colofs and QEMU (the "pyfuse3 floor" column) and a row where colofs
comes close to it is bound by the floor, not by colofs's handlers.

It runs in the foreground until SIGTERM or SIGINT, then unmounts.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio

NAME = b"disk.raw"
FILE_INODE = pyfuse3.ROOT_INODE + 1


class Passthrough(pyfuse3.Operations):
    """A root directory holding one regular file backed by an open descriptor of the source."""

    enable_writeback_cache = True

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        st = os.fstat(fd)
        self.size = st.st_size
        self.mtime_ns = st.st_mtime_ns  # reported unchanged: a moving mtime would make the kernel drop its cache

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFDIR | 0o755, 2, 0
        else:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o600, 1, self.size
        a.st_blksize = 4096
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.mtime_ns
        a.attr_timeout = a.entry_timeout = 3600
        return a

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if inode not in (pyfuse3.ROOT_INODE, FILE_INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if fields.update_size and attr.st_size != self.size:
            raise pyfuse3.FUSEError(errno.EPERM)  # a disk has a fixed size
        return self._attr(inode)  # the writeback cache sends mtime updates: keep the stable one

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILE_INODE)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, NAME, self._attr(FILE_INODE), 1)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            return os.pread(self.fd, size, off)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if off + len(buf) > self.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        try:
            return os.pwrite(self.fd, buf, off)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    async def flush(self, fh: int) -> None:
        pass

    async def fsync(self, fh: int, datasync: bool) -> None:
        try:
            await trio.to_thread.run_sync(os.fdatasync, self.fd)  # a sync may take long: off the loop
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    async def release(self, fh: int) -> None:
        pass


async def serve() -> None:
    """pyfuse3's loop until SIGTERM or SIGINT ends it."""
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            nursery.start_soon(pyfuse3.main)
            print("ready", flush=True)  # bench.compare waits for this line
            async for _ in signals:
                pyfuse3.terminate()
                break


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="the file to pass through (its size is the disk's)")
    p.add_argument("mountpoint", help="an empty directory; the file appears as MOUNTPOINT/disk.raw")
    args = p.parse_args(argv)
    fd = os.open(args.source, os.O_RDWR)
    ops = Passthrough(fd)
    options = set(pyfuse3.default_options)
    options.add("fsname=colofs-floor")
    options.discard("default_permissions")
    pyfuse3.init(ops, args.mountpoint, options)

    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
