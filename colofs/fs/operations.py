"""The FUSE adapter: pyfuse3 requests on ``MOUNTPOINT/VM/DISK.raw`` turned into core calls.

This module holds the namespace, attribute and control-plane handlers; the
I/O of open files (read, write, fsync, release) is :mod:`colofs.fs.fileops`,
mixed into :class:`Operations`. Everything here is either the fixed layout
(directories per VM, one file per disk or snapshot, sizes that never change)
or the control plane (:mod:`colofs.fs.control`). A snapshot file
``DISK@NAME.raw`` cannot be opened for writing (``EROFS``).

Every handler raises only ``pyfuse3.FUSEError``: an escaping exception would
end the FUSE main loop and leave a dead mount. The kernel's writeback cache is
on, so buffered writes reach us merged, and pages stay cached across opens
(``keep_cache``) because content changes behind the kernel only at
checkpoints, which invalidate explicitly; snapshots never change at all, and
a clone changes only through its own file. An ``O_DIRECT`` open is served
with ``direct_io`` (FOPEN_DIRECT_IO): no page cache for that handle, and no
``GETXATTR security.capability`` request before each of its writes.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3
import trio

from colofs.core.names import check_name
from colofs.core.store import Store
from colofs.fs.control import PREFIX, Control, MountInfo
from colofs.fs.errnos import fuse_error
from colofs.fs.fileops import FileHandlers
from colofs.fs.fileops import refuse as _refuse
from colofs.fs.inodes import SNAP_KINDS, InodeTable, Kind, Node, disk_name, snapshot_name
from colofs.fs.iostats import IOStats
from colofs.fs.pagecache import PageCache
from colofs.fs.replication import Replication

log = logging.getLogger(__name__)

T = TypeVar("T")


def _guarded(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Turn every exception of a handler into a ``FUSEError`` (logged by :func:`fuse_error`)."""

    @functools.wraps(fn)
    async def wrapper(self: Operations, *args: Any) -> T:
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            shown = ", ".join(repr(a) for a in args if isinstance(a, int | bytes | str))
            raise fuse_error(e, f"{fn.__name__}({shown})") from None

    return wrapper


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class Operations(FileHandlers, pyfuse3.Operations):
    """The colofs filesystem of one store (the handlers of open files' I/O are :class:`FileHandlers`)."""

    supports_dot_lookup = True
    enable_writeback_cache = True
    enable_acl = False

    def __init__(self, store: Store, info: MountInfo, repl: Replication | None = None,
                 root_vm: str | None = None) -> None:
        """``root_vm``: serve only that VM, its directory as the mount's root (a worker's mount)."""
        super().__init__()
        self.store = store
        self.inodes = InodeTable(store, root_vm)
        self.cache = PageCache(info.config.mountpoint, self.inodes)
        self.repl = repl or Replication(info.config, store, None)
        self.control = Control(store, self.inodes, self.cache, info, self.repl)
        self._handles: dict[int, Node] = {}
        self._next_fh = 1
        self.io = IOStats()  # per-disk request counters, read by the metrics
        # Set by the daemon: where follow-up work of a request runs after its reply.
        self.nursery: trio.Nursery | None = None
        # Set by a worker: told each write's size before it is served (the mount's queue bound, fs/fuseconn.py).
        self.on_write: Callable[[int], None] | None = None
        self._size_repairs: set[int] = set()
        self._damage_reported: set[str] = set()
        self._size_repairs_again: set[int] = set()

    # -- helpers -----------------------------------------------------------------

    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        """Attributes of a node handed to the kernel with a new reference."""
        attr = self.inodes.attributes(node)
        self.inodes.remember(node)
        return attr

    # -- lookups and attributes ------------------------------------------------------

    @_guarded
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self.inodes.get(parent_inode)
        if name == b".":
            node: Node | None = parent
        elif name == b"..":
            node = self.inodes.parent_of(parent)
        else:
            node = self.inodes.child(parent, _name(name))
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)  # not cached: VMs and disks appear through control
        return self._entry(node)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            self.inodes.forget(ino, count)

    @_guarded
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.inodes.attributes(self.inodes.get(inode))

    @_guarded
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self.inodes.get(inode)
        current = self.inodes.attributes(node)
        if fields.update_size:
            await self._resize(node, attr.st_size)
        if fields.update_mode and stat.S_IMODE(attr.st_mode) != stat.S_IMODE(current.st_mode):
            raise _refuse(errno.EPERM, "%s: chmod refused: colofs files have fixed modes", node.label)
        if (fields.update_uid and attr.st_uid != current.st_uid) or (
            fields.update_gid and attr.st_gid != current.st_gid
        ):
            raise _refuse(errno.EPERM, "%s: chown refused: colofs files belong to the mounting user", node.label)
        # Times are kept as the kernel sets them (it manages mtime with the writeback cache;
        # it also sends a new ctime after every xattr change, a snapshot's included).
        if fields.update_atime:
            node.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
        if fields.update_ctime:
            node.ctime_ns = attr.st_ctime_ns
        return self.inodes.attributes(node)

    async def _resize(self, node: Node, size: int) -> None:
        if node.kind in (Kind.ROOT, Kind.VM):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if node.kind is Kind.PENDING and size > 0:
            disk = await self.store.create_disk(node.vm, node.disk, size, block_size=node.block_size)
            self.repl.vm_created(node.vm)
            self.inodes.settle_pending(node)
            log.info("%s: disk created by truncate: %d bytes, %d-byte blocks", node.label, disk.size, disk.block_size)
            return
        current = self.inodes.size_of(node)
        if size != current:
            if node.kind is Kind.SNAPSHOT:
                raise _refuse(errno.EROFS, "%s: resize refused: a snapshot is read-only", node.label)
            raise _refuse(
                errno.EPERM, "%s: resize from %d to %d bytes refused: a disk's size is fixed",
                node.label, current, size,
            )

    # -- files --------------------------------------------------------------------------

    @_guarded
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.inodes.get(inode)
        if node.kind in (Kind.ROOT, Kind.VM):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if node.kind in SNAP_KINDS:
            if node.deleting or not node.linked:
                raise pyfuse3.FUSEError(errno.ENOENT)
            if node.kind is Kind.SNAPSHOT and flags & os.O_ACCMODE != os.O_RDONLY:
                # EROFS even for root, whom the mode bits do not stop.
                raise _refuse(errno.EROFS, "%s: open for writing refused: a snapshot is read-only "
                              "(clone it for a writable image)", node.label)
        if flags & os.O_TRUNC and node.kind in (Kind.DISK, Kind.CLONE):
            raise _refuse(errno.EPERM, "%s: open with O_TRUNC refused: it would destroy the disk", node.label)
        # An O_DIRECT open bypasses the page cache anyway; FOPEN_DIRECT_IO (direct_io) also
        # spares each write(2) the kernel's GETXATTR security.capability round trip (it
        # is sent from file_remove_privs, which only the page-cache write path calls),
        # a whole extra request per small write. The kernel keeps such a handle coherent
        # with cached pages of other handles (dirty pages are written back before, cached
        # ones dropped after); it only cannot be mapped MAP_SHARED (ENODEV).
        direct = bool(flags & os.O_DIRECT)
        return pyfuse3.FileInfo(fh=self._new_handle(node), keep_cache=True, direct_io=direct)

    @_guarded
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self.inodes.get(parent_inode)
        fname = _name(name)
        if parent.kind is not Kind.VM:
            raise _refuse(errno.EPERM, "create %s in %s refused: disk files live in VM directories",
                          fname, parent.label)
        if snapshot_name(fname) is not None:
            raise _refuse(errno.EPERM, "create %s/%s refused: snapshot files are made with "
                          "setfattr -n user.colofs.snapshot (or .clone) -v NAME DISK.raw", parent.vm, fname)
        disk = disk_name(fname)
        if disk is None:
            raise _refuse(errno.EINVAL, "create %s/%s refused: disk files are named DISK.raw",
                          parent.vm, fname)
        check_name("disk", disk)
        if self.inodes.child(parent, fname) is not None:
            raise pyfuse3.FUSEError(errno.EEXIST)
        node = self.inodes.add_pending(parent.vm, disk)
        log.info("%s: pending file created; the first truncate to a non-zero size creates the disk", node.label)
        attr = self._entry(node)
        return pyfuse3.FileInfo(fh=self._new_handle(node), keep_cache=True), attr

    # -- directories -----------------------------------------------------------------------

    @_guarded
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self.inodes.get(inode)
        if node.kind not in (Kind.ROOT, Kind.VM):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_guarded
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Entries come in inode order and next_id is the inode: creations never shift positions.
        for node in self.inodes.children(self.inodes.get(fh)):
            if node.ino <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, node.name.encode(), self.inodes.attributes(node), node.ino):
                break
            self.inodes.remember(node)

    async def releasedir(self, fh: int) -> None:
        pass

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass  # every change of the layout is durable when its request returns

    @_guarded
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self.inodes.get(parent_inode)
        if parent.kind is not Kind.ROOT:
            raise _refuse(errno.EPERM, "mkdir %s in %s refused: only VM directories, at the top",
                          _name(name), parent.label)
        vm = await self.store.create_vm(_name(name))
        self.repl.vm_created(vm.name)
        self.repl.events.emit("vm-created", vm=vm.name, role=vm.state.role)
        log.info("VM %s created by mkdir (role %s)", vm.name, vm.state.role)
        node = self.inodes.vm_node(vm.name)
        assert node is not None
        return self._entry(node)

    @_guarded
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self.inodes.get(parent_inode)
        node = self.inodes.child(parent, _name(name))
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if node.kind in SNAP_KINDS:
            raise _refuse(errno.EPERM, "unlink %s refused: delete a snapshot with "
                          "setfattr -x user.colofs.snapshot FILE (or mountctl snapshot --delete)", node.label)
        if node.kind is not Kind.PENDING:
            raise _refuse(errno.EPERM, "unlink %s refused: disks cannot be removed through the mount", node.label)
        self.inodes.unlink_pending(node)

    @_guarded
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise _refuse(errno.EPERM, "rmdir %s refused: VMs cannot be removed through the mount", _name(name))

    @_guarded
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        raise _refuse(errno.EPERM, "rename %s -> %s refused: names are fixed", _name(name_old), _name(name_new))

    @_guarded
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    @_guarded
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    @_guarded
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    @_guarded
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.store.path)
        out = pyfuse3.StatvfsData()
        out.f_bsize = st.f_bsize
        out.f_frsize = st.f_frsize
        out.f_blocks = st.f_blocks
        out.f_bfree = st.f_bfree
        out.f_bavail = st.f_bavail
        out.f_files = st.f_files
        out.f_ffree = st.f_ffree
        out.f_favail = st.f_favail
        out.f_namemax = 255
        return out

    # -- the control plane ---------------------------------------------------------------------

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if not name.startswith(PREFIX):
            # The hot path: the kernel asks for security.capability before every write(2).
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return await self._getxattr(inode, name, ctx)

    @_guarded
    async def _getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.control.get(self.inodes.get(inode), name, ctx.pid)

    @_guarded
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.control.set(self.inodes.get(inode), name, value, ctx.pid)

    @_guarded
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return self.control.list(self.inodes.get(inode))

    @_guarded
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.control.remove(self.inodes.get(inode), name, ctx.pid)
