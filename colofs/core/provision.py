"""Creating a disk, and its VM when the request names a new one, so that a failure leaves nothing.

A create or import may make the VM directory as well as the disk. When the
disk cannot be made (a size the store cannot hold, an image that changed
while it was copied, an I/O error), the VM this request made is removed
again: the store looks exactly as it did before the request.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Collection

import trio

from colofs.core.disk import Disk
from colofs.core.disksize import check_disk_size
from colofs.core.fileio import fsync_dir
from colofs.core.imagesource import ImageSource
from colofs.core.names import check_name
from colofs.core.store import Store
from colofs.core.vm import VM

log = logging.getLogger(__name__)


async def create_disk(
    store: Store,
    vm: str,
    disk: str,
    size: int,
    *,
    block_size: int = 4096,
    source: ImageSource | None = None,
    role: str | None = None,
) -> Disk:
    """:meth:`Store.create_disk` that undoes the VM it created when the disk fails."""
    check_name("VM", vm)
    check_name("disk", disk)
    vm_obj = store.vms.get(vm)
    if vm_obj is not None:
        return await vm_obj.add_disk(disk, size, block_size, source)
    # Refused before the VM directory exists, when the size alone rules the disk out.
    await trio.to_thread.run_sync(check_disk_size, store.path, f"disk {vm}/{disk}", size)
    vm_obj = await store.create_vm(vm, role)
    try:
        return await vm_obj.add_disk(disk, size, block_size, source)
    except BaseException:
        with trio.CancelScope(shield=True):
            await discard_new_vm(store, vm_obj, [disk])
        raise


async def discard_new_vm(store: Store, vm: VM, own_disks: Collection[str] = ()) -> None:
    """Remove a VM that the failing request itself created, with the disks ``own_disks`` it made.

    Kept if another disk was added to it meanwhile (by another request, or a primary's ATTACH).
    """
    if set(vm.state.disks) - set(own_disks):
        log.info("VM %s: kept although the request that made it failed: it has disks %s",
                 vm.name, ", ".join(sorted(vm.state.disks)))
        return
    if store.vms.get(vm.name) is vm:
        del store.vms[vm.name]
    vm.abandon()
    await trio.to_thread.run_sync(_remove_vm_dir, vm.path)
    log.info("VM %s: removed again, its creation failed", vm.name)


def _remove_vm_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    fsync_dir(os.path.dirname(path))
