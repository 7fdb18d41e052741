"""The control plane: extended attributes ``user.colofs.*`` on the mount.

It runs a little past 400 lines because the table of names below and the dispatch that serves
it are kept in one place, so the reference in docs/control.md is checked against one module.
What the commands do is their own modules' (the root's ``create`` and ``import``:
:mod:`colofs.fs.diskcommands`; a VM's: :mod:`colofs.fs.vmcontrol`, snapshots: :mod:`colofs.fs.snapshots`).

Reading an attribute answers a question (status as JSON); writing one runs a
command (checkpoint, failover, create, import, snapshot, clone); removing
``snapshot`` from a snapshot's own file deletes it. ``mountctl`` is a thin
client over exactly these names, and ``getfattr``/``setfattr`` work as well.

====================  =========================  ====================================
name                  on                         meaning
====================  =========================  ====================================
``status``            root, VM dir, disk file    get: JSON status of that node
``version``           root                       get: ``colofs VERSION control N``
``create``            root                       set: JSON ``{"vm","disk","size"[,"block_size"]}``
``import``            root                       set: JSON ``{"vm","disk","source"[,"size","block_size"]}``
``checkpoint``        VM dir                     set: checkpoint (value: empty, the seq, or JSON
                                                 ``{"seq", "timeout"}``); with a peer, via the secondary
``failover``          VM dir                     set: fail over to this host (value ignored)
``mode``              VM dir                     get/set: replication mode, ``async`` or ``sync``
``repair``            VM dir                     set: rebuild a damaged (quarantined) secondary copy
                                                 from the primary with a full digest-compared sync
``verify``            VM dir                     set: start (JSON options) or cancel an online verify
                                                 against the secondary; get: its progress or report
``snapshot``          disk file, VM dir          set: NAME: snapshot the disk (all disks at once)
``snapshot``          snapshot or clone file     get: its name; remove: delete it
``clone``             disk file, snapshot file   set: NAME: writable clone of the disk / snapshot
``clone``             clone file                 remove: delete it (like ``snapshot``)
``snapshots``         disk file, VM dir          get: JSON list of the snapshots and clones (E2BIG
                                                 once it outgrows one value: read the pages)
``snapshots.N``       disk file, VM dir          get: page N of that list, ``{"page","pages","count",
                                                 "snapshots"}`` (see :mod:`colofs.fs.paging`)
``vms.N``             root                       get: page N of the VM names (page 0 is in the
                                                 root's status, which holds counts and names only;
                                                 each VM's detail is its directory's status)
``block_size``        pending file               get/set: block size of the disk to be
``last_error``        everywhere                 get: message of the caller's last failed set, or empty
``last_result``       everywhere                 get: JSON outcome of the caller's last set
====================  =========================  ====================================

A failed write (or removal) answers with an errno only, so the daemon keeps
the message (and a JSON outcome) per calling process id: the client that just
failed reads ``last_error`` and prints what went wrong. Unknown names read as
``ENOATTR``; writing an unknown ``user.*`` name fails with ``EINVAL`` and a
name outside ``user.`` with ``EOPNOTSUPP`` (so ``cp -a`` skips it quietly).
No handler ever answers ``ENOSYS``: the kernel would stop asking for the rest
of the mount.
"""

from __future__ import annotations

import errno
import importlib.metadata
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pyfuse3

from colofs.core.blocks import MAX_BLOCK, MIN_BLOCK, block_size_ok
from colofs.core.errors import AlreadyExists, BadArgument
from colofs.core.store import Store
from colofs.core.vm import VM
from colofs.fs.config import MountConfig
from colofs.fs.diskcommands import CREATE, IMPORT, DiskCommands
from colofs.fs.errnos import errno_for
from colofs.fs.inodes import DISK_SUFFIX, SNAP_KINDS, InodeTable, Kind, Node
from colofs.fs.pagecache import PageCache
from colofs.fs.paging import compact, fits, page, paged_name
from colofs.fs.repair import REPAIR, repair_vm
from colofs.fs.replication import Replication
from colofs.fs.snapshots import SnapshotControl
from colofs.fs.values import Refused
from colofs.fs.verifycontrol import VERIFY, start_verify, verify_value
from colofs.fs.vmcontrol import CHECKPOINT, FAILOVER, VMControl

log = logging.getLogger(__name__)

PREFIX = b"user.colofs."
CONTROL_VERSION = 1


def _colofs_version() -> str:
    try:
        return importlib.metadata.version("colofs")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


COLOFS_VERSION = _colofs_version()

STATUS = "status"
VERSION = "version"
BLOCK_SIZE = "block_size"
LAST_ERROR = "last_error"
LAST_RESULT = "last_result"
SNAPSHOT = "snapshot"
CLONE = "clone"
SNAPSHOTS = "snapshots"
MODE = "mode"
DELETE = "delete"  # the op name outcomes of a removal carry

# Names that can be read, per kind of node (listxattr lists these).
READABLE: dict[Kind, tuple[str, ...]] = {
    Kind.ROOT: (STATUS, VERSION, LAST_ERROR, LAST_RESULT),
    Kind.VM: (STATUS, SNAPSHOTS, MODE, VERIFY, LAST_ERROR, LAST_RESULT),
    Kind.DISK: (STATUS, SNAPSHOTS, LAST_ERROR, LAST_RESULT),
    Kind.PENDING: (STATUS, BLOCK_SIZE, LAST_ERROR, LAST_RESULT),
    Kind.SNAPSHOT: (STATUS, SNAPSHOT, LAST_ERROR, LAST_RESULT),
    Kind.CLONE: (STATUS, SNAPSHOT, LAST_ERROR, LAST_RESULT),
}
WRITABLE: dict[Kind, tuple[str, ...]] = {
    Kind.ROOT: (CREATE, IMPORT),
    Kind.VM: (CHECKPOINT, FAILOVER, SNAPSHOT, MODE, REPAIR, VERIFY),
    Kind.DISK: (SNAPSHOT, CLONE),
    Kind.PENDING: (BLOCK_SIZE,),
    Kind.SNAPSHOT: (CLONE,),
    Kind.CLONE: (),
}
# Lists read in pages (``NAME.N``): they grow with the VMs or the snapshots.
PAGED: dict[Kind, tuple[str, ...]] = {
    Kind.ROOT: ("vms",),
    Kind.VM: (SNAPSHOTS,),
    Kind.DISK: (SNAPSHOTS,),
}
# Names whose removal runs a command: deleting the snapshot or clone itself.
REMOVABLE: dict[Kind, tuple[str, ...]] = {
    Kind.SNAPSHOT: (SNAPSHOT,),
    Kind.CLONE: (SNAPSHOT, CLONE),
}
# What to say when a name cannot be set on a node, where the generic message is not enough.
HINTS: dict[tuple[Kind, str], str] = {
    (Kind.CLONE, CLONE): "a clone cannot be cloned; clone the snapshot it was made from, or snapshot the disk",
    (Kind.CLONE, SNAPSHOT): "a clone cannot be snapshotted; snapshot the disk, or clone a snapshot",
    (Kind.SNAPSHOT, SNAPSHOT): "this file is already a snapshot; to clone it set user.colofs.clone, "
                               "to delete it remove user.colofs.snapshot (setfattr -x)",
    (Kind.ROOT, SNAPSHOT): "snapshot a disk file (VM/DISK.raw) or a VM directory",
}

MAX_OUTCOMES = 256  # callers whose last outcome is kept


@dataclass
class MountInfo:
    """Facts about the running mount that status reports."""

    config: MountConfig
    pid: int
    started: float
    worker: dict[str, Any] | None = None
    """A worker process's own facts (state, pid, restarts), shown in its VM's status; None in one process."""


class Outcomes:
    """The last control outcome of each calling process, bounded."""

    def __init__(self) -> None:
        self._by_pid: OrderedDict[int, dict[str, Any]] = OrderedDict()

    def record(self, pid: int, outcome: dict[str, Any]) -> None:
        self._by_pid[pid] = outcome
        self._by_pid.move_to_end(pid)
        while len(self._by_pid) > MAX_OUTCOMES:
            self._by_pid.popitem(last=False)

    def get(self, pid: int) -> dict[str, Any] | None:
        return self._by_pid.get(pid)


def _json(obj: object) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


class Control:
    """Answers the ``user.colofs.*`` requests of one mount."""

    def __init__(self, store: Store, inodes: InodeTable, cache: PageCache, info: MountInfo,
                 repl: Replication) -> None:
        self.store = store
        self.inodes = inodes
        self.cache = cache
        self.info = info
        self.repl = repl
        self.outcomes = Outcomes()
        self.io_errors: dict[str, int] = {}  # "VM/DISK" -> I/O errors answered since the mount
        self.snapshots = SnapshotControl(store, inodes, cache)
        self.vms = VMControl(store, inodes, cache, repl)
        self.disks = DiskCommands(store, inodes, repl, info.config.mountpoint)

    # -- the xattr handlers -------------------------------------------------------

    def list(self, node: Node) -> list[bytes]:
        return [PREFIX + n.encode() for n in READABLE[node.kind]]

    async def get(self, node: Node, name: bytes, pid: int) -> bytes:
        if not name.startswith(PREFIX):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)  # also the hot path: security.capability
        key = name[len(PREFIX) :].decode(errors="replace")
        if key not in READABLE[node.kind]:
            paged = paged_name(key)
            if paged is None or paged[0] not in PAGED.get(node.kind, ()):
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            return self._page(node, *paged)
        if key == STATUS:
            return _json(self.status_of(node))
        if key == VERSION:
            return f"colofs {COLOFS_VERSION} control {CONTROL_VERSION}\n".encode()
        if key == BLOCK_SIZE:
            return f"{node.block_size}\n".encode()
        if key == SNAPSHOTS:
            # The whole list while it fits one value; past that, only the pages (snapshots.N).
            listing = self.snapshots.listing(node)
            if not fits(listing):
                raise pyfuse3.FUSEError(errno.E2BIG)
            return compact(listing)
        if key == SNAPSHOT:
            return self.inodes.snapshot(node).name.encode()
        if key == MODE:
            return self.vms.mode(node)
        if key == VERIFY:
            return _json(verify_value(self.store, self.repl, node))
        outcome = self.outcomes.get(pid)
        if key == LAST_ERROR:
            return b"" if outcome is None or outcome["ok"] else outcome["error"].encode()
        return _json(outcome if outcome is not None else {})

    async def set(self, node: Node, name: bytes, value: bytes, pid: int) -> None:
        if not name.startswith(b"user."):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        key = name[len(PREFIX) :].decode(errors="replace") if name.startswith(PREFIX) else ""
        if key not in WRITABLE[node.kind]:
            where = f"{node.kind.value} {node.label}"
            hint = HINTS.get((node.kind, key))
            msg = (
                f"{name.decode(errors='replace')} cannot be set on {where}"
                + (f": {hint}" if hint else "")
                + (f" (settable here: {', '.join(WRITABLE[node.kind])})" if WRITABLE[node.kind] else "")
            )
            self._fail(pid, key or name.decode(errors="replace"), node, errno.EINVAL, msg)
            raise pyfuse3.FUSEError(errno.EINVAL)
        op = self._ops()[key]
        await self._run(pid, key, node, op(node, value))

    async def _run(self, pid: int, key: str, node: Node, command: Awaitable[dict[str, Any]]) -> None:
        """Run a command, recording its outcome for ``last_result``/``last_error``; failures become FUSEError."""
        started = time.monotonic()
        try:
            result = await command
        except Exception as e:
            code = e.code if isinstance(e, Refused) else errno_for(e)
            if isinstance(e, Refused | BadArgument | AlreadyExists) or code != errno.EIO:
                msg = str(e) or os.strerror(code)
            else:
                log.exception("control: %s on %s failed", key, node.label)
                msg = f"{e} (see the mount's log)"
            self._fail(pid, key, node, code, msg)
            raise pyfuse3.FUSEError(code) from None
        outcome = {"ok": True, "op": key, "target": node.label, "seconds": round(time.monotonic() - started, 6)}
        outcome.update(result)
        self.outcomes.record(pid, outcome)

    async def remove(self, node: Node, name: bytes, pid: int) -> None:
        key = name[len(PREFIX) :].decode(errors="replace") if name.startswith(PREFIX) else None
        if key is not None and key in REMOVABLE.get(node.kind, ()):
            await self._run(pid, DELETE, node, self.snapshots.delete(node))
            return
        if key is not None and (key in READABLE[node.kind] or key in WRITABLE[node.kind]):
            msg = f"{name.decode(errors='replace')} cannot be removed from {node.kind.value} {node.label}"
            if key in (SNAPSHOT, CLONE) and node.kind in (Kind.DISK, Kind.VM):
                msg += ": to delete snapshot NAME, remove the attribute on its own file, VM/DISK@NAME.raw"
            self._fail(pid, key, node, errno.EPERM, msg)
            raise pyfuse3.FUSEError(errno.EPERM)
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    def _fail(self, pid: int, op: str, node: Node, code: int, message: str) -> None:
        log.warning("control: %s on %s refused (%s): %s", op, node.label, errno.errorcode.get(code, code), message)
        self.outcomes.record(
            pid,
            {"ok": False, "op": op, "target": node.label, "errno": code,
             "errno_name": errno.errorcode.get(code, str(code)), "error": message},
        )

    def _ops(self) -> dict[str, Callable[[Node, bytes], Awaitable[dict[str, Any]]]]:
        return {
            CREATE: self.disks.create,
            IMPORT: self.disks.import_,
            CHECKPOINT: self.vms.request_checkpoint,
            FAILOVER: self.vms.failover,
            BLOCK_SIZE: self._set_block_size,
            MODE: self.vms.set_mode,
            SNAPSHOT: self._snapshot,
            CLONE: self.snapshots.clone,
            REPAIR: self._repair,
            VERIFY: self._verify,
        }

    async def _verify(self, node: Node, value: bytes) -> dict[str, Any]:
        return await start_verify(self.store, self.repl, node, value)

    async def _repair(self, node: Node, value: bytes) -> dict[str, Any]:
        return await repair_vm(self.store, self.repl, self.inodes, self.cache, node)

    async def _snapshot(self, node: Node, value: bytes) -> dict[str, Any]:
        if node.kind is Kind.VM:
            return await self.snapshots.snapshot_vm(node, value)
        return await self.snapshots.snapshot_disk(node, value)

    # -- commands -------------------------------------------------------------------

    async def root_command(self, key: str, req: dict[str, Any]) -> dict[str, Any]:
        """The root's ``create`` or ``import`` asked by a supervisor (no FUSE request): its ``last_result``."""
        return await self.disks.root_command(key, req)

    async def _set_block_size(self, node: Node, value: bytes) -> dict[str, Any]:
        text = value.decode(errors="replace").strip()
        if not text.isdigit():
            raise Refused(errno.EINVAL, f"block_size: {text!r} is not a number")
        bs = int(text)
        if not block_size_ok(bs):
            raise Refused(errno.EINVAL, f"block_size: {bs} is not a power of two from {MIN_BLOCK} to {MAX_BLOCK}")
        node.block_size = bs
        return {"block_size": bs}

    # -- status ---------------------------------------------------------------------------

    def status_of(self, node: Node) -> dict[str, Any]:
        if node.kind is Kind.ROOT:
            return self.root_status()
        if node.kind is Kind.VM:
            st = {"kind": "vm", "mountpoint": self.info.config.mountpoint, **self.vm_status(self.store.vm(node.vm))}
            if self.info.worker is not None:
                st["worker"] = dict(self.info.worker)
            return st
        if node.kind is Kind.PENDING:
            return {"kind": "pending", "vm": node.vm, "disk": node.disk, "size": 0, "block_size": node.block_size,
                    "note": "no disk yet: the first truncate to a non-zero size creates it"}
        if node.kind in SNAP_KINDS:
            return self.snapshots.status(node)
        vm = self.store.vm(node.vm)
        return {
            "kind": "disk", "vm": vm.name, "disk": node.disk, "role": vm.state.role,
            "phase": vm.status()["phase"], "epoch": vm.state.epoch, **self.disk_status(vm, node.disk),
        }

    def root_status(self) -> dict[str, Any]:
        cfg = self.info.config
        return {
            "kind": "root",
            "version": COLOFS_VERSION,
            "control_version": CONTROL_VERSION,
            "store": self.store.path,
            "node_id": self.store.node_id,
            "default_role": self.store.default_role,
            "mountpoint": cfg.mountpoint,
            "pid": self.info.pid,
            "started": self.info.started,
            "log_file": cfg.log_file,
            "lock_file": cfg.lock_file,
            "replication": self.repl.root_status(),
            **self._vm_names(),
        }

    def _vm_names(self) -> dict[str, Any]:
        """Counts and the first page of VM names: the root's status stays bounded however many VMs.

        Each VM's detail is its directory's status; further pages of names are ``vms.N``.
        """
        names = sorted(self.store.vms)
        first = page(names, 0, "vms")
        assert first is not None
        roles = [vm.state.role for vm in self.store.vms.values()]
        return {"vm_count": len(names), "vm_roles": {r: roles.count(r) for r in sorted(set(roles))},
                "vms": first["vms"], "vm_pages": first["pages"]}

    def _page(self, node: Node, key: str, number: int) -> bytes:
        """Page ``number`` of a list that may outgrow one value (see :mod:`colofs.fs.paging`)."""
        items: list[Any] = self.snapshots.listing(node) if key == SNAPSHOTS else sorted(self.store.vms)
        got = page(items, number, key)
        if got is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return compact(got)

    def vm_status(self, vm: VM) -> dict[str, Any]:
        st = dict(vm.status())
        rec = vm.recovery
        st["recovery"] = {"action": rec.action, "blocks": rec.blocks, "resume_seq": rec.resume_seq}
        st["peer"] = self.repl.vm_status(vm)
        st["mode"] = st["peer"]["mode"]
        st["disks"] = {name: self.disk_status(vm, name) for name in sorted(vm.disks)}
        st["pending"] = [n.name for n in self.inodes.pending_of(vm.name)]
        st["last_op"] = self.vms.last_ops.get(vm.name)
        st["verify"] = self.repl.verify_status(vm)
        return st

    def disk_status(self, vm: VM, disk: str) -> dict[str, Any]:
        st = dict(vm.disk(disk).status())
        # A count, not the list: the list is the paged snapshots attribute.
        st["snapshot_count"] = len(st.pop("snapshots", ()))
        st["file"] = disk + DISK_SUFFIX
        st["io_errors"] = self.io_errors.get(f"{vm.name}/{disk}", 0)
        return st
