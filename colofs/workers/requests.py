"""A worker's side of its channel to the supervisor: the requests it serves and what it reports.

A part of :class:`colofs.workers.worker.Worker`, kept here so that the
worker's module reads as its life (startup, mount, shutdown) in order: the
supervisor's ``ping``, ``stop``, ``connection``, ``create_disk``,
``import_disk``, ``budget``, ``metrics`` and the NBD hand-overs, and the
``event`` and ``summary`` notifications the worker sends back (the ops:
docs/processes.md). The state these share (the store, the replication, the
mount's operations, whether the worker is stopping) is the worker's.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import trio

from colofs.core.errors import ColofsError
from colofs.core.store import Store
from colofs.fs.config import MountConfig
from colofs.fs.control import CREATE, IMPORT, Control, MountInfo
from colofs.fs.errnos import errno_for
from colofs.fs.metrics import FigureSource, VMCounts
from colofs.fs.operations import Operations
from colofs.fs.replication import Replication
from colofs.fs.values import Refused
from colofs.nbd.handoff import answer_nbd_request, serve_handed_over
from colofs.nbd.service import NbdService
from colofs.workers.attach import PendingVM
from colofs.workers.channel import Channel, RemoteError, WorkerArgs
from colofs.workers.malloc import Trimmer
from colofs.workers.metrics import page
from colofs.workers.oncommand import PendingCommand

log = logging.getLogger(__name__)

BUDGET = "max_retained_total_bytes"


class Requests:
    """The channel's operations and reports of a worker; :class:`~colofs.workers.worker.Worker` provides the state."""

    args: WorkerArgs
    cfg: MountConfig
    vm: str
    channel: Channel
    store: Store | None
    ops: Operations | None
    repl: Replication | None
    nbd: NbdService | None
    counts: VMCounts | None
    pending: PendingVM | PendingCommand | None
    opened: trio.Event
    stopping: bool
    budget: int | None
    trimmer: Trimmer
    events_dropped: int
    _events_send: trio.MemorySendChannel[dict[str, Any]]
    _events_receive: trio.MemoryReceiveChannel[dict[str, Any]]
    _vm_nursery: trio.Nursery | None

    stop: Callable[..., None]
    """The worker's: it knows whether the mount is up."""

    async def handle(self, msg: dict[str, Any], fds: list[int]) -> dict[str, Any] | None:
        """One request or notification from the supervisor (its ops: docs/processes.md)."""
        op = msg.get("op")
        if op not in ("connection", "nbd_connection"):
            _close_fds(fds)
        if op == "nbd_connection":
            serve_handed_over(self.nbd, fds, msg)
            return None
        if op in ("nbd_list", "nbd_describe"):
            return answer_nbd_request(self.nbd, msg)
        if op == "ping":
            return {}
        if op == "stop":
            self.stop(lazy=bool(msg.get("lazy", False)), why="stop requested by the supervisor")
            return None
        if op == "connection":
            self._connection(fds, str(msg.get("peer", "?")))
            return None
        if op in ("create_disk", "import_disk"):
            return await self._disk_command(CREATE if op == "create_disk" else IMPORT, msg)
        if op == "budget":
            self._budget(msg.get(BUDGET))
            return None
        if op == "metrics":
            return self._metrics(msg.get("after"))
        raise RemoteError(f"worker for VM {self.vm}: unknown operation {op!r}", errno.EINVAL)

    def _connection(self, fds: list[int], peer: str) -> None:
        if len(fds) != 1:
            _close_fds(fds)
            log.error("connection from %s handed over with %d descriptors, not 1: dropped", peer, len(fds))
            return
        sock = socket.socket(fileno=fds[0])
        if self.repl is None or self.stopping:
            log.warning("connection from %s for VM %s closed: the worker is %s", peer, self.vm,
                        "stopping" if self.stopping else "not serving yet")
            sock.close()
            return
        sock.setblocking(False)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        server = self.repl.server
        if self.pending is not None and self.store is not None and self.vm not in self.store.vms \
                and server is not None and self._vm_nursery is not None:
            self.pending.serve(self._vm_nursery, server, stream, peer)
            return
        if not self.repl.accept(stream, peer, self.vm):
            log.warning("connection from %s for VM %s closed: this worker does not serve secondary "
                        "connections (no --listen)", peer, self.vm)
            sock.close()

    async def _disk_command(self, key: str, msg: dict[str, Any]) -> dict[str, Any]:
        if self.stopping:
            raise RemoteError(f"VM {self.vm}: the worker is stopping", errno.ESHUTDOWN)
        req = {k: v for k, v in msg.items() if k not in ("op", "id")}
        req.setdefault("vm", self.vm)
        if req["vm"] != self.vm:
            raise RemoteError(f"{key}: VM {req['vm']} is not served by the worker of VM {self.vm}", errno.EINVAL)
        if isinstance(self.pending, PendingCommand) and not self.opened.is_set():
            result = await self.pending.run(lambda: self._root_command(self._store_control(), key, req))
            if result is not None:
                return result
        await self.opened.wait()
        assert self.ops is not None
        return await self._root_command(self.ops.control, key, req)

    def _store_control(self) -> Control:
        """A store-rooted control for a VM not made yet: its create or import makes the VM with the disk, or nothing."""
        assert self.store is not None and self.repl is not None
        return Operations(self.store, MountInfo(self.cfg, os.getpid(), time.time()), self.repl).control

    @staticmethod
    async def _root_command(control: Control, key: str, req: dict[str, Any]) -> dict[str, Any]:
        try:
            return await control.root_command(key, req)
        except Refused as e:
            raise RemoteError(str(e), e.code) from None
        except ColofsError as e:
            raise RemoteError(f"{key}: {e}", errno_for(e)) from None

    def _budget(self, value: object) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            log.error("budget: %r is not a positive number of bytes; ignored", value)
            return
        primary = self.repl.primary if self.repl is not None else None
        self.budget = value  # also for a replication not built yet
        if primary is not None:
            primary.budget.limit = value
            primary.budget.relieve()
        log.info("VM %s: retained writes bounded to %d bytes", self.vm, value)

    def _metrics(self, after: object) -> dict[str, Any]:
        """A page of the VM's figures now; not waiting for the VM to open (a scrape must not wait)."""
        if self.ops is None or self.counts is None or self.stopping:
            raise RemoteError(f"VM {self.vm}: {'stopping' if self.stopping else 'not open yet'}", errno.EAGAIN)
        return {**page(FigureSource(self.ops, self.counts).snapshot(), after), "pid": os.getpid()}

    # -- reporting ------------------------------------------------------------------------------

    def _queue_event(self, event: dict[str, Any]) -> None:
        """The bus's watcher: never blocks; a full queue drops the event (counted, logged)."""
        try:
            self._events_send.send_nowait(event)
        except trio.WouldBlock:
            self.events_dropped += 1
            if self.events_dropped == 1 or self.events_dropped % 1000 == 0:
                log.warning("events: %d not forwarded to the supervisor (it reads too slowly)", self.events_dropped)

    async def _forward_events(self) -> None:
        async for event in self._events_receive:
            kind = event.get("event")
            fields = {k: v for k, v in event.items() if k != "event"}
            try:
                await self.channel.notify("event", kind=kind, fields=fields)
                await self._send_summary()
            except Exception as e:  # the supervisor is gone, or an event too large: keep serving
                log.warning("events: cannot forward %s: %s", kind, e)
            if kind in ("checkpoint", "resync-done"):  # retained writes were dropped
                self.trimmer.request()

    def summary(self) -> dict[str, Any]:
        """What the supervisor's root status counts for this VM."""
        assert self.store is not None and self.repl is not None
        vm = self.store.vm(self.vm)
        st = vm.status()
        return {"role": vm.state.role, "phase": st["phase"], "epoch": st["epoch"], "last_seq": st["last_applied"],
                "link": str(self.repl.vm_status(vm).get("state"))}

    async def _send_summary(self) -> None:
        if self.store is None or self.repl is None or self.vm not in self.store.vms:
            return  # not created yet (waiting for an authenticated ATTACH)
        await self.channel.notify("summary", **self.summary())


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass

