"""The commands on a VM directory: checkpoint, failover and the replication mode.

A checkpoint through the mount, whoever asks for it (``mountctl checkpoint``
on an unreplicated host, or the primary's marker arriving on a secondary),
is docs/design.md invariant 3 as the kernel sees it: the VM's dirty pages are
written back first, so every write issued before the checkpoint lands
before it; then the core checkpoint empties hidden and active; then the
kernel's cache of the VM's files is dropped, so nothing from before is read
again. On a replicating primary a checkpoint is instead a marker after the
VM's last write, confirmed once the secondary took it (its own checkpoint
runs the path above). A failover on a secondary closes the primary's
session first and takes no primary while it commits.
"""

from __future__ import annotations

import errno
import logging
import time
from typing import Any, cast

from colofs.core.errors import NotFound
from colofs.core.state import PRIMARY, SECONDARY
from colofs.core.store import Store
from colofs.core.vm import VM
from colofs.fs.inodes import DISK_SUFFIX, InodeTable, Node
from colofs.fs.pagecache import PageCache
from colofs.fs.replication import Replication
from colofs.fs.values import Refused, int_field, parse_json, seconds_field
from colofs.repl import CheckpointError, CheckpointTimeout, ReplConfigError

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
FAILOVER = "failover"
MAX_TIMEOUT = 3600.0


class VMControl:
    """Checkpoint, failover and mode of the VMs of one mount; remembers each VM's last one."""

    def __init__(self, store: Store, inodes: InodeTable, cache: PageCache, repl: Replication) -> None:
        self.store = store
        self.inodes = inodes
        self.cache = cache
        self.repl = repl
        self.last_ops: dict[str, dict[str, Any]] = {}  # VM -> its last checkpoint/failover

    # -- checkpoint ----------------------------------------------------------------------

    async def request_checkpoint(self, node: Node, value: bytes) -> dict[str, Any]:
        """The ``checkpoint`` command on a VM directory: the link's on a replicating primary, else this host's."""
        seq, timeout = checkpoint_request(value)
        vm = self.store.vm(node.vm)
        if self.repl.replicates(vm):
            if seq is not None:
                raise Refused(errno.EINVAL, f"checkpoint: VM {vm.name} is replicated: its checkpoint follows "
                                            "its last write; a sequence number is for unreplicated hosts")
            return await self._replicated_checkpoint(vm, timeout)
        if vm.state.role == SECONDARY:
            peer = self.repl.session_peer(vm)
            if peer is not None:
                raise Refused(errno.EBUSY, f"checkpoint: VM {vm.name} is replicated from primary {peer}, "
                                           "which sends its checkpoints: run mountctl checkpoint there")
        return await self.checkpoint_through_mount(vm, seq, source="local")

    async def _replicated_checkpoint(self, vm: VM, timeout: float | None) -> dict[str, Any]:
        """A marker after the VM's last write, confirmed once the secondary holds it durably."""
        nodes = self.inodes.disk_nodes(vm.name)
        t0 = time.monotonic()
        # Writes the kernel still holds are part of this checkpoint: they go before the marker.
        await self.cache.write_back(nodes)
        t1 = time.monotonic()
        try:
            assert self.repl.primary is not None  # it replicates the VM
            res = await self.repl.primary.link(vm.name).replicate_checkpoint(timeout)
        except (CheckpointError, NotFound) as e:
            raise Refused(errno.ETIMEDOUT if isinstance(e, CheckpointTimeout) else errno.EIO, str(e)) from None
        t2 = time.monotonic()
        self.last_ops[vm.name] = {"op": CHECKPOINT, "at": time.time(), "seconds": round(t2 - t0, 6),
                                  "seq": res.seq, "by": "replication"}
        log.info("VM %s: checkpoint at seq %d confirmed by the secondary in %.3f s", vm.name, res.seq, t2 - t0)
        self.repl.events.emit(CHECKPOINT, vm=vm.name, seq=res.seq, seconds=round(t2 - t0, 6), by="replication")
        return {
            "vm": vm.name, "seq": res.seq, "role": vm.state.role, "epoch": vm.state.epoch,
            "replicated": True, "latency_seconds": round(res.latency_s, 6),
            "writeback_seconds": round(t1 - t0, 6), "checkpoint_seconds": round(t2 - t1, 6),
            "invalidate_seconds": 0.0, "peer": self.repl.vm_status(vm).get("peer"),
        }

    async def checkpoint_through_mount(self, vm: VM, seq: int | None, *, source: str = "primary") -> dict[str, Any]:
        """Invariant 3 on this host: write back, checkpoint the core, drop the kernel's cache.

        ``source`` says who asked (``local``: the control plane; ``primary``:
        the stream, through the secondary's ``SecondaryHooks.take_checkpoint``,
        which the daemon sets to this method).
        """
        nodes = self.inodes.disk_nodes(vm.name)
        t0 = time.monotonic()
        # Dirty pages written before the checkpoint land before it.
        await self.cache.write_back(nodes)
        t1 = time.monotonic()
        before = buffered(vm)
        if vm.state.role == PRIMARY:  # nothing buffered here: the checkpoint is the record of the peer's
            done = await vm.record_confirmed_checkpoint(seq)
        else:
            done = await vm.checkpoint(seq)
        t2 = time.monotonic()
        # No reader may see pages cached from before the checkpoint.
        await self.cache.drop(nodes)
        t3 = time.monotonic()
        self.last_ops[vm.name] = {"op": CHECKPOINT, "at": time.time(), "seconds": round(t3 - t0, 6), "seq": done,
                                  "by": source}
        self.repl.events.emit(CHECKPOINT, vm=vm.name, seq=done, seconds=round(t3 - t0, 6), by=source)
        log.log(
            logging.DEBUG if source == "primary" else logging.INFO,
            "VM %s: checkpoint at seq %d (%s): discarded %d hidden and %d active bytes in %.3f s",
            vm.name, done, source, before[0], before[1], t3 - t0,
        )
        return {
            "vm": vm.name, "seq": done, "role": vm.state.role, "epoch": vm.state.epoch, "replicated": False,
            "discarded_hidden_bytes": before[0], "discarded_active_bytes": before[1],
            "writeback_seconds": round(t1 - t0, 6), "checkpoint_seconds": round(t2 - t1, 6),
            "invalidate_seconds": round(t3 - t2, 6),
        }

    async def disk_added(self, vm_name: str, disk: str) -> None:
        """The primary announced a disk: make the kernel look at the VM directory again."""
        node = self.inodes.vm_node(vm_name)
        if node is not None:
            await self.cache.refresh_dir(node, disk + DISK_SUFFIX)

    # -- failover and mode ------------------------------------------------------------------

    async def failover(self, node: Node, value: bytes) -> dict[str, Any]:
        vm = self.store.vm(node.vm)
        before = buffered(vm)
        epoch = vm.state.epoch
        peer = self.repl.session_peer(vm)
        t0 = time.monotonic()
        # The old primary's session ends before the commit, and no primary is taken meanwhile.
        async with self.repl.exclusive(vm, f"VM {vm.name} fails over to node {self.store.node_id}"):
            t1 = time.monotonic()
            # V does not change in a failover, so the kernel's cache stays valid.
            moved = await vm.failover()
        seconds = time.monotonic() - t0
        phases = {"session_seconds": round(t1 - t0, 6),
                  **{k: round(v, 6) for k, v in (vm.failover_phases or {}).items()}}
        if self.repl.server is not None:
            log.warning("VM %s: failed over (epoch %d -> %d); primary writes are refused from now on%s",
                        vm.name, epoch, vm.state.epoch, f" (closed the session of {peer})" if peer else "")
        self.last_ops[vm.name] = {"op": FAILOVER, "at": time.time(), "seconds": round(seconds, 6)}
        self.repl.events.emit(FAILOVER, vm=vm.name, epoch=vm.state.epoch, blocks_committed=moved,
                              seconds=round(seconds, 6), closed_session_of=peer)
        return {
            "vm": vm.name, "blocks_committed": moved, "hidden_bytes_before": before[0],
            "active_bytes_before": before[1], "epoch_before": epoch, "epoch": vm.state.epoch,
            "role": vm.state.role, "phase": vm.state.phase, "closed_session_of": peer,
            "seconds": round(seconds, 6), **phases,
        }

    def mode(self, node: Node) -> bytes:
        return f"{self.repl.mode(self.store.vm(node.vm))}\n".encode()

    async def set_mode(self, node: Node, value: bytes) -> dict[str, Any]:
        mode = value.decode(errors="replace").strip()
        vm = self.store.vm(node.vm)
        try:
            await self.repl.set_mode(vm, mode)
        except ReplConfigError as e:
            raise Refused(errno.EINVAL, f"mode: {e}") from None
        live = self.repl.replicates(vm)
        log.info("VM %s: replication mode %s%s", vm.name, mode, "" if live else " (kept for when it replicates)")
        return {"vm": vm.name, "mode": mode, "replicated": live}


def checkpoint_request(value: bytes) -> tuple[int | None, float | None]:
    """``(seq, timeout)`` from a checkpoint value: empty, a sequence number, or JSON with either."""
    text = value.decode(errors="replace").strip()
    if not text:
        return None, None
    if text.isdigit():
        return int(text), None
    if text.startswith("{"):
        req = parse_json(value, CHECKPOINT)
        seq = int_field(req, "seq", CHECKPOINT, -1)
        return (None if seq < 0 else seq), seconds_field(req, "timeout", CHECKPOINT, MAX_TIMEOUT)
    raise Refused(errno.EINVAL, f"checkpoint: the value must be empty, a sequence number or JSON, not {text!r}")


def buffered(vm: VM) -> tuple[int, int]:
    """Bytes in the hidden and active layers of all disks of a VM."""
    hidden = active = 0
    for disk in vm.disks.values():
        st = disk.status()
        hidden += cast(int, st["hidden_bytes"])
        active += cast(int, st["active_bytes"])
    return hidden, active
