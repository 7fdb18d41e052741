"""The mount's side of replication: the engine a daemon runs, and what status says about it.

A mount with ``--peer`` is a primary: it runs a
:class:`~colofs.repl.PrimaryReplicator` whose write sinks are attached before
the mount serves a single write, so no write goes untracked. A mount with
``--listen`` is a secondary: it runs a :class:`~colofs.repl.SecondaryServer`
whose checkpoints go through the mount (the hook :class:`Control` installs:
write back the SVM's dirty pages, checkpoint the core, drop the page cache).
A mount with neither serves its disks unreplicated.

A worker process (one VM, :mod:`colofs.workers`) runs a secondary *handed
off*: it binds no port; its supervisor accepts each connection, reads which
VM it is for, and passes the socket on (:meth:`Replication.accept`).

The engine knows nothing of FUSE; this module is where the daemon, the
control plane and status reach it.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from colofs.core.state import PRIMARY
from colofs.core.store import Store
from colofs.core.vm import VM
from colofs.events import EventBus
from colofs.fs.config import MountConfig
from colofs.repl import (
    PrimaryReplicator,
    ReplConfig,
    SecondaryHooks,
    SecondaryServer,
    load_mode,
    save_mode,
)
from colofs.repl.config import check_mode, require_key_or_loopback
from colofs.repl.linkstate import SHOWN, LinkState
from colofs.repl.verifier import Verifications, VerifyRun
from colofs.repl.verify import VerifyError, VerifyOptions
from colofs.wire import NonceRegistry

LINK_STATES = SHOWN
"""The engine's link states, as status shows them per VM."""
RUNNING = "running"
DRAIN_SECONDS = 3.0  # at shutdown, how long the queued writes get to reach the secondary


class Replication:
    """None, a primary's replicator, or a secondary's listener, for one mount."""

    def __init__(self, cfg: MountConfig, store: Store, key: bytes | None,
                 settings: ReplConfig | None = None, events: EventBus | None = None,
                 nonces: NonceRegistry | None = None, handoff: bool = False) -> None:
        """``handoff``: a secondary fed connections by :meth:`accept` instead of listening itself."""
        self.cfg = cfg
        self.handoff = handoff
        self._handoff_nursery: trio.Nursery | None = None
        self.events = events or EventBus()  # where checkpoints, failovers and peers are reported
        self.store = store
        self.key = key
        self.settings = settings or ReplConfig(tls=cfg.tls())
        nonces = nonces if nonces is not None else NonceRegistry()  # this node's outstanding challenges
        self.hooks = SecondaryHooks(event=self.events.emit)  # the control plane installs the mount's checkpoint
        self.primary: PrimaryReplicator | None = None
        self.server: SecondaryServer | None = None
        self.verifies: Verifications | None = None
        if cfg.peer is not None:
            self.primary = PrimaryReplicator(store, (cfg.peer.host, cfg.peer.port), key,
                                             node_id=store.node_id, config=self.settings, nonces=nonces)
            self.verifies = Verifications(store, self.primary)
        elif cfg.listen is not None:
            self.server = SecondaryServer(store, key, node_id=store.node_id, config=self.settings,
                                          nonces=nonces, hooks=self.hooks)

    # -- running ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Replicate until cancelled; started once writes are tracked (primary) or the port is bound.

        Raises before starting: :class:`~colofs.repl.ReplConfigError` for a
        keyless non-loopback address, ``OSError`` for a port that cannot be bound.
        """
        if self.primary is not None:
            assert self.verifies is not None
            async with trio.open_nursery() as nursery:
                await nursery.start(self.verifies.run)
                await self.primary.run(task_status=task_status)
                nursery.cancel_scope.cancel()
        elif self.server is not None and self.handoff:
            await self._serve_handoffs(task_status)
        elif self.server is not None:
            assert self.cfg.listen is not None
            await self.server.serve((self.cfg.listen.host, self.cfg.listen.port), task_status=task_status)
        else:
            task_status.started()

    async def _serve_handoffs(self, task_status: trio.TaskStatus[None]) -> None:
        """Serve the connections :meth:`accept` is handed, until cancelled.

        The same rule as a listener of its own: without a key, only a loopback ``--listen``.
        """
        assert self.server is not None and self.cfg.listen is not None
        await require_key_or_loopback(self.cfg.listen.host, self.key, "--listen")
        try:
            async with trio.open_nursery() as nursery:
                self._handoff_nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._handoff_nursery = None
            self.server.close_sessions("the secondary is shutting down")

    def accept(self, stream: trio.SocketStream, peer: str, vm: str) -> bool:
        """Serve a connection the supervisor accepted for ``vm``; False (the stream is not taken) if not running."""
        nursery = self._handoff_nursery
        if self.server is None or nursery is None:
            return False
        serve_handoff = getattr(self.server, "serve_handoff", None)
        if serve_handoff is not None:
            nursery.start_soon(serve_handoff, stream, peer, vm, name=f"colofs-secondary-{vm}-{peer}")
        else:  # an engine without the routed entry: the listener's own path (admission, handshake, ATTACH)
            nursery.start_soon(self.server._handle, stream, name=f"colofs-secondary-{vm}-{peer}")
        return True

    async def drain(self, timeout: float = DRAIN_SECONDS) -> None:
        """Let connected links get their queued writes acknowledged before the engine stops.

        Nothing depends on it (the dirty maps are saved either way); it only
        spares the secondary a resync after a clean unmount.
        """
        if self.primary is None:
            return
        links = list(self.primary.links.values())
        with trio.move_on_after(timeout):
            while behind := [link for link in links
                             if link.state == LinkState.STREAMING and link.acked < link.vm.state.last_applied]:
                await behind[0].wait_changed()  # an ACK or a state change; then look at all again

    def vm_created(self, name: str) -> None:
        """A VM or disk was created through the mount: replicate it from its first write."""
        if self.primary is not None and name in self.store.vms:
            self.primary.attach_vm(name)

    # -- commands ----------------------------------------------------------------------

    def replicates(self, vm: VM) -> bool:
        """Whether ``vm`` is a primary VM streaming to a secondary from here."""
        return self.primary is not None and vm.name in self.primary.links

    def session_peer(self, vm: VM) -> str | None:
        """The primary streaming ``vm`` into this secondary now, if one is."""
        if self.server is None:
            return None
        session = self.server.sessions.get(vm.name)
        return session.peer if session is not None else None

    @asynccontextmanager
    async def exclusive(self, vm: VM, why: str) -> AsyncIterator[None]:
        """On a secondary: no primary writes into ``vm`` while inside (its session is closed first)."""
        if self.server is None:
            yield
            return
        async with self.server.exclusive(vm.name, why):
            yield

    def mode(self, vm: VM) -> str:
        if self.primary is not None and vm.name in self.primary.links:
            return self.primary.mode(vm.name)
        return load_mode(vm)

    async def set_mode(self, vm: VM, mode: str) -> None:
        """Persist the VM's mode; a replicating primary applies it from the next write."""
        check_mode(mode)
        if self.primary is not None and vm.state.role == PRIMARY:
            await self.primary.set_mode(vm.name, mode)
        else:
            await save_mode(vm, mode)

    def start_verify(self, vm: VM, opts: VerifyOptions) -> VerifyRun:
        """An online verify of ``vm`` against the secondary; raises :class:`VerifyError`."""
        if self.verifies is None:
            raise VerifyError(f"verify: VM {vm.name} is not replicated from this mount: run the verify on its "
                              "primary (the mount started with --peer)", errno.EPERM)
        run = self.verifies.start(vm.name, opts)
        self.events.emit("verify-started", vm=vm.name, id=run.id)
        return run

    def cancel_verify(self, vm: VM) -> VerifyRun:
        if self.verifies is None:
            raise VerifyError(f"verify: no verify of VM {vm.name} runs on this mount", errno.EINVAL)
        return self.verifies.cancel(vm.name)

    def verify_status(self, vm: VM) -> dict[str, Any] | None:
        """The VM's running or last verify (kept until the next one), or None."""
        return self.verifies.status(vm.name) if self.verifies is not None else None

    # -- status --------------------------------------------------------------------------

    def root_status(self) -> dict[str, Any]:
        """The mount's replication: its configuration and, while running, its connections."""
        out: dict[str, Any] = dict(self.cfg.replication())
        if self.primary is not None:
            states = [LINK_STATES.get(link.state, link.state) for link in self.primary.links.values()]
            out.update(state=RUNNING, role="primary", authenticated=self.key is not None,
                       vms=len(states), **{s: states.count(s) for s in
                                          ("connected", "connecting", "resyncing", "refused")})
        elif self.server is not None:
            st = self.server.status()
            out.update(state=RUNNING, role="secondary", authenticated=self.key is not None,
                       port=st["listen_port"], connections=st["connections"],
                       sessions=st["open_sessions"], refused=st["refused"],
                       last_refusal=st["last_refusal"], pending=st["pending"],
                       refused_by_reason=st["refused_by_reason"])
        return out

    def vm_status(self, vm: VM) -> dict[str, Any]:
        """What ``status`` shows as a VM's ``peer``."""
        mode = self.mode(vm)
        if self.primary is not None:
            link = self.primary.links.get(vm.name)
            if link is None:
                return {"state": "not replicated", "mode": mode,
                        "reason": f"the VM is a {vm.state.role} here; only primary VMs are sent to the peer"}
            st = link.status()
            reason = st.get("last_error") if link.state != LinkState.STREAMING else None
            return {**st, "state": LINK_STATES.get(link.state, link.state), "link_state": link.state,
                    "reason": reason}
        if self.server is not None:
            st = self.server.status(vm.name)
            out: dict[str, Any] = {**st, "mode": mode, "acked_seq": vm.state.last_applied,
                                   "reason": st.get("last_error")}
            if vm.state.role == PRIMARY:
                out.update(state="failed over", reason="this node took the VM over; its old primary is refused")
            elif st.get("connected"):
                out["state"] = "resyncing" if st.get("resyncing") else "connected"
            else:
                out["state"] = "refused" if st.get("last_error") else "waiting"
            return out
        return {"state": self.cfg.replication()["state"], "mode": mode}
