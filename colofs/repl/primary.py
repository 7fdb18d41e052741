"""The primary's replicator: one :class:`~colofs.repl.sender.VMLink` per primary VM of a store.

The daemon starts it before it serves writes, so that no write goes
untracked::

    replicator = PrimaryReplicator(store, ("secondary-host", 7789), key)
    await nursery.start(replicator.run)
    ...
    result = await replicator.link("vm1").replicate_checkpoint()  # CheckpointResult(seq, latency_s)
    replicator.status("vm1")                                       # dict for status output
    await replicator.set_mode("vm1", "sync")

VMs created later are picked up by a periodic scan, or at once with
:meth:`PrimaryReplicator.attach_vm` (a write made before either is not
tracked and costs a full, digest-compared sync). Disks created later are
found on their first write, when the link next wakes, or at once with
:meth:`PrimaryReplicator.attach_vm` of their VM.
"""

from __future__ import annotations

import logging

import trio

from colofs.core.errors import NotFound
from colofs.core.state import PRIMARY
from colofs.core.store import Store
from colofs.repl.config import ReplConfig, check_mode, load_mode, require_key_or_loopback, save_mode
from colofs.repl.retained import RetainedBudget
from colofs.repl.sender import VMLink
from colofs.repl.util import Signal
from colofs.wire.auth import NonceRegistry

log = logging.getLogger(__name__)


class PrimaryReplicator:
    """Replicates every primary VM of ``store`` to the secondary at ``peer``."""

    def __init__(
        self,
        store: Store,
        peer: tuple[str, int],
        key: bytes | None,
        *,
        node_id: str | None = None,
        config: ReplConfig | None = None,
        nonces: NonceRegistry | None = None,
    ) -> None:
        self.store = store
        self.peer = peer
        self.key = key
        self.node_id = node_id or store.node_id
        self.cfg = config or ReplConfig()
        self.nonces = nonces if nonces is not None else NonceRegistry()  # this node's, shared by its links
        self.links: dict[str, VMLink] = {}
        self._link_added = Signal()
        self.budget = RetainedBudget(self.cfg.max_retained_total_bytes)
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Replicate until cancelled; reports readiness once every existing VM's writes are tracked."""
        await require_key_or_loopback(self.peer[0], self.key, "--peer")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._scan()
                task_status.started(self)
                while True:
                    await trio.sleep(self.cfg.scan_interval)
                    self._scan()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                for link in list(self.links.values()):
                    await link.stop()

    def _scan(self) -> None:
        for name, vm in list(self.store.vms.items()):
            if name not in self.links and vm.state.role == PRIMARY and not vm.closed:
                self.attach_vm(name)

    def attach_vm(self, name: str) -> None:
        """Start replicating VM ``name`` now (no await: call it right after creating the VM or a disk).

        For a VM already replicated, its new disks are announced at once.
        """
        link = self.links.get(name)
        if link is not None:
            link.tracking.notice_disks()
            return
        if self._nursery is None:
            return
        vm = self.store.vm(name)
        if vm.state.role != PRIMARY:
            return
        link = VMLink(vm, self.peer, self.key, node_id=self.node_id, config=self.cfg, nonces=self.nonces,
                      budget=self.budget)
        vm.forward = link.tracking
        self.links[name] = link
        self._nursery.start_soon(link.run, name=f"colofs-repl-{name}")
        self._link_added.fire()

    async def wait_link_added(self) -> None:
        """Until the next VM's link is added to :attr:`links` (watchers of the links wake on it)."""
        await self._link_added.wait()

    def link(self, name: str) -> VMLink:
        """VM ``name``'s link (its checkpoints, status, mode); raises :class:`NotFound` if it has none."""
        link = self.links.get(name)
        if link is None:
            if name in self.store.vms:
                raise NotFound(f"VM {name} is not replicated from this node (not a primary, or not started)")
            raise NotFound(f"no VM {name!r} in store {self.store.path}")
        return link

    def status(self, vm_name: str) -> dict[str, object]:
        return self.link(vm_name).status()

    def mode(self, vm_name: str) -> str:
        link = self.links.get(vm_name)
        return link.tracking.mode if link is not None else load_mode(self.store.vm(vm_name))

    async def set_mode(self, vm_name: str, mode: str) -> None:
        """Switch between ``async`` and ``sync``; persisted, effective for the next write."""
        check_mode(mode)
        vm = self.store.vm(vm_name)
        await save_mode(vm, mode)
        link = self.links.get(vm_name)
        if link is not None:
            link.tracking.mode = mode
        log.info("VM %s: replication mode %s", vm_name, mode)
