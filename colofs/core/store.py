"""A host's store: one directory holding a directory per VM, each holding one per disk.

    STORE/colofs-store        format marker and this node's id
    STORE/VM/state            the VM's state (role, epoch, generation, seqs, disks)
    STORE/VM/DISK/base.raw    base: sparse raw image of the disk's size
    STORE/VM/DISK/hidden.log  hidden layer (copy-before-write undo of base)
    STORE/VM/DISK/active.log  active layer (the secondary VM's own writes)
    STORE/VM/damaged.json     present while the VM is quarantined (colofs.core.damage)
    STORE/.damaged-VM-TIME/   a damaged VM's directory, moved aside by a repair

A VM that cannot be opened because its files are damaged (or its state file
is missing or unreadable) does not stop the store: it is *quarantined*, kept
in :attr:`Store.vms` with no disks and its damage in ``status``, and every
other VM opens and serves.
"""

from __future__ import annotations

import logging
import os
import uuid

import trio

from colofs.core.damage import Damage, damage_of, load_marker, move_aside, save_marker
from colofs.core.disk import Disk
from colofs.core.errors import (
    AlreadyExists,
    BadArgument,
    DiskIOError,
    NotFound,
    RoleError,
    StateMissing,
    StoreError,
    StoreVersionError,
)
from colofs.core.fileio import fsync_dir
from colofs.core.ioctx import IOContext
from colofs.core.names import check_name
from colofs.core.state import (
    ROLES,
    SECONDARY,
    VMState,
    load_vm_state,
    read_store_marker,
    write_store_marker,
)
from colofs.core.vm import VM
from colofs.core.vmbase import STATE_FILE

log = logging.getLogger(__name__)

MARKER = "colofs-store"
UNKNOWN_ROLE = "unknown"  # a quarantined VM whose state file cannot be read


class Store:
    """All VMs of this host. Open it once per process; close it to mark everything clean."""

    def __init__(self, path: str, node_id: str, default_role: str, io: IOContext | None = None,
                 only: str | None = None) -> None:
        self.path = path
        self.only = only
        """The one VM this store is scoped to (a worker process's), or None for every VM."""
        self.io = io if io is not None else IOContext.from_environment()
        """The worker pool, read policy and writeback every VM and disk of the store uses; closed with it."""
        self.node_id = node_id
        self.default_role = default_role
        self.vms: dict[str, VM] = {}

    @classmethod
    async def open(cls, path: str, *, role: str, create: bool = False, io: IOContext | None = None,
                   only: str | None = None) -> Store:
        """Open (and with ``create``, initialise) the store; recovers every VM that crashed.

        With ``only``, the store is scoped to that one VM: only its directory
        is opened (and recovered), only it can be created, and closing closes
        only it. Another process (a worker per VM) owns each other VM's files.

        ``role`` is the role given to VMs created from now on; each existing
        VM keeps the role its state records (a failover changes it). ``io``
        defaults to a new context (``COLOFS_SMALL_READS`` may pin its read
        policy); the store owns it either way and closes it in :meth:`close`.
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
        if only is not None:
            check_name("VM", only)
        store = cls(path, info["node_id"], role, io, only)
        try:
            entries = [only] if only is not None else sorted(os.listdir(path))
            for entry in entries:
                vm_path = os.path.join(path, entry)
                if entry.startswith(".") or not os.path.isdir(vm_path):
                    continue
                vm = await _open_vm(vm_path, entry, store.io)
                if vm is not None:
                    store.vms[entry] = vm
        except BaseException:
            store.abandon()
            raise
        return store

    @property
    def damaged(self) -> dict[str, Damage]:
        """The quarantined VMs and what is wrong with each."""
        return {n: vm.damage for n, vm in sorted(self.vms.items()) if vm.damage is not None}

    async def repair_vm(self, name: str) -> str:
        """Move a quarantined VM's directory aside and start it afresh as an empty secondary.

        Returns where the damaged files went. The caller (the replication
        side) must make sure no primary writes into the VM meanwhile, and
        mark the new VM as owing a full sync, so that its primary rebuilds
        it with a full, digest-compared resync (disks are re-created by the
        primary's attach). The epoch never goes backwards: the new VM keeps
        the old one's if it was known.
        """
        vm = self.vm(name)
        if vm.damage is None:
            raise RoleError(f"VM {name} is not damaged; nothing to repair")
        if vm.state.role not in (SECONDARY, UNKNOWN_ROLE):
            raise RoleError(
                f"VM {name} is a {vm.state.role} here: only a secondary's copy is rebuilt from its primary; "
                f"restore this one from a backup or make the other node primary"
            )
        epoch = vm.state.epoch
        if not vm.closed:
            vm.abandon()
        del self.vms[name]
        aside = await trio.to_thread.run_sync(move_aside, self.path, name)
        log.warning("VM %s: damaged files moved aside to %s", name, aside)
        new = await self.create_vm(name, SECONDARY)
        if epoch > new.state.epoch:
            await new.adopt_epoch(epoch)
        return aside

    def _check_scope(self, name: str) -> None:
        """A VM-scoped store touches no other VM: another process owns its files."""
        if self.only is not None and name != self.only:
            raise BadArgument(f"VM {name}: this process serves only VM {self.only} of store {self.path}; "
                              f"VM {name} is served by its own process")

    def vm(self, name: str) -> VM:
        try:
            return self.vms[name]
        except KeyError:
            raise NotFound(f"no VM {name!r} in store {self.path}") from None

    def disk(self, vm: str, disk: str) -> Disk:
        return self.vm(vm).disk(disk)

    async def create_vm(self, name: str, role: str | None = None) -> VM:
        check_name("VM", name)
        self._check_scope(name)
        if name in self.vms:
            raise AlreadyExists(f"VM {name} already exists")
        vm = await VM.create(os.path.join(self.path, name), name, role or self.default_role, self.io)
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
        self._check_scope(vm)
        vm_obj = self.vms.get(vm) or await self.create_vm(vm, role)
        return await vm_obj.add_disk(disk, size, block_size, source)

    async def close(self) -> None:
        """Close every VM (synced, marked clean), then join the I/O context's threads."""
        for vm in self.vms.values():
            await vm.close()
        await trio.to_thread.run_sync(fsync_dir, self.path)
        await trio.to_thread.run_sync(self.io.close)

    def abandon(self) -> None:
        """Drop everything as a crash would (nothing synced or marked clean); the threads still end."""
        for vm in self.vms.values():
            if not vm.closed:
                vm.abandon()
        self.io.close()


async def _open_vm(vm_path: str, name: str, io: IOContext) -> VM | None:
    """Open one VM, or quarantine it: damage in one VM never keeps the others from opening."""
    recorded = load_marker(vm_path)
    if recorded is not None:
        log.error("VM %s: quarantined since an earlier run: %s", name, recorded.describe())
        return _quarantined(vm_path, name, recorded, io)
    state_path = os.path.join(vm_path, STATE_FILE)
    if not os.path.exists(state_path) and not [e for e in os.listdir(vm_path) if not e.startswith(STATE_FILE)]:
        # A creation a crash interrupted before its state file was in place: nothing to serve or lose.
        log.warning("store %s: ignoring %s, an empty VM directory (an interrupted creation)",
                    os.path.dirname(vm_path), name)
        return None
    try:
        return await VM.open(vm_path, io)
    except (StoreError, DiskIOError, OSError) as e:
        damage = damage_of(e, vm_path)
        if isinstance(e, StateMissing):
            damage = Damage(state_path, None, "the VM's state file is missing", damage.found)
        log.error("VM %s: cannot be opened, quarantined: %s", name, damage.describe())
        if not isinstance(e, StoreVersionError):  # a newer colofs's files are left exactly as they are
            try:
                await trio.to_thread.run_sync(save_marker, vm_path, damage)
            except OSError as err:
                log.error("VM %s: cannot record the damage: %s", name, err)
        return _quarantined(vm_path, name, damage, io)


def _quarantined(vm_path: str, name: str, damage: Damage, io: IOContext) -> VM:
    """A stand-in for a VM that cannot be opened: no disks, its damage in status, refusing everything."""
    try:
        state = load_vm_state(os.path.join(vm_path, STATE_FILE), f"VM {name}")
    except (StoreError, OSError):
        state = VMState(vm=name, role=UNKNOWN_ROLE, epoch=0)
    vm = VM(vm_path, state, io)
    vm.damage = damage
    vm.closed = True
    return vm
