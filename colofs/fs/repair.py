"""``user.colofs.repair`` on a VM directory: rebuild a quarantined secondary copy from its primary.

A VM whose store is damaged is quarantined (``colofs.core.damage``): status
shows ``phase: damaged`` with the file, offset and reason, and nothing of it
is served. On a secondary the copy can be rebuilt: the primary's session is
closed and no primary is taken meanwhile; the VM's directory is moved aside
whole (``STORE/.damaged-VM-TIME``, every file kept as it was); an empty
secondary VM takes its place, owing a full sync. The primary's next attach
(it retries within seconds) re-creates the disks and sends every block whose
xxh3 digest differs -- the full, digest-compared resync -- and its next
checkpoint makes the copy whole again. A primary's copy is not repaired here:
it has no peer to rebuild from.
"""

from __future__ import annotations

import errno
import logging
import time
from typing import Any

from colofs.core.errors import RoleError
from colofs.core.store import Store
from colofs.fs.inodes import InodeTable, Node
from colofs.fs.pagecache import PageCache
from colofs.fs.replication import Replication
from colofs.fs.values import Refused
from colofs.repl.persist import save_needs_full_sync

log = logging.getLogger(__name__)

REPAIR = "repair"


async def repair_vm(store: Store, repl: Replication, inodes: InodeTable, cache: PageCache,
                    node: Node) -> dict[str, Any]:
    vm = store.vm(node.vm)
    if vm.damage is None:
        raise Refused(errno.EINVAL, f"repair: VM {vm.name} is not damaged (phase {vm.state.phase}); nothing to repair")
    if repl.server is None:
        raise Refused(
            errno.EPERM,
            f"repair: VM {vm.name} is rebuilt from its primary: run the repair on the secondary's mount "
            "(the one started with --listen)",
        )
    damage = vm.damage
    old_nodes = inodes.disk_nodes(vm.name)
    t0 = time.monotonic()
    async with repl.exclusive(vm, f"VM {vm.name} is being repaired"):
        try:
            aside = await store.repair_vm(vm.name)
        except RoleError as e:
            raise Refused(errno.EPERM, f"repair: {e}") from None
        await save_needs_full_sync(store.vm(vm.name), True)
    # The new disks take the old files' inode numbers: nothing the kernel cached may show through.
    try:
        await cache.drop(old_nodes)
    except OSError as e:
        log.warning("VM %s: dropping the kernel's cache of the damaged disks failed (%s); "
                    "the next checkpoint drops it", vm.name, e)
    log.warning(
        "VM %s: repair started: damaged copy (%s) moved aside to %s; the primary's next attach rebuilds it "
        "with a full digest-compared sync", vm.name, damage.describe(), aside,
    )
    return {
        "vm": vm.name,
        "damage": damage.as_dict(),
        "moved_aside": aside,
        "full_sync_owed": True,
        "seconds": round(time.monotonic() - t0, 6),
        "next": "the primary's next attach rebuilds the copy with a full digest-compared sync",
    }
