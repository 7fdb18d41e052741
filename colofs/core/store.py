"""A host's store: one directory holding a directory per VM, each holding one per disk.

    STORE/colofs-store        format marker and this node's id
    STORE/VM/state            the VM's state (role, epoch, generation, seqs, disks)
    STORE/VM/DISK/base.raw    base: sparse raw image of the disk's size
    STORE/VM/DISK/hidden.log  hidden layer (copy-before-write undo of base)
    STORE/VM/DISK/active.log  active layer (the secondary VM's own writes)
"""

from __future__ import annotations

import logging
import os
import uuid

import trio

from colofs.core.disk import Disk
from colofs.core.errors import AlreadyExists, BadArgument, NotFound, StoreError
from colofs.core.fileio import fsync_dir
from colofs.core.names import check_name
from colofs.core.state import ROLES, read_store_marker, write_store_marker
from colofs.core.vm import STATE_FILE, VM

log = logging.getLogger(__name__)

MARKER = "colofs-store"


class Store:
    """All VMs of this host. Open it once per process; close it to mark everything clean."""

    def __init__(self, path: str, node_id: str, default_role: str) -> None:
        self.path = path
        self.node_id = node_id
        self.default_role = default_role
        self.vms: dict[str, VM] = {}

    @classmethod
    async def open(cls, path: str, *, role: str, create: bool = False) -> Store:
        """Open (and with ``create``, initialise) the store; recovers every VM that crashed.

        ``role`` is the role given to VMs created from now on; each existing
        VM keeps the role its state records (a failover changes it).
        """
        if role not in ROLES:
            raise BadArgument(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        path = os.path.abspath(path)
        marker = os.path.join(path, MARKER)
        if create and not os.path.exists(marker):
            os.makedirs(path, mode=0o700, exist_ok=True)
            if any(not e.startswith(".") for e in os.listdir(path)):
                raise StoreError(f"{path}: refusing to create a store in a non-empty directory")
            write_store_marker(marker, uuid.uuid4().hex)
            log.info("created store %s", path)
        if not os.path.isdir(path):
            raise StoreError(f"{path}: no such store directory")
        info = read_store_marker(marker)
        store = cls(path, info["node_id"], role)
        try:
            for entry in sorted(os.listdir(path)):
                vm_path = os.path.join(path, entry)
                if entry.startswith(".") or not os.path.isdir(vm_path):
                    continue
                if not os.path.exists(os.path.join(vm_path, STATE_FILE)):
                    log.warning("store %s: ignoring %s, which has no VM state", path, entry)
                    continue
                store.vms[entry] = await VM.open(vm_path)
        except BaseException:
            store.abandon()
            raise
        return store

    def vm(self, name: str) -> VM:
        try:
            return self.vms[name]
        except KeyError:
            raise NotFound(f"no VM {name!r} in store {self.path}") from None

    def disk(self, vm: str, disk: str) -> Disk:
        return self.vm(vm).disk(disk)

    async def create_vm(self, name: str, role: str | None = None) -> VM:
        check_name("VM", name)
        if name in self.vms:
            raise AlreadyExists(f"VM {name} already exists")
        vm = await VM.create(os.path.join(self.path, name), name, role or self.default_role)
        self.vms[name] = vm
        return vm

    async def create_disk(
        self,
        vm: str,
        disk: str,
        size: int,
        *,
        block_size: int = 4096,
        source: str | None = None,
        role: str | None = None,
    ) -> Disk:
        """Create a disk, and its VM if it does not exist yet."""
        check_name("VM", vm)
        check_name("disk", disk)
        vm_obj = self.vms.get(vm) or await self.create_vm(vm, role)
        return await vm_obj.add_disk(disk, size, block_size, source)

    async def close(self) -> None:
        for vm in self.vms.values():
            await vm.close()
        await trio.to_thread.run_sync(fsync_dir, self.path)

    def abandon(self) -> None:
        for vm in self.vms.values():
            if not vm.closed:
                vm.abandon()
