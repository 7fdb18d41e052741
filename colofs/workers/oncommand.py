"""A VM named by the root's ``create`` or ``import``: created only if that command succeeds.

In one process, ``create``/``import`` of a disk in a VM the store does not
hold makes the VM with the disk, and a refused command (a bad size, a FIFO,
a source that changed during the copy, a full store) leaves the store as it
was: no VM directory, nothing in the root's list. With ``--workers`` the
supervisor starts the new VM's worker and hands it the command; a worker
started this way (:data:`ON_COMMAND` in its ``WorkerArgs.extra``) opens the
store without the VM, runs the command through a store-rooted control (which
creates the VM together with its first disk, or nothing), and only then goes
on to serve the VM as usual. If no command succeeds (each failed, or none
came), it ends with :data:`~colofs.workers.attach.EXIT_UNCLAIMED` and the
supervisor forgets the VM.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from colofs.core.store import Store
from colofs.repl.receiver import SecondaryServer
from colofs.workers.attach import Unclaimed

log = logging.getLogger(__name__)

ON_COMMAND = "on_command"
"""The key of ``WorkerArgs.extra`` that starts a worker this way."""
LINGER = 2.0
"""How long a worker whose commands all failed waits for another before it ends (a caller's retry)."""


class PendingCommand:
    """Runs the commands for a not-yet-existing VM one at a time until one has created it."""

    def __init__(self, store: Store, vm: str) -> None:
        self.store = store
        self.vm = vm
        self.in_flight = 0
        self.tried = 0
        self._turn = trio.Lock()
        self._changed = trio.Event()
        self._deadline: float | None = None  # when an idle pending worker gives up

    def _touch(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    @property
    def created(self) -> bool:
        return self.vm in self.store.vms

    async def run(self, command: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any] | None:
        """``command()``'s result while the VM does not exist; None once it does (run it as for any VM)."""
        self.in_flight += 1
        self._touch()
        try:
            async with self._turn:
                if self.created:
                    return None
                self.tried += 1
                return await command()
        finally:
            self.in_flight -= 1
            if not self.created:
                self._deadline = trio.current_time() + LINGER
            self._touch()

    def on_event(self, event: dict[str, Any]) -> None:
        """The VM's bus watcher: an authenticated primary's ATTACH may create the VM as well."""
        if event.get("vm") == self.vm:
            self._touch()

    def serve(self, nursery: trio.Nursery, server: SecondaryServer, stream: trio.SocketStream, peer: str) -> None:
        """A secondary's connection for the VM meanwhile: served as usual (its ATTACH may create the VM)."""
        nursery.start_soon(self._serve, server, stream, peer, name=f"colofs-secondary-{self.vm}-{peer}")

    async def _serve(self, server: SecondaryServer, stream: trio.SocketStream, peer: str) -> None:
        self.in_flight += 1
        try:
            await server.serve_handoff(stream, peer, self.vm)
        finally:
            self.in_flight -= 1
            self._touch()

    async def wait(self, first_within: float) -> None:
        """Return once the VM exists; :class:`Unclaimed` once nothing runs for it and none created it."""
        if self._deadline is None:
            self._deadline = trio.current_time() + first_within
        while not self.created:
            changed = self._changed
            if self.in_flight == 0:
                if trio.current_time() >= self._deadline:
                    raise Unclaimed(f"VM {self.vm}: no create or import made it "
                                    f"({self.tried} tried); the store is left without it")
                with trio.move_on_at(self._deadline):
                    await changed.wait()
            else:
                await changed.wait()
        log.info("VM %s created by its first disk", self.vm)
