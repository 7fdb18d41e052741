"""A secondary's VM named by a stranger's route preamble: created only by an authenticated ATTACH.

The supervisor's router starts a worker for a VM this host does not hold as
soon as a connection's preamble names it, before anyone proved the key. That
worker must not create the VM (a directory in the store, a VM in the root's
list) for a stranger: it opens the store without it and serves the handed
connections through the secondary's usual path (TLS, the key's challenge,
ATTACH), where :func:`colofs.repl.session.accept_attach` creates the VM for an
authenticated primary. Once one has attached, the worker goes on to mount the
VM as usual; if every connection ends first (or none arrives), it exits with
:data:`EXIT_UNCLAIMED` and the supervisor forgets the VM.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from colofs.core.store import Store
from colofs.repl.receiver import SecondaryServer

log = logging.getLogger(__name__)

EXIT_UNCLAIMED = 3
"""A worker's exit status when no authenticated primary attached its not-yet-existing VM."""
ON_ATTACH = "on_attach"
"""The key of ``WorkerArgs.extra`` that starts a worker this way."""


class Unclaimed(Exception):
    """No authenticated primary attached the VM: the worker ends without creating it."""


class PendingVM:
    """Serves a not-yet-existing VM's connections until one attaches it, or all have ended."""

    def __init__(self, store: Store, vm: str) -> None:
        self.store = store
        self.vm = vm
        self.in_flight = 0
        self.arrived = trio.Event()
        self.attached = trio.Event()
        self.unclaimed = trio.Event()

    def on_event(self, event: dict[str, Any]) -> None:
        """The VM's bus watcher: a session attached (so ``accept_attach`` created the VM)."""
        if event.get("event") == "peer-connected" and event.get("vm") == self.vm and self.vm in self.store.vms:
            self.attached.set()

    def serve(self, nursery: trio.Nursery, server: SecondaryServer, stream: trio.SocketStream, peer: str) -> None:
        """Serve a handed connection (its session goes on after the attach, in ``nursery``)."""
        self.in_flight += 1
        self.arrived.set()
        nursery.start_soon(self._serve, server, stream, peer, name=f"colofs-secondary-{self.vm}-{peer}")

    async def _serve(self, server: SecondaryServer, stream: trio.SocketStream, peer: str) -> None:
        try:
            await server.serve_handoff(stream, peer, self.vm)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0 and self.vm not in self.store.vms:
                self.unclaimed.set()

    async def wait(self, first_within: float) -> None:
        """Return once the VM exists; :class:`Unclaimed` if every connection ended before, or none came."""
        with trio.move_on_after(first_within):
            await self.arrived.wait()
        if not self.arrived.is_set():
            raise Unclaimed(f"no connection for VM {self.vm} came within {first_within:.0f} s")
        async with trio.open_nursery() as nursery:
            async def _ended() -> None:
                await self.unclaimed.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(_ended)
            await self.attached.wait()
            nursery.cancel_scope.cancel()
        if self.vm not in self.store.vms:
            raise Unclaimed(f"every connection naming VM {self.vm} ended before an authenticated primary attached it")
