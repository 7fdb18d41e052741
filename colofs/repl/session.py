"""ATTACH: the secondary decides whether to take a primary; the primary decides how to resume.

Secondary (:func:`accept_attach`), in this order, before anything is applied:

1. a VM that failed over here (role primary, or failing over) refuses every
   primary: the old primary must never write into it again;
2. a primary whose epoch is older than the VM's is refused (split brain);
3. a VM missing here is created as a secondary with empty disks: at seq 0
   with nothing on it, it is brought forward by everything the primary's
   dirty map ever marked (see the primary's ATTACH handling), so it owes no
   full sync; an existing VM with an older epoch adopts the primary's and
   owes a full sync;
4. disks are matched by name; a missing one is created (same size and block
   size), one with another geometry refuses the attach.

Primary (:func:`plan_resume`): given what the secondary reports in ATTACHED,
stream on from its last applied seq when the retained writes reach back that
far, and otherwise (or when a full sync is asked for, or a resync is owed)
resynchronise dirty blocks first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from colofs.core.blocks import block_size_ok
from colofs.core.disksize import MAX_DISK_BYTES, DiskTooLarge, check_disk_size
from colofs.core.names import check_name
from colofs.core.provision import discard_new_vm
from colofs.core.state import FAILOVER, NORMAL, PRIMARY, SECONDARY
from colofs.core.store import Store
from colofs.core.vm import VM
from colofs.repl.errors import AttachRefused, ReplCode, ReplError, ReplProtocolError
from colofs.repl.persist import load_needs_full_sync, save_needs_full_sync
from colofs.wire.messages import Attach, Attached

log = logging.getLogger(__name__)


@dataclass
class AttachResult:
    vm: VM
    disk_names: list[str]
    """Disk index on this connection -> disk name."""
    needs_full_sync: bool
    created_vm: bool
    created_disks: list[str]


def _check_geometry(vm_name: str, name: str, size: int, block_size: int) -> None:
    check_name("disk", name)
    if size <= 0 or size % 512 or not block_size_ok(block_size):
        raise AttachRefused(
            f"VM {vm_name}: disk {name} has an unusable geometry ({size} bytes, {block_size}-byte blocks)",
            ReplCode.DISK_MISMATCH,
        )
    if size > MAX_DISK_BYTES:
        raise AttachRefused(
            f"VM {vm_name}: disk {name} of {size} bytes is larger than the largest disk colofs takes "
            f"({MAX_DISK_BYTES} bytes)", ReplCode.DISK_MISMATCH,
        )


async def accept_attach(store: Store, att: Attach, peer: str, *, max_disks: int) -> AttachResult:
    """Apply the rules above; raises :class:`AttachRefused` (nothing changed) to refuse."""
    if len(att.disks) > max_disks:
        raise AttachRefused(f"VM {att.vm}: {len(att.disks)} disks, at most {max_disks} accepted")
    check_name("VM", att.vm)
    for d in att.disks:
        _check_geometry(att.vm, d.name, d.size, d.block_size)
    vm = store.vms.get(att.vm)
    if vm is not None:
        st = vm.state
        if st.role == PRIMARY or st.phase == FAILOVER:
            raise AttachRefused(
                f"VM {att.vm} has failed over to this node (now {st.role}, epoch {st.epoch}); "
                f"refusing primary {peer} with its stale epoch {att.epoch}",
                ReplCode.FAILED_OVER,
            )
        if st.epoch > att.epoch:
            raise AttachRefused(
                f"VM {att.vm}: primary {peer} has epoch {att.epoch}, older than this node's {st.epoch}; "
                f"refused (a newer primary exists)",
                ReplCode.STALE_EPOCH,
            )
        for d in att.disks:
            have = vm.disks.get(d.name)
            if have is not None and (have.size, have.block_size) != (d.size, d.block_size):
                raise AttachRefused(
                    f"VM {att.vm}: disk {d.name} is {have.size} bytes with {have.block_size}-byte blocks "
                    f"here, {d.size} bytes with {d.block_size}-byte blocks on primary {peer}",
                    ReplCode.DISK_MISMATCH,
                )
    missing = [d for d in att.disks if vm is None or d.name not in vm.disks]
    for d in missing:
        try:
            await trio.to_thread.run_sync(check_disk_size, store.path, f"disk {att.vm}/{d.name}", d.size)
        except DiskTooLarge as e:
            raise AttachRefused(f"VM {att.vm}: {e}", ReplCode.DISK_MISMATCH) from None
    if vm is not None:
        return await _settle_attach(vm, att, peer)
    vm = await store.create_vm(att.vm, SECONDARY)
    try:
        res = await _settle_attach(vm, att, peer, created=True)
    except BaseException:
        # Nothing of a VM this refused attach created stays behind.
        with trio.CancelScope(shield=True):
            await discard_new_vm(store, vm, [d.name for d in att.disks])
        raise
    log.info("VM %s: created as a secondary for primary %s", att.vm, peer)
    return res


async def _settle_attach(vm: VM, att: Attach, peer: str, *, created: bool = False) -> AttachResult:
    """Rules 3 and 4 for a VM that exists (or was just created for this attach)."""
    needs_full = not created and load_needs_full_sync(vm)
    if vm.state.epoch < att.epoch:
        if not needs_full and not created:  # a VM made just now is empty, whatever its epoch
            await save_needs_full_sync(vm, True)
            needs_full = True
        old = vm.state.epoch
        await vm.adopt_epoch(att.epoch)
        log.log(logging.INFO if created else logging.WARNING, "VM %s: adopted epoch %d of primary %s (was %d)%s",
                att.vm, att.epoch, peer, old, "" if created else "; a full sync follows")
    made = []
    for d in att.disks:
        if d.name not in vm.disks:
            await vm.add_disk(d.name, d.size, d.block_size)
            made.append(d.name)
    return AttachResult(vm, [d.name for d in att.disks], needs_full, created, made)


@dataclass(frozen=True)
class ResumePlan:
    stream_from: int | None
    """Stream retained writes from this seq; None: resynchronise first."""
    full: bool
    """Mark every block dirty before the resync (a full sync)."""
    reason: str


def plan_resume(
    att: Attached,
    *,
    vm: str,
    epoch: int,
    last_applied: int,
    last_checkpoint: int,
    retained_from: int | None,
    resync_needed: bool,
) -> ResumePlan:
    """Decide how to bring the secondary from where ATTACHED says it is to this primary's now.

    ``retained_from`` is the oldest seq the primary still holds (None if it
    retains nothing). Raises :class:`ReplProtocolError` for an answer that
    does not fit the request, :class:`ReplError` when no resume is possible.
    """
    if att.vm != vm:
        raise ReplProtocolError(f"ATTACHED names VM {att.vm!r}, we attached {vm!r}")
    if att.epoch != epoch:
        raise ReplProtocolError(f"VM {vm}: ATTACHED reports epoch {att.epoch}, ours is {epoch}")
    if att.last_checkpoint > last_applied:
        raise ReplError(
            f"VM {vm}: the secondary's last checkpoint (seq {att.last_checkpoint}) is beyond this "
            f"primary's last write (seq {last_applied}); this primary lost writes it had sent "
            f"(crash?) and cannot resume this secondary"
        )
    if att.needs_full_sync:
        return ResumePlan(None, True, "the secondary asks for a full sync")
    if att.last_applied > last_applied:
        return ResumePlan(None, True, f"the secondary (seq {att.last_applied}) is ahead of this primary")
    if att.last_checkpoint < last_checkpoint:
        return ResumePlan(None, True,
                          f"the secondary's checkpoint {att.last_checkpoint} is older than the confirmed {last_checkpoint}")
    if resync_needed:
        return ResumePlan(None, False, "a resync is still owed")
    nxt = att.last_applied + 1
    if retained_from is not None and retained_from <= nxt:
        return ResumePlan(nxt, False, f"retained writes resume at seq {nxt}")
    return ResumePlan(None, False, f"retained writes do not reach back to seq {nxt}")


def role_check(vm: VM) -> None:
    """A secondary session stops the moment its VM is no longer a plain secondary."""
    st = vm.state
    if st.role != SECONDARY or st.phase != NORMAL:
        raise AttachRefused(
            f"VM {vm.name} has failed over to this node (now {st.role}, {st.phase}, epoch {st.epoch}); "
            f"no more primary writes",
            ReplCode.FAILED_OVER,
        )
