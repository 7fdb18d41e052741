"""The supervisor's running workers: starting them, hearing from them, restarting and stopping them.

The decisions (states, backoff, liveness) are :mod:`colofs.workers.table`'s;
this module does what they call for: spawns through the zygote, one channel
per worker, a ping every :data:`~colofs.workers.table.PING_INTERVAL`, a
detach of a dead worker's mount, ``SIGKILL`` for one hung too long, and the
events ``worker-crashed``, ``worker-restarted`` and ``worker-hung`` (plus
every event a worker reports, re-emitted on the supervisor's bus).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from colofs.events import EventBus
from colofs.fs.mountpoint import MountpointError, detach_stale
from colofs.workers.attach import EXIT_UNCLAIMED, ON_ATTACH
from colofs.workers.channel import Channel, ChannelClosed, RemoteError, WorkerArgs, channel_pair
from colofs.workers.oncommand import ON_COMMAND
from colofs.workers.table import (
    FAILED,
    PING_INTERVAL,
    SERVING,
    STARTING,
    STOPPED,
    Table,
    Worker,
    describe_exit,
)
from colofs.workers.zygote import Zygote, ZygoteError

log = logging.getLogger(__name__)

SPAWN_TIMEOUT = 30.0
"""A fork by the zygote takes milliseconds; past this the zygote is taken to be wedged."""
OPEN_TIMEOUT = 120.0
DETACH_WAIT = 60.0
"""How long a stop waits for the VM mounts to be gone before it unmounts the root anyway."""
"""How long a control request waits for a new VM's worker to have opened its store."""


class Fleet:
    """Every VM's worker process of one supervisor."""

    def __init__(self, *, zygote: Zygote, table: Table, bus: EventBus, argv: list[str], mountpoint: str,
                 budget_total: int) -> None:
        self.zygote = zygote
        self.table = table
        self.bus = bus
        self.argv = argv
        self.mountpoint = mountpoint
        self.budget_total = budget_total
        self.channels: dict[str, Channel] = {}
        self.notes: list[str] = []
        self._changed = trio.Event()
        self._early_exits: dict[int, int] = {}
        self.refused = 0  # connections the workers refused after the router handed them over
        self.last_refusal: str | None = None
        self._forgotten: set[int] = set()  # workers of forgotten VMs, still ending
        self._nursery: trio.Nursery | None = None

    # -- waiting on the table ----------------------------------------------------------------

    def _touch(self) -> None:
        """Something in the table changed: wake whoever waits for a state."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, pred: Any, timeout: float) -> bool:
        """Wait until ``pred()`` holds (re-checked at every change of the table); False on timeout."""
        with trio.move_on_after(timeout):
            while not pred():
                await self._changed.wait()
            return True
        return False

    def settled(self, vm: str) -> bool:
        """The VM's worker is past starting: serving, failed, or gone for good."""
        w = self.table.get(vm)
        return w is None or w.error is not None or w.state in (SERVING, "hung", FAILED, STOPPED, "stopping")

    def _all_detached(self) -> bool:
        return all(w.pid is None or w.extra.get("detached") for w in self.table.workers.values())

    def running(self) -> int:
        return sum(1 for w in self.table.workers.values() if w.pid is not None)

    # -- life ----------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hear the workers' exits until cancelled (or the zygote is gone)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            async for pid, code in self.zygote.exits():
                self._exited(pid, code)
            log.error("the zygote is gone: no worker can be started any more")
            await trio.sleep_forever()

    async def start(self, vm: str, create_vm: str | None = None, *, on_attach: bool = False,
                    on_command: bool = False) -> Worker:
        """Spawn ``vm``'s worker (returns once it runs; it opens its VM and mounts on its own).

        ``on_attach``: a secondary's VM named by an unauthenticated preamble; the
        worker creates it only when an authenticated primary attaches it, else
        exits with ``EXIT_UNCLAIMED`` and the VM is forgotten (:mod:`colofs.workers.attach`).
        """
        assert self._nursery is not None
        w = self.table.add(vm)
        mine, theirs = channel_pair()
        extra = self._extra()
        if on_attach:
            extra[ON_ATTACH] = True
        if on_command:
            extra[ON_COMMAND] = True
        w.extra["pending"] = on_attach or on_command
        w.extra["detached"] = False
        args = WorkerArgs(vm=vm, argv=self.argv, restarts=w.restarts, create_vm=create_vm, extra=extra)
        try:
            with trio.fail_after(SPAWN_TIMEOUT):
                pid = await self.zygote.spawn(args, theirs)
        except (ZygoteError, trio.TooSlowError) as e:
            mine.close()
            w.state, w.error = FAILED, f"cannot start its worker: {e}"
            log.error("VM %s: %s", vm, w.error)
            self._touch()
            raise ZygoteError(w.error) from None
        self.table.started(w, pid, trio.current_time())
        channel = Channel(mine, label=f"worker {vm} (pid {pid})")
        self.channels[vm] = channel
        log.info("VM %s: worker started, pid %d%s", vm, pid, f" (restart {w.restarts})" if w.restarts else "")
        self._nursery.start_soon(self._serve_channel, w, channel)
        self._nursery.start_soon(self._liveness, w, channel)
        self._touch()
        code = self._early_exits.pop(pid, None)
        if code is not None:
            self._exited(pid, code)
        return w

    def _extra(self) -> dict[str, Any]:
        primaries = sum(1 for w in self.table.workers.values() if w.role == "primary") or 1
        return {"max_retained_total_bytes": max(1, self.budget_total // primaries)}

    async def _serve_channel(self, w: Worker, channel: Channel) -> None:
        try:
            await channel.run(functools.partial(self._handle, w, channel))
        finally:
            channel.close()

    async def _handle(self, w: Worker, channel: Channel, msg: dict[str, Any], fds: list[int]) -> dict[str, Any] | None:
        for fd in fds:
            os.close(fd)  # no worker message hands the supervisor a descriptor
        if self.channels.get(w.vm) is not channel:
            return None  # from a worker already replaced
        op = msg.get("op")
        now = trio.current_time()
        if op == "event":
            fields = {k: v for k, v in dict(msg.get("fields") or {}).items() if k not in ("event", "time")}
            kind = str(msg.get("kind", "unknown"))
            if kind == "peer-refused":  # a worker's secondary refused a handed connection (TLS, key, ATTACH)
                self.refused += 1
                self.last_refusal = f"{fields.get('peer')}: {fields.get('reason')}"
            self.bus.emit(kind, **fields)
        elif op == "summary":
            w.role, w.phase, w.link = msg.get("role"), msg.get("phase"), msg.get("link")
            w.extra["epoch"], w.extra["last_seq"] = msg.get("epoch"), msg.get("last_seq")
            self._send_budgets()
        elif op == "opened":
            w.opened, w.role = True, msg.get("role", w.role)
            w.extra["pending"] = bool(msg.get("pending"))
            for note in msg.get("notes") or []:
                log.warning("%s", note)
                self.notes.append(str(note))
            if msg.get("damaged"):
                log.error("VM %s: its worker opened it damaged (quarantined)", w.vm)
        elif op == "ready":
            self.table.ready(w, now)
            w.mountpoint = msg.get("mountpoint")
            log.info("VM %s: worker %s serving %s", w.vm, w.pid, w.mountpoint)
            if w.restarts:
                self.bus.emit("worker-restarted", vm=w.vm, pid=w.pid, restarts=w.restarts)
            self._send_budgets()
        elif op == "detached":  # its mount is gone (lazily if busy); the worker closes the VM next
            w.extra["detached"] = True
        elif op == "unmounted":  # its mount was taken away from outside: the VM stops, no restart
            w.extra["detached"] = True
            if self.table.stopping(w):
                log.info("VM %s: %s was unmounted from outside; its worker %s closes the VM", w.vm,
                         os.path.join(self.mountpoint, w.vm), w.pid)
        elif op == "failed":
            w.error = str(msg.get("error"))
            log.error("VM %s: its worker failed to start: %s", w.vm, w.error)
        else:
            log.warning("VM %s: unknown message %r from its worker", w.vm, op)
        self._touch()
        return None

    def _send_budgets(self) -> None:
        assert self._nursery is not None
        for vm, share in self.table.budgets(self.budget_total).items():
            channel = self.channels.get(vm)
            if channel is not None:
                self._nursery.start_soon(self._notify, channel, "budget", {"max_retained_total_bytes": share})

    @staticmethod
    async def _notify(channel: Channel, op: str, fields: dict[str, Any]) -> None:
        try:
            await channel.notify(op, **fields)
        except (ChannelClosed, OSError):
            pass

    def _exited(self, pid: int, code: int) -> None:
        if pid in self._forgotten:
            self._forgotten.discard(pid)
            return
        w = self.table.by_pid(pid)
        if w is None:
            self._early_exits[pid] = code  # its spawn has not recorded it yet
            return
        assert self._nursery is not None
        if w.extra.get("pending"):
            self._forget(w, pid, code)
            return
        delay = self.table.exited(w, code, trio.current_time())
        if w.state == STOPPED:
            log.info("VM %s: worker %d ended (%s)", w.vm, pid, w.last_exit)
        else:
            log.error("VM %s: worker %d died (%s); %s", w.vm, pid, w.last_exit,
                      "restarting it" if delay == 0 else
                      f"restarting it in {delay:.0f} s" if delay is not None else
                      "too many quick crashes: not restarting it (failed)")
            self.bus.emit("worker-crashed", vm=w.vm, pid=pid, exit=w.last_exit, state=w.state)
            self._nursery.start_soon(self._restart, w, delay)
        self._touch()

    def _forget(self, w: Worker, pid: int, code: int) -> None:
        """A worker whose VM no authenticated primary attached ended: no VM, nothing to restart."""
        if code == EXIT_UNCLAIMED:
            log.info("VM %s: no authenticated primary attached it; its worker %d ended and it is forgotten", w.vm, pid)
        else:
            log.warning("VM %s: its worker %d ended (%s) before a primary attached it; forgotten",
                        w.vm, pid, describe_exit(code))
        self.table.workers.pop(w.vm, None)
        self.channels.pop(w.vm, None)
        self._touch()

    def forget_pending(self, vm: str, *, why: str = "the command it was started for failed",
                       pending_only: bool = True) -> None:
        """A VM whose worker was started for a command that failed, and never made it: forget it, stop the worker."""
        w = self.table.get(vm)
        if w is None or (pending_only and not w.extra.get("pending")):
            return
        log.info("VM %s: %s; forgotten", vm, why)
        w.state = STOPPED  # a restart already scheduled for it does not run
        self.table.workers.pop(vm, None)
        channel = self.channels.pop(vm, None)
        if w.pid is not None:
            self._forgotten.add(w.pid)
        if channel is not None and self._nursery is not None:
            self._nursery.start_soon(self._notify, channel, "stop", {"lazy": False})
        self._touch()

    async def _detach(self, vm: str) -> None:
        path = os.path.join(self.mountpoint, vm)
        try:
            if await trio.to_thread.run_sync(detach_stale, path):
                log.warning("VM %s: detached the dead worker's mount %s", vm, path)
        except MountpointError as e:
            log.error("VM %s: %s", vm, e)

    async def _restart(self, w: Worker, delay: float | None) -> None:
        """Detach the dead worker's mount first (a new mount cannot go on a stale one), then restart."""
        await self._detach(w.vm)
        if delay is None:
            return
        await trio.sleep(delay)
        if self.table.restarting(w):
            try:
                await self.start(w.vm)
            except ZygoteError:
                pass

    async def _liveness(self, w: Worker, channel: Channel) -> None:
        """Ping the worker while it serves; report it hung, kill it when hung too long."""
        while not channel.closed.is_set():
            with trio.move_on_after(PING_INTERVAL):
                await channel.closed.wait()
            if channel.closed.is_set() or self.channels.get(w.vm) is not channel:
                return
            if w.state in (SERVING, "hung"):
                try:
                    await channel.call("ping", timeout=PING_INTERVAL)
                except (trio.TooSlowError, RemoteError):
                    pass
                except ChannelClosed:
                    return
                else:
                    if self.table.answered(w, trio.current_time()):
                        log.warning("VM %s: worker %s answers again", w.vm, w.pid)
                        self.bus.emit("worker-serving", vm=w.vm, pid=w.pid)
                        self._touch()
            action = self.table.check(w, trio.current_time())
            if action == "hung":
                if w.stuck_starting:
                    log.error("VM %s: worker %s %s (it opens its VM and mounts it): hung", w.vm, w.pid, w.error)
                else:
                    log.error("VM %s: worker %s has not answered for %.0f s: hung", w.vm, w.pid,
                              self.table.liveness_timeout)
                self.bus.emit("worker-hung", vm=w.vm, pid=w.pid, starting=w.stuck_starting)
                self._touch()
            elif action == "kill" and w.pid is not None:
                log.error("VM %s: worker %s hung for %.0f s: killing it (SIGKILL) to restart it",
                          w.vm, w.pid, self.table.kill_after)
                try:
                    os.kill(w.pid, signal.SIGKILL)
                except OSError as e:
                    if e.errno != errno.ESRCH:
                        raise
                return

    # -- asking the workers --------------------------------------------------------------------

    async def call(self, vm: str, op: str, timeout: float, /, **fields: Any) -> dict[str, Any]:
        """A request to ``vm``'s worker once it opened its VM; RemoteError(EAGAIN) if it is not there."""
        if not await self.wait_for(lambda: self.opened_or_gone(vm), OPEN_TIMEOUT):
            raise RemoteError(f"VM {vm}: its worker did not open the VM within {OPEN_TIMEOUT:.0f} s", errno.EAGAIN)
        w = self.table.get(vm)
        channel = self.channels.get(vm)
        if w is None or channel is None or w.pid is None or not w.opened:
            state = w.state if w is not None else "missing"
            raise RemoteError(f"VM {vm}: its worker is {state}{': ' + w.error if w and w.error else ''}; "
                              "try again", errno.EAGAIN)
        try:
            return await channel.call(op, timeout=timeout, **fields)
        except ChannelClosed:
            raise RemoteError(f"VM {vm}: its worker went away during {op}; try again", errno.EAGAIN) from None
        except trio.TooSlowError:
            raise RemoteError(f"VM {vm}: its worker did not answer {op} within {timeout:.0f} s",
                              errno.ETIMEDOUT) from None

    def opened_or_gone(self, vm: str) -> bool:
        w = self.table.get(vm)
        return w is None or w.opened or w.state not in (STARTING, "restarting", "crashed")

    async def hand_over(self, vm: str, sock_fd: int, peer: str) -> None:
        """Give ``vm``'s worker a secondary connection (``sock_fd`` is duplicated into it)."""
        channel = self.channels[vm]
        await channel.notify("connection", fds=[sock_fd], peer=peer)

    async def stop_all(self, *, lazy: bool, detached: Callable[[], Awaitable[None]] | None = None) -> None:
        """Ask every worker to stop (unmount, drain, close its VM) and wait until all have exited.

        ``detached`` runs once every VM mount is gone (a busy one detached lazily, its worker
        still serving the files left open), before the wait for the exits: the root can be
        unmounted then, as one process's mount is at once, busy or not.
        """
        for w in list(self.table.workers.values()):
            if self.table.stopping(w):
                channel = self.channels.get(w.vm)
                if channel is not None:
                    log.info("VM %s: stopping worker %s", w.vm, w.pid)
                    await self._notify(channel, "stop", {"lazy": lazy})
        self._touch()
        if detached is not None:
            if not await self.wait_for(self._all_detached, DETACH_WAIT):
                left = [w.vm for w in self.table.workers.values() if w.pid is not None and not w.extra.get("detached")]
                log.warning("VM mounts still not detached after %.0f s: %s", DETACH_WAIT, ", ".join(left))
            await detached()
        while self.running():
            if not await self.wait_for(lambda: self.running() == 0, 30):
                left = [f"{w.vm} (pid {w.pid})" for w in self.table.workers.values() if w.pid is not None]
                log.warning("still waiting for workers to close their VMs: %s", ", ".join(left))
