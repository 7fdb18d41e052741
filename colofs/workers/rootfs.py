"""The supervisor's FUSE filesystem: the root of the mount, a directory per VM, the store-wide control.

Each VM directory is the mountpoint of that VM's worker, whose own mount
covers it while the worker serves; what this filesystem answers inside a VM
directory is only seen while it does not (the worker is starting, crashed or
failed): its ``user.colofs.status`` then says the worker's state, and
anything inside is ``EAGAIN`` (coming back) or ``ENOENT``. A lookup inside
the directory of a VM whose worker was just started (a secondary's VM the
primary attached) first waits for the worker to open the VM. The root's
``create`` and ``import`` run in the VM's worker (:mod:`colofs.workers.rootcontrol`).

A new VM's worker mounts once the ``mkdir`` or root ``create`` that made the
VM has returned: the kernel holds the root's lock through both, and the
mount looks the VM's directory up in the root. What a caller does next must
not fail in that moment, nor wait where it would hold up the mount:

- ``mkdir`` returns once the worker has made the VM in the store; a root
  ``create``/``import`` once the worker ran it there.
- Inside a VM directory whose worker is about to mount, the answer is
  ``ESTALE``: the kernel then walks the path again, revalidating each name,
  and the revalidation of the VM's directory (a lookup in the root while
  the kernel already holds that directory, which takes no lock the mount
  needs) waits here for the worker's mount, so the walk goes on into it.
- A lookup that may be a first one (the kernel does not hold the directory
  yet, so another lookup of that name would wait on it, the mount's
  included), and any request from the worker itself, never waits.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pyfuse3
import trio
import xxhash

from colofs.core.errors import ColofsError
from colofs.core.names import check_name
from colofs.fs.control import (
    COLOFS_VERSION,
    CONTROL_VERSION,
    CREATE,
    HINTS,
    IMPORT,
    LAST_ERROR,
    LAST_RESULT,
    PREFIX,
    STATUS,
    VERSION,
    Outcomes,
)
from colofs.fs.errnos import errno_for
from colofs.fs.inodes import Kind
from colofs.fs.paging import compact, page, paged_name
from colofs.fs.values import Refused
from colofs.workers.channel import RemoteError
from colofs.workers.fleet import Fleet
from colofs.workers.rootcontrol import RootCommands, unserved_vm_status
from colofs.workers.table import CRASHED, RESTARTING, STARTING
from colofs.workers.zygote import ZygoteError

log = logging.getLogger(__name__)

ROOT_INO: int = pyfuse3.ROOT_INODE
ENTRY_TIMEOUT = 1.0  # a VM's worker mount comes and goes: let the kernel look again soon
ATTR_TIMEOUT = 1.0
OPEN_WAIT = 60.0
"""How long ``mkdir`` waits for the new VM's worker to make it in the store, and a status read for its mount."""
REVALIDATE_WAIT = 20.0
"""How long a revalidation of a VM's directory waits for its worker's mount (normally a few milliseconds)."""
COMING = (STARTING, CRASHED, RESTARTING)
ROOT_READABLE = (STATUS, VERSION, LAST_ERROR, LAST_RESULT)
VM_READABLE = (STATUS, LAST_ERROR, LAST_RESULT)


def vm_inode(name: str) -> int:
    """A VM directory's inode number: from its name, the same in every run."""
    return (xxhash.xxh3_64_intdigest(b"vm-dir:" + name.encode()) & ((1 << 63) - 1)) | (1 << 16)


def _thread_group(pid: int) -> int | None:
    """The process a request's thread belongs to (FUSE gives the thread's id), None if it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _json(obj: object) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


class RootOperations(pyfuse3.Operations):
    """The root of a ``--workers`` mount."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, fleet: Fleet, *, role: str, store: str, status: Callable[[], dict[str, Any]],
                 nursery: trio.Nursery, memory: Callable[[], Awaitable[dict[str, Any]]] | None = None) -> None:
        super().__init__()
        self.fleet = fleet
        self.role = role
        self.store = store
        self.root_info = status
        self.memory = memory
        self.nursery = nursery
        self.outcomes = Outcomes()
        self.uid, self.gid = os.getuid(), os.getgid()
        self.born = time.time_ns()
        self.commands = RootCommands(fleet, role)
        self._known: dict[int, int] = {}  # the kernel's lookup count of each VM directory

    # -- names and attributes ----------------------------------------------------------------

    def _vm_of(self, inode: int) -> str | None:
        for name in self.fleet.table.workers:
            if vm_inode(name) == inode:
                return name
        return None

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_mode = stat.S_IFDIR | 0o755
        attr.st_nlink = 2 + (len(self.fleet.table.workers) if inode == ROOT_INO else 0)
        attr.st_uid, attr.st_gid = self.uid, self.gid
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self.born
        attr.st_blksize = 4096
        attr.entry_timeout = ENTRY_TIMEOUT
        attr.attr_timeout = ATTR_TIMEOUT
        return attr

    def _node(self, inode: int) -> str:
        """``""`` for the root, the VM's name for its directory; ENOENT otherwise."""
        if inode == ROOT_INO:
            return ""
        vm = self._vm_of(inode)
        if vm is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return vm

    def _entry(self, inode: int) -> pyfuse3.EntryAttributes:
        """An entry handed to the kernel, which counts it until it forgets it."""
        if inode != ROOT_INO:
            self._known[inode] = self._known.get(inode, 0) + 1
        return self._attr(inode)

    def _mounting(self, vm: str) -> bool:
        """The VM's worker has opened it and is about to mount (or mounting) its directory."""
        w = self.fleet.table.get(vm)
        return w is not None and w.state == STARTING and w.opened and w.pid is not None

    def _uncovered(self, vm: str) -> int:
        """The errno for a request inside a VM directory its worker does not cover (see the module's doc)."""
        if self._mounting(vm):
            return errno.ESTALE  # walk again: the revalidation of the directory waits for the mount
        w = self.fleet.table.get(vm)
        return errno.EAGAIN if w is not None and w.state in COMING else errno.ENOENT

    async def _uncovered_once_open(self, vm: str, pid: int) -> int:
        """:meth:`_uncovered`, after waiting (bounded) for a VM whose new worker has not opened it yet.

        Such a VM's directory is listed (a secondary's worker starts when the
        primary attaches the VM) but nothing inside can be served before its
        worker has opened the store; after that the answer is ``ESTALE`` and
        the walk goes on into the mount. Opening takes no lock of this mount,
        so the wait cannot hold the worker up; the worker's own requests never wait.
        """
        w = self.fleet.table.get(vm)
        if w is not None and w.state == STARTING and not w.opened:
            if w.pid is None or await trio.to_thread.run_sync(_thread_group, pid) != w.pid:
                await self.fleet.wait_for(lambda: self.fleet.opened_or_gone(vm), OPEN_WAIT)
        return self._uncovered(vm)

    async def _await_mount(self, vm: str, pid: int) -> None:
        """Wait for ``vm``'s worker to serve, unless the request may hold up its mount (see the module's doc)."""
        if not self._mounting(vm) or not self._known.get(vm_inode(vm)):
            return
        worker = self.fleet.table.workers[vm].pid
        if await trio.to_thread.run_sync(_thread_group, pid) == worker:
            return  # the worker itself, finding its mountpoint
        await self.fleet.wait_for(lambda: self.fleet.settled(vm), REVALIDATE_WAIT)

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        vm = self._node(parent_inode)
        text = name.decode("utf-8", "surrogateescape")
        if text in (".", ".."):
            return self._entry(parent_inode if text == "." or not vm else ROOT_INO)
        if vm:  # inside a VM directory its worker does not cover
            raise pyfuse3.FUSEError(await self._uncovered_once_open(vm, ctx.pid))
        if text not in self.fleet.table:
            raise pyfuse3.FUSEError(errno.ENOENT)
        await self._await_mount(text, ctx.pid)
        if text not in self.fleet.table:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._entry(vm_inode(text))

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._node(inode)
        return self._attr(inode)

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._node(inode)
        if fields.update_atime or fields.update_mtime or fields.update_ctime:
            return self._attr(inode)  # touch of a directory: accepted, nothing kept
        raise pyfuse3.FUSEError(errno.EPERM)

    async def forget(self, inode_list: Any) -> None:
        for inode, count in inode_list:
            left = self._known.get(inode, 0) - count
            if left > 0:
                self._known[inode] = left
            else:
                self._known.pop(inode, None)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        vm = self._node(inode)
        if vm and self._mounting(vm):
            raise pyfuse3.FUSEError(errno.ESTALE)  # its listing is the worker's, moments away
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if fh != ROOT_INO:
            return  # a VM directory no worker covers lists nothing
        names = self.fleet.table.names()
        for i in range(start_id, len(names)):
            if not pyfuse3.readdir_reply(token, names[i].encode(), self._attr(vm_inode(names[i])), i + 1):
                return
            self._entry(vm_inode(names[i]))  # counted once the kernel took it

    async def releasedir(self, fh: int) -> None:
        return None

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = await trio.to_thread.run_sync(os.statvfs, self.store)
        out = pyfuse3.StatvfsData()
        for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
            setattr(out, f, getattr(st, f))
        out.f_namemax = 255
        return out

    # -- changes: only a new VM directory ----------------------------------------------------------

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        inside = self._node(parent_inode)
        if inside:
            log.warning("mkdir %r inside VM %s refused: its worker is not serving", name, inside)
            raise pyfuse3.FUSEError(self._uncovered(inside))
        try:
            vm = check_name("VM", name.decode("utf-8", "surrogateescape"))
        except ColofsError as e:
            log.warning("mkdir refused: %s", e)
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        if vm in self.fleet.table:
            raise pyfuse3.FUSEError(errno.EEXIST)
        fleet = self.fleet
        log.info("VM %s created by mkdir (role %s): starting its worker", vm, self.role)
        try:
            started = await fleet.start(vm, create_vm=self.role)
        except ZygoteError as e:
            fleet.table.workers.pop(vm, None)  # nothing was made: no directory is left behind
            log.error("mkdir %s: %s", vm, e)
            raise pyfuse3.FUSEError(errno.EAGAIN) from None
        # The VM exists in the store once its worker opened it; the mount follows within moments (it
        # cannot come before this mkdir returns: the kernel holds the root's lock until then).
        await fleet.wait_for(lambda: fleet.opened_or_gone(vm) or started.error is not None, OPEN_WAIT)
        w = fleet.table.get(vm)
        if w is not None and not w.opened:
            why = w.error or f"its worker is {w.state}"
            log.error("mkdir %s: the VM was not made: %s", vm, why)
            fleet.forget_pending(vm, why="mkdir could not make it", pending_only=False)
            raise pyfuse3.FUSEError(errno.EIO)
        fleet.bus.emit("vm-created", vm=vm, role=self.role)  # as one process's mkdir says
        return self._entry(vm_inode(vm))

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        self._node(inode)
        raise pyfuse3.FUSEError(errno.EISDIR)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        inside = self._node(parent_inode)
        raise pyfuse3.FUSEError(self._uncovered(inside) if inside else errno.EPERM)

    async def _refuse(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    unlink = rmdir = rename = link = symlink = mknod = _refuse  # type: ignore[assignment]

    # -- the control plane -------------------------------------------------------------------

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        names = VM_READABLE if self._node(inode) else ROOT_READABLE
        return [PREFIX + n.encode() for n in names]

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        vm = self._node(inode)
        if not name.startswith(PREFIX):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        key = name[len(PREFIX):].decode(errors="replace")
        if key == STATUS:
            if vm:
                if self._mounting(vm):
                    # Its mount is moments away: answer once it is there (or the worker gave up), so a
                    # reader right after ``mkdir`` or ``create`` learns when the VM serves.
                    await self.fleet.wait_for(lambda: self.fleet.settled(vm), OPEN_WAIT)
                return _json(unserved_vm_status(self.fleet.table, vm))
            info = self.root_info()
            if self.memory is not None:
                info["memory"] = await self.memory()  # /proc reads, off the loop
            return _json(info)
        if key in (LAST_ERROR, LAST_RESULT):
            outcome = self.outcomes.get(ctx.pid)
            if key == LAST_ERROR:
                return b"" if outcome is None or outcome["ok"] else outcome["error"].encode()
            return _json(outcome if outcome is not None else {})
        if not vm and key == VERSION:
            return f"colofs {COLOFS_VERSION} control {CONTROL_VERSION}\n".encode()
        paged = paged_name(key)
        if not vm and paged is not None and paged[0] == "vms":
            got = page(self.fleet.table.names(), paged[1], "vms")
            if got is not None:
                return compact(got)
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._node(inode)
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        vm = self._node(inode)
        if not name.startswith(b"user."):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        key = name[len(PREFIX):].decode(errors="replace") if name.startswith(PREFIX) else ""
        target = vm or "root"
        if vm:
            w = self.fleet.table.get(vm)
            state = w.state if w is not None else "missing"
            code = self._uncovered(vm)
            if code == errno.ESTALE:
                raise pyfuse3.FUSEError(code)  # the kernel asks again, and then reaches the worker
            self._fail(ctx.pid, key, target, errno.EAGAIN,
                       f"VM {vm}: its worker is {state}, not serving; try again once it serves")
            raise pyfuse3.FUSEError(errno.EAGAIN)
        if key not in (CREATE, IMPORT):
            hint = HINTS.get((Kind.ROOT, key))  # the same words as one process's root
            msg = (f"{name.decode(errors='replace')} cannot be set on the root" + (f": {hint}" if hint else "")
                   + f" (settable here: {CREATE}, {IMPORT})")
            self._fail(ctx.pid, key, target, errno.EINVAL, msg)
            raise pyfuse3.FUSEError(errno.EINVAL)
        started = time.monotonic()
        try:
            result = await self.commands.run(key, value)
        except Exception as e:
            if isinstance(e, Refused | RemoteError):
                code, msg = (e.code, str(e)) if isinstance(e, Refused) else (e.errno, e.message)
            else:
                code, msg = errno_for(e), str(e) or type(e).__name__
                if not isinstance(e, ColofsError):
                    log.exception("control: %s on the root failed", key)
            self._fail(ctx.pid, key, target, code, msg)
            raise pyfuse3.FUSEError(code) from None
        outcome = {"ok": True, "op": key, "target": target, "seconds": round(time.monotonic() - started, 6)}
        outcome.update({k: v for k, v in result.items() if k not in ("reply_to", "ok", "op", "target", "seconds")})
        self.outcomes.record(ctx.pid, outcome)

    def _fail(self, pid: int, op: str, target: str, code: int, message: str) -> None:
        log.warning("control: %s on %s refused (%s): %s", op, target, errno.errorcode.get(code, code), message)
        self.outcomes.record(pid, {"ok": False, "op": op, "target": target, "errno": code,
                                   "errno_name": errno.errorcode.get(code, str(code)), "error": message})

    # -- files: none here -----------------------------------------------------------------------

    async def read(self, fh: int, off: int, size: int) -> bytes:
        raise pyfuse3.FUSEError(errno.EBADF)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        raise pyfuse3.FUSEError(errno.EBADF)

    async def release(self, fh: int) -> None:
        return None

    async def flush(self, fh: int) -> None:
        return None

    async def fsync(self, fh: int, datasync: bool) -> None:
        return None

