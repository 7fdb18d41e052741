"""A passthrough FUSE file system whose file changes the moment it has been read up to a chosen offset.

``python -m tests.fs.shrinkfs SOURCE MOUNTPOINT`` serves SOURCE at MOUNTPOINT
(like ``tests.faults.faultfs``, with direct I/O, so every read reaches this
process). Setting ``user.shrinkfs.trigger`` on the root to JSON
``{"path": "img.raw", "after": 4194304, "truncate": 3145728}`` makes the
first read of that file at or past ``after`` truncate it in SOURCE before it
is answered; with ``"write_at": 0`` instead of ``truncate`` one byte there
is overwritten (same size, new mtime). An import is thereby changed in the
middle of its copy, whatever the speed of the machine.
``user.shrinkfs.fired`` reads ``1`` once the change was made.
"""

from __future__ import annotations

import errno
import json
import os
import sys

import pyfuse3
import trio

from tests.faults.faultfs import FaultFS

TRIGGER = b"user.shrinkfs.trigger"
FIRED = b"user.shrinkfs.fired"


class ShrinkFS(FaultFS):
    def __init__(self, source: str) -> None:
        super().__init__(source)
        self.trigger: dict[str, int | str] | None = None
        self.fired = False

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        if inode == pyfuse3.ROOT_INODE and name == TRIGGER:
            self.trigger = json.loads(value)
            self.fired = False
            return
        await super().setxattr(inode, name, value, ctx)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == pyfuse3.ROOT_INODE and name == FIRED:
            return b"1" if self.fired else b"0"
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        t = self.trigger
        if t is not None and not self.fired and self.fds[fh][1] == t["path"] and off >= int(t["after"]):
            full = self._full(str(t["path"]))
            try:
                if "truncate" in t:
                    os.truncate(full, int(t["truncate"]))
                else:
                    with open(full, "r+b") as f:
                        f.seek(int(t["write_at"]))
                        f.write(b"\xa5")
            except OSError as e:
                raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
            self.fired = True
        return await super().read(fh, off, size)


def main() -> None:
    source, mountpoint = sys.argv[1], sys.argv[2]
    fs = ShrinkFS(os.path.abspath(source))
    pyfuse3.init(fs, mountpoint, {"fsname=shrinkfs", "default_permissions"})
    print("ready", flush=True)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
