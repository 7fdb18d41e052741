"""A passthrough FUSE file system that fails chosen I/O, to put a colofs store on a misbehaving device.

``python -m tests.faults.faultfs SOURCE MOUNTPOINT`` serves SOURCE at
MOUNTPOINT. Setting ``user.faultfs.rule`` on the mountpoint's root to JSON
``{"path": "vm/d/base.raw", "op": "read", "offset": 0, "length": 4096,
"errno": 5}`` makes every read (or ``"write"``) of that file overlapping the
range fail with that errno; an empty value clears the rules. The colofs
daemon above it then meets real ``EIO`` from real system calls, as it would
from a failing disk. Runs until unmounted (``fusermount3 -u``).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
from dataclasses import dataclass

import pyfuse3
import trio

RULE = b"user.faultfs.rule"


@dataclass
class Rule:
    path: str
    op: str
    offset: int
    length: int
    errno: int

    def hits(self, path: str, op: str, offset: int, length: int) -> bool:
        return (
            path == self.path and op == self.op and offset < self.offset + self.length and self.offset < offset + length
        )


class FaultFS(pyfuse3.Operations):
    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source
        self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: ""}
        self.inos: dict[str, int] = {"": pyfuse3.ROOT_INODE}
        self.next_ino = pyfuse3.ROOT_INODE + 1
        self.fds: dict[int, tuple[int, str]] = {}
        self.rules: list[Rule] = []

    # -- names ------------------------------------------------------------

    def _full(self, rel: str) -> str:
        return os.path.join(self.source, rel)

    def _ino(self, rel: str) -> int:
        ino = self.inos.get(rel)
        if ino is None:
            ino = self.next_ino
            self.next_ino += 1
            self.inos[rel] = ino
            self.paths[ino] = rel
        return ino

    def _rel(self, ino: int) -> str:
        try:
            return self.paths[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self._rel(parent), os.fsdecode(name))

    def _attr(self, rel: str) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(self._full(rel))
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        a = pyfuse3.EntryAttributes()
        a.st_ino = self._ino(rel)
        for f in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks", "st_rdev"):
            setattr(a, f, getattr(st, f))
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        a.st_blksize = 4096
        a.entry_timeout = a.attr_timeout = 0
        return a

    def _rename_tree(self, old: str, new: str) -> None:
        for rel in [r for r in self.inos if r == old or r.startswith(old + "/")]:
            ino = self.inos.pop(rel)
            moved = new + rel[len(old) :]
            self.inos[moved] = ino
            self.paths[ino] = moved

    # -- metadata ---------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(self._child(parent_inode, name))

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(self._rel(inode))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        full = self._full(self._rel(inode))
        try:
            if fields.update_size:
                os.truncate(full, attr.st_size)
            if fields.update_mode:
                os.chmod(full, stat.S_IMODE(attr.st_mode))
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        return self._attr(self._rel(inode))

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        rel = self._rel(fh)
        names = sorted(os.listdir(self._full(rel)))
        for i, name in enumerate(names[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attr(os.path.join(rel, name)), i):
                return

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        rel = self._child(parent_inode, name)
        try:
            os.mkdir(self._full(rel), mode)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        return self._attr(rel)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        try:
            os.rmdir(self._full(self._child(parent_inode, name)))
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        try:
            os.unlink(self._full(self._child(parent_inode, name)))
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    async def rename(self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes, flags: int,
                     ctx: pyfuse3.RequestContext) -> None:
        old, new = self._child(parent_old, name_old), self._child(parent_new, name_new)
        try:
            os.rename(self._full(old), self._full(new))
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        self._rename_tree(old, new)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.source)
        out = pyfuse3.StatvfsData()
        for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail",
                  "f_namemax"):
            setattr(out, f, getattr(st, f))
        return out

    # -- the fault rules ----------------------------------------------------------

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        if inode != pyfuse3.ROOT_INODE or name != RULE:
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        if not value.strip():
            self.rules.clear()
            return
        self.rules.append(Rule(**json.loads(value)))

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    def _check(self, rel: str, op: str, offset: int, length: int) -> None:
        for rule in self.rules:
            if rule.hits(rel, op, offset, length):
                raise pyfuse3.FUSEError(rule.errno)

    # -- file I/O -----------------------------------------------------------------

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        rel = self._child(parent_inode, name)
        try:
            fd = os.open(self._full(rel), flags | os.O_CREAT, mode)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        self.fds[fd] = (fd, rel)
        return pyfuse3.FileInfo(fh=fd, direct_io=True), self._attr(rel)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        rel = self._rel(inode)
        try:
            fd = os.open(self._full(rel), flags & ~os.O_CREAT)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        self.fds[fd] = (fd, rel)
        # Direct I/O: every read and write reaches this process, so every rule is seen.
        return pyfuse3.FileInfo(fh=fd, direct_io=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        self._check(self.fds[fh][1], "read", off, size)
        return os.pread(fh, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self._check(self.fds[fh][1], "write", off, len(buf))
        return os.pwrite(fh, buf, off)

    async def fsync(self, fh: int, datasync: bool) -> None:
        os.fdatasync(fh) if datasync else os.fsync(fh)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass

    async def release(self, fh: int) -> None:
        self.fds.pop(fh, None)
        os.close(fh)


def main() -> None:
    source, mountpoint = sys.argv[1], sys.argv[2]
    fs = FaultFS(os.path.abspath(source))
    pyfuse3.init(fs, mountpoint, {"fsname=faultfs", "default_permissions"})
    print("ready", flush=True)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
