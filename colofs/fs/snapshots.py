"""Snapshots and clones through the mount: the commands behind ``user.colofs.snapshot`` and ``.clone``.

A snapshot of ``VM/DISK.raw`` named ``NAME`` appears as ``VM/DISK@NAME.raw``
(``@`` cannot occur in names). What it holds:

* on a primary, the disk as it was when the request arrived: every write that
  completed before it, buffered ones and mmap included, because the kernel's
  dirty pages are written back before the core takes the snapshot;
* on a secondary, the image of the last checkpoint (the primary's disk at
  that checkpoint); the secondary VM's own writes are never in it.

Snapshot requests of one VM are serialised here: two requests for the same
name must not race inside the core, and a deletion must not overlap the
creation of a clone on the same snapshot.

Deleting refuses (``EBUSY``) while a clone is built on the snapshot or a
file handle on it is open: a VM or ``qemu-img`` reading it would otherwise
lose its image under its feet. A ``close(2)`` reaches the daemon as a
``release`` a moment later, so a deletion right after a close waits briefly
for it before refusing.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import trio

from colofs.core.errors import InUse, InvalidName
from colofs.core.names import check_name
from colofs.core.snapshot import Snapshot
from colofs.core.state import FAILOVER, PRIMARY, SNAPSHOT
from colofs.core.store import Store
from colofs.core.vm import VM
from colofs.fs.inodes import SNAP_SEP, InodeTable, Kind, Node
from colofs.fs.pagecache import PageCache

log = logging.getLogger(__name__)

RELEASE_GRACE = 1.0  # seconds a deletion waits for the release of handles just closed


def parse_name(value: bytes, kind: str) -> str:
    """The snapshot or clone name in an xattr value, checked as the core checks names."""
    try:
        name = value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidName(f"{kind} name {value[:80]!r} is not UTF-8") from None
    if SNAP_SEP in name:
        raise InvalidName(f"{kind} name {name!r} contains {SNAP_SEP!r}, which separates a disk from its snapshots")
    return check_name(kind, name)


def entry(node: Node, snap: Snapshot) -> dict[str, Any]:
    """What listings and status say about one snapshot or clone."""
    return {
        "disk": node.disk,
        **snap.info(),
        "file": node.name,
        "size": snap.size,
        "open_handles": node.open_handles,
    }


class SnapshotControl:
    """Creates, clones, lists and deletes snapshots for the control plane of one mount."""

    def __init__(self, store: Store, inodes: InodeTable, cache: PageCache) -> None:
        self.store = store
        self.inodes = inodes
        self.cache = cache
        self._locks: dict[str, trio.Lock] = {}

    def _lock(self, vm: str) -> trio.Lock:
        lock = self._locks.get(vm)
        if lock is None:
            lock = self._locks[vm] = trio.Lock()
        return lock

    @staticmethod
    def _sees_page_cache(vm: VM) -> bool:
        """Whether the snapshot is of the disk as written here (not the last checkpoint's image)."""
        return vm.state.role == PRIMARY or vm.state.phase == FAILOVER

    def _node(self, vm: str, disk: str, name: str) -> Node:
        node = self.inodes.snap_node(vm, disk, name)
        assert node is not None, "the core just made it"
        return node

    # -- creation --------------------------------------------------------------------

    async def snapshot_disk(self, node: Node, value: bytes) -> dict[str, Any]:
        """``setfattr -n user.colofs.snapshot -v NAME VM/DISK.raw``."""
        name = parse_name(value, "snapshot")
        vm = self.store.vm(node.vm)
        async with self._lock(vm.name):
            t0 = time.monotonic()
            if self._sees_page_cache(vm):
                await self.cache.write_back([node])
            t1 = time.monotonic()
            snaps = await vm.snapshot(name, [node.disk])
            t2 = time.monotonic()
            return self._created(vm, snaps, t1 - t0, t2 - t1)

    async def snapshot_vm(self, node: Node, value: bytes) -> dict[str, Any]:
        """``setfattr -n user.colofs.snapshot -v NAME VM``: every disk of the VM at one instant."""
        name = parse_name(value, "snapshot")
        vm = self.store.vm(node.vm)
        async with self._lock(vm.name):
            t0 = time.monotonic()
            if self._sees_page_cache(vm):
                await self.cache.write_back(self.inodes.disk_nodes(vm.name))
            t1 = time.monotonic()
            snaps = await vm.snapshot(name)
            t2 = time.monotonic()
            return self._created(vm, snaps, t1 - t0, t2 - t1)

    def _created(self, vm: VM, snaps: list[Snapshot], writeback: float, took: float) -> dict[str, Any]:
        first = snaps[0]
        files = [self._node(vm.name, s.disk.name, s.name).name for s in snaps]
        log.info("VM %s: snapshot %s of %s at seq %d (%s) in %.3f s", vm.name, first.name,
                 ", ".join(s.disk.name for s in snaps), first.state.seq, vm.state.role, writeback + took)
        return {
            "vm": vm.name, "name": first.name, "kind": SNAPSHOT, "role": vm.state.role,
            "disks": [s.disk.name for s in snaps], "files": files, "seq": first.state.seq,
            "created": first.state.created, "writeback_seconds": round(writeback, 6),
            "snapshot_seconds": round(took, 6),
        }

    async def clone(self, node: Node, value: bytes) -> dict[str, Any]:
        """``setfattr -n user.colofs.clone -v NAME`` on ``DISK.raw`` (the disk now) or ``DISK@SNAP.raw``."""
        name = parse_name(value, "clone")
        vm = self.store.vm(node.vm)
        async with self._lock(vm.name):
            t0 = time.monotonic()
            if node.kind is Kind.SNAPSHOT:
                base = self.inodes.snapshot(node)  # ENOENT if it was deleted meanwhile
                snap = await vm.clone(node.disk, name, from_snapshot=base.name)
            else:
                if self._sees_page_cache(vm):
                    await self.cache.write_back([node])
                snap = await vm.clone(node.disk, name)
            took = time.monotonic() - t0
            log.info("%s: clone %s of %s at seq %d in %.3f s", snap.disk.label, name,
                     f"snapshot {snap.state.base}" if snap.state.base else "the disk", snap.state.seq, took)
            return {
                "vm": vm.name, "disk": node.disk, "name": name, "kind": snap.state.kind, "role": vm.state.role,
                "base": snap.state.base, "seq": snap.state.seq, "created": snap.state.created,
                "file": self._node(vm.name, node.disk, name).name,
            }

    # -- deletion --------------------------------------------------------------------

    async def delete(self, node: Node) -> dict[str, Any]:
        """``setfattr -x user.colofs.snapshot VM/DISK@NAME.raw``: delete it and free its space."""
        vm = self.store.vm(node.vm)
        async with self._lock(vm.name):
            snap = self.inodes.snapshot(node)
            disk = snap.disk
            users = sorted(n for n, s in disk.snapshots.items() if s.base is snap)
            if users:
                files = ", ".join(f"{disk.name}{SNAP_SEP}{u}.raw" for u in users)
                raise InUse(f"{node.label}: clone {', '.join(users)} ({files}) is built on it; delete the clone first")
            await self._wait_closed(node)
            node.deleting = True  # no await since the check: no open slips in between
            try:
                freed = await vm.delete_snapshot(disk.name, snap.name)
            finally:
                node.deleting = False
            self.inodes.unlink_snapshot(node)
            parent = self.inodes.vm_node(vm.name)
            if parent is not None:
                await self.cache.forget_entry(parent, node)
            return {"vm": vm.name, "disk": disk.name, "name": snap.name, "kind": snap.state.kind,
                    "file": node.name, "freed_bytes": freed}

    async def _wait_closed(self, node: Node) -> None:
        deadline = trio.current_time() + RELEASE_GRACE
        while node.open_handles > 0 and trio.current_time() < deadline:
            await trio.sleep(0.01)
        if node.open_handles > 0:
            raise InUse(
                f"{node.label}: {node.name} is open ({node.open_handles} file handle"
                f"{'s' if node.open_handles != 1 else ''}: a VM, qemu-img or a mapping uses it); close it first"
            )

    # -- queries -----------------------------------------------------------------------

    def listing(self, node: Node) -> list[dict[str, Any]]:
        """The snapshots and clones of a disk (on ``DISK.raw``) or of every disk (on the VM directory)."""
        disk = node.disk if node.kind is Kind.DISK else None
        return [entry(n, self.inodes.snapshot(n)) for n in self.inodes.snapshot_nodes(node.vm, disk)]

    def status(self, node: Node) -> dict[str, Any]:
        snap = self.inodes.snapshot(node)
        vm = self.store.vm(node.vm)
        clones = sorted(n for n, s in snap.disk.snapshots.items() if s.base is snap)
        return {
            **entry(node, snap), "vm": vm.name, "role": vm.state.role, "block_size": snap.disk.block_size,
            "clones": clones,
        }

