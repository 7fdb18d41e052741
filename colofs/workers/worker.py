"""One VM's worker process: its store, its replication and its FUSE mount at ``MOUNTPOINT/VM``.

Startup and shutdown share one state (what is open, mounted, stopping)
whose order is the point, so they stay together here, where the two orders
can be checked against each other. The channel's operations and reports,
which use that state but not its order, are :mod:`colofs.workers.requests`;
the two start modes for a VM not yet in the store are modules of their own
(:mod:`colofs.workers.attach`, :mod:`colofs.workers.oncommand`).

The zygote calls :func:`main` in a freshly forked child. The worker re-parses
the supervisor's daemon arguments, opens the store scoped to its one VM (the
VM's crash recovery runs here, as at a remount), starts that VM's replication
(a primary's link, or a secondary's sessions fed connections the supervisor
accepted), and mounts a VM-rooted filesystem on the VM's directory of the
supervisor's root mount. It then serves the supervisor's channel
(:mod:`colofs.workers.channel`): ``ping``, ``stop``, ``connection``,
``create_disk``, ``import_disk``, ``budget``, ``metrics`` (its VM's figures,
gathered by the supervisor: :mod:`colofs.workers.metrics`); and reports ``opened``,
``ready``, every event, a ``summary`` of its VM, or ``failed`` (also when
closing the VM fails at the end, with ``mounted: true``). A worker started for
a VM the store does not hold yet creates it only when an authenticated primary
attaches it (:mod:`colofs.workers.attach`) or, started for a root ``create`` or
``import``, only when that command succeeds (:mod:`colofs.workers.oncommand`).

Shutdown keeps the daemon's order (:mod:`colofs.fs.daemon`): unmount (the
kernel writes dirty pages back first), drain replication, close the store.
A ``stop`` from the supervisor and ``SIGTERM``/``SIGINT``/``SIGHUP`` start
it; so does the end of the channel (the supervisor is gone), with a lazy
unmount. If even that fails (no path reaches the mount any more), the FUSE
session is ended from inside, so the VM is still closed cleanly and no orphan
worker keeps its files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import logging
import os
import signal
import socket
import stat
import time
from typing import Any

import pyfuse3
import trio

from colofs.core.errors import ColofsError
from colofs.core.state import PRIMARY, ROLES, SECONDARY
from colofs.core.store import Store
from colofs.events import EventBus
from colofs.fs.config import ConfigError, MountConfig, config_from_args
from colofs.fs.control import MountInfo
from colofs.fs.daemon import (
    StartupError,
    after_unmount,
    key_of,
    mount,
    parser,
    recovery_notes,
    run_fuse,
    setup_logging,
    start_replication,
    start_watchers,
    unmount,
    watch_signals,
    wire_hooks,
)
from colofs.fs.fuseconn import background_limit
from colofs.fs.fusedevice import queued_requests_probe
from colofs.fs.metrics import VMCounts
from colofs.fs.operations import Operations
from colofs.fs.replication import Replication
from colofs.nbd.handoff import start_worker_nbd
from colofs.nbd.service import NbdService
from colofs.repl import ReplConfig, ReplConfigError
from colofs.wire import NonceRegistry
from colofs.workers.attach import EXIT_UNCLAIMED, ON_ATTACH, PendingVM, Unclaimed
from colofs.workers.channel import Channel, ChannelClosed, WorkerArgs, encode
from colofs.workers.malloc import Trimmer
from colofs.workers.oncommand import ON_COMMAND, PendingCommand
from colofs.workers.requests import BUDGET, Requests

log = logging.getLogger(__name__)

MOUNT_WAIT = 10.0
"""How long the VM's directory may take to appear in the root mount (the supervisor's mkdir)."""
EVENT_QUEUE = 1024
"""Events queued for the supervisor; past that they are dropped (and counted), never blocking the emitter."""


def main(args: WorkerArgs) -> int:
    """Serve ``args.vm`` until stopped; the process's exit status (1: startup failed, ``failed`` was sent)."""
    # Python's own setting, which a forked child may not have: a write to a closed socket (the
    # channel of a dead supervisor, a peer's reset connection) must raise EPIPE, not kill the worker.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    sock = socket.socket(fileno=args.channel_fd)
    try:
        cfg = _config(args.argv)
    except ConfigError as e:
        _fail_early(sock, f"worker for VM {args.vm}: {e}")
        return 1
    setup_logging(cfg, to_stderr=False, vm=args.vm)
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1)  # dumps every thread's stack
    log.info("worker for VM %s starting (pid %d, restart %d)", args.vm, os.getpid(), args.restarts)
    try:
        return trio.run(Worker(args, cfg, sock).run)
    except BaseException:
        log.exception("worker for VM %s failed", args.vm)
        raise


def _config(argv: list[str]) -> MountConfig:
    """The supervisor's configuration, re-parsed from its daemon arguments."""
    p = parser()
    try:
        ns = p.parse_args(argv)
    except SystemExit:  # argparse printed why
        raise ConfigError(f"cannot parse the daemon arguments {argv!r}") from None
    return config_from_args(ns)


def _fail_early(sock: socket.socket, error: str) -> None:
    """Report a failure from before the event loop runs, on the blocking socket."""
    try:
        sock.send(encode({"op": "failed", "error": error}))
    except OSError:
        pass
    finally:
        sock.close()


class Worker(Requests):
    """The life of one VM's worker: startup, mount, shutdown (its channel's operations: :class:`Requests`)."""

    def __init__(self, args: WorkerArgs, cfg: MountConfig, sock: socket.socket) -> None:
        self.args = args
        self.cfg = cfg
        self.vm = args.vm
        self.mountpoint = os.path.join(cfg.mountpoint, args.vm)
        self.channel = Channel(sock, label=f"worker {args.vm}")
        self.store: Store | None = None
        self.ops: Operations | None = None
        self.repl: Replication | None = None
        self.nbd: NbdService | None = None
        self.counts: VMCounts | None = None  # checkpoints and failovers seen on the VM's bus, for metrics
        self.pending: PendingVM | PendingCommand | None = None  # a VM created by an ATTACH, or a disk command, only
        self.opened = trio.Event()  # the store is open and Operations exist: commands can run
        self.mounted = False
        self.stopping = False
        self._startup = trio.CancelScope()  # cancelled by a stop that comes before the mount
        self._nursery: trio.Nursery | None = None
        self._vm_nursery: trio.Nursery | None = None
        self._events_send, self._events_receive = trio.open_memory_channel[dict[str, Any]](EVENT_QUEUE)
        self.events_dropped = 0
        self.trimmer = Trimmer()  # free heap pages go back to the kernel after a checkpoint
        budget = args.extra.get(BUDGET)
        self.budget: int | None = int(budget) if budget is not None else None
        """The retained-writes budget the supervisor gives this VM (None: the engine's default)."""

    # -- the whole life ---------------------------------------------------------------

    async def run(self) -> int:
        status = 0
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self.channel.run, self.handle)
                nursery.start_soon(self._watch_channel)
                try:
                    await self._serve()
                except StartupError as e:
                    status = await self._failed(str(e))
                except Unclaimed as e:
                    log.info("worker for VM %s: %s; ending without creating it", self.vm, e)
                    status = EXIT_UNCLAIMED
                except Exception as e:
                    log.exception("worker for VM %s failed", self.vm)
                    status = await self._failed(f"{type(e).__name__}: {e} (see {self.cfg.log_file})")
                nursery.cancel_scope.cancel()
        finally:
            self.channel.close()
        if status == 0:
            log.info("worker for VM %s stopped cleanly", self.vm)
        return status

    async def _failed(self, error: str) -> int:
        log.error("worker for VM %s: %s", self.vm, error)
        try:  # also after the mount (closing the VM failed, say): the supervisor's exit status says so
            await self.channel.notify("failed", error=error, mounted=self.mounted)
        except Exception as e:  # the supervisor may be gone
            log.debug("cannot report the failure: %s", e)
        return 1

    async def _serve(self) -> None:
        """Open the VM, replicate, mount, serve until unmounted; then drain and close (the daemon's order)."""
        cfg = self.cfg
        key = key_of(cfg)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            with self._startup:
                store = await self._open_store()
                try:
                    await self._serve_store(store, key, signals)
                finally:
                    with trio.CancelScope(shield=True):
                        await store.close()
                log.info("VM %s closed cleanly", self.vm)

    async def _open_store(self) -> Store:
        cfg, args = self.cfg, self.args
        log.info("opening VM %s of store %s", self.vm, cfg.store)
        if args.create_vm is not None and args.create_vm not in ROLES:
            raise StartupError(f"create_vm: role must be one of {', '.join(ROLES)}, not {args.create_vm!r}")
        try:
            store = await Store.open(cfg.store, role=cfg.role, only=self.vm)
        except ColofsError as e:
            raise StartupError(f"cannot open VM {self.vm} of store {cfg.store}: {e}") from e
        try:
            if self.vm not in store.vms:
                if args.create_vm is None:
                    raise StartupError(f"store {cfg.store} has no VM {self.vm}")
                if args.extra.get(ON_ATTACH):
                    self.pending = PendingVM(store, self.vm)
                    log.info("VM %s is not in the store: waiting for an authenticated primary to attach it", self.vm)
                    return store
                if args.extra.get(ON_COMMAND):
                    self.pending = PendingCommand(store, self.vm)
                    log.info("VM %s is not in the store: it is made by its first disk's create or import", self.vm)
                    return store
                vm = await store.create_vm(self.vm, args.create_vm)
                log.info("VM %s created (role %s)", self.vm, vm.state.role)
        except BaseException as e:
            store.abandon()
            if isinstance(e, ColofsError):
                raise StartupError(f"cannot create VM {self.vm}: {e}") from e
            raise
        return store

    async def _serve_store(self, store: Store, key: bytes | None, signals: Any) -> None:
        cfg = self.cfg
        notes = recovery_notes(store)
        for note in notes:
            log.warning("%s", note)
        bus = EventBus()
        counts = VMCounts(bus)  # from the first event on
        try:
            settings = ReplConfig(tls=cfg.tls())
        except ReplConfigError as e:
            raise StartupError(f"replication: {e}") from None
        if self.budget is not None:
            settings = dataclasses.replace(settings, max_retained_total_bytes=self.budget)
        repl = Replication(cfg, store, key, settings=settings, events=bus, nonces=NonceRegistry(), handoff=True)
        self.store, self.repl, self.counts = store, repl, counts
        bus.watch(self._queue_event)
        if self.pending is not None:
            bus.watch(self.pending.on_event)
            await self.channel.notify("opened", role=self.args.create_vm or SECONDARY, notes=notes, damaged=False,
                                      pending=True)
        else:
            await self._opened(store, notes)
        failure: StartupError | Unclaimed | None = None
        try:
            async with trio.open_nursery() as nursery:
                self._vm_nursery = nursery  # a pending VM's sessions run here, ended before the store closes
                nursery.start_soon(self._forward_events)
                nursery.start_soon(self.trimmer.run)
                try:
                    if self.pending is not None:  # the VM exists once an authenticated primary attached it
                        await start_replication(nursery, repl, cfg)
                        await self.pending.wait(settings.handshake_timeout * 2)
                        await self._opened(store, [])
                    ops = self._operations(store, repl)
                    await self._send_summary()
                    if self.pending is None:
                        await start_replication(nursery, repl, cfg)
                    start_watchers(nursery, ops, bus)
                    nbd_wanted = cfg.nbd_socket is not None or cfg.nbd_listen is not None
                    self.nbd = await start_worker_nbd(nursery, ops, nbd_wanted)  # before the mount serves
                    await self._mount(ops)
                    store.io.pending = queued_requests_probe()
                except (StartupError, Unclaimed) as e:
                    failure = e
                    nursery.cancel_scope.cancel()
                else:
                    await self._serve_mount(nursery, ops, repl, signals)
        finally:
            self._vm_nursery = None
            if self.mounted:
                pyfuse3.close(unmount=True)  # a no-op after a clean unmount
        if failure is not None:
            raise failure
        log.info("%s unmounted, replication stopped; closing VM %s", self.mountpoint, self.vm)

    async def _opened(self, store: Store, notes: list[str]) -> None:
        vm = store.vm(self.vm)
        await self.channel.notify("opened", role=vm.state.role, notes=notes, damaged=vm.damage is not None)

    def _operations(self, store: Store, repl: Replication) -> Operations:
        """The VM-rooted filesystem; commands from the supervisor can run from now on."""
        worker = {"state": "serving", "pid": os.getpid(), "restarts": self.args.restarts}
        ops = Operations(store, MountInfo(self.cfg, os.getpid(), time.time(), worker=worker), repl, root_vm=self.vm)
        wire_hooks(ops, repl)
        self.ops = ops
        self.opened.set()
        return ops

    async def _mount(self, ops: Operations) -> None:
        """Mount on ``MOUNTPOINT/VM``, waiting (with backoff) for the root mount to show that directory."""
        deadline = trio.current_time() + MOUNT_WAIT
        delay = 0.02
        while True:
            problem = await trio.to_thread.run_sync(_directory_problem, self.mountpoint)
            if problem is None:
                break
            if trio.current_time() + delay > deadline:
                raise StartupError(f"cannot mount on {self.mountpoint}: {problem} (waited {MOUNT_WAIT:.0f} s)")
            await trio.sleep(delay)  # the supervisor may still be answering the mkdir
            delay = min(delay * 2, 1.0)
        mount(ops, self.cfg, self.mountpoint, source=os.path.join(self.cfg.store, self.vm))
        self.mounted = True

    async def _serve_mount(self, nursery: trio.Nursery, ops: Operations, repl: Replication, signals: Any) -> None:
        unmounted = trio.Event()
        await nursery.start(run_fuse, unmounted)
        ops.nursery = nursery
        nursery.start_soon(watch_signals, signals, self.mountpoint)
        nursery.start_soon(self._bound_queue, ops)
        log.info("serving VM %s on %s; replication: %s", self.vm, self.mountpoint, repl.root_status()["state"])
        await self.channel.notify("ready", mountpoint=self.mountpoint, pid=os.getpid())
        await unmounted.wait()
        if not self.stopping:  # unmounted from outside (``umount -R``, systemd): a stop, not a crash
            self.stopping = True
            log.info("VM %s: %s was unmounted from outside; closing the VM", self.vm, self.mountpoint)
            with contextlib.suppress(ChannelClosed, OSError):
                await self.channel.notify("unmounted")
        await after_unmount(ops, repl, self.mountpoint, self.nbd)
        nursery.cancel_scope.cancel()

    async def _bound_queue(self, ops: Operations) -> None:
        """Have the mount's queue of writes follow their size while the VM is a primary (fs/fuseconn.py)."""
        def is_primary() -> bool:
            vm = self.store.vms.get(self.vm) if self.store is not None else None
            return vm is not None and vm.state.role == PRIMARY

        limit = await trio.to_thread.run_sync(background_limit, self.mountpoint, is_primary)
        if limit is not None:
            ops.on_write = limit.note_write

    # -- stopping ---------------------------------------------------------------------------

    def stop(self, *, lazy: bool, why: str) -> None:
        """Start the shutdown: the unmount if mounted (its end stops the rest), else abandon the startup."""
        if self.stopping:
            return
        self.stopping = True
        if not self.mounted:
            log.info("VM %s: %s before the mount was up: stopping", self.vm, why)
            self._startup.cancel()
            return
        log.info("VM %s: %s: unmounting %s%s", self.vm, why, self.mountpoint, " lazily" if lazy else "")
        assert self._nursery is not None
        self._nursery.start_soon(self._unmount, lazy)

    async def _unmount(self, lazy: bool) -> None:
        if not await unmount(self.mountpoint, lazy=lazy):
            # Not even detached (no path reaches it, say): end the session from inside, so the VM is
            # closed all the same and no orphan worker keeps its files; the mount is left stale for
            # the supervisor (or whoever detaches the root) to take away.
            log.warning("%s could not be unmounted; ending its FUSE session from inside", self.mountpoint)
            pyfuse3.terminate()
            return
        with contextlib.suppress(ChannelClosed, OSError):
            await self.channel.notify("detached")  # the root can go now, while this VM drains and closes

    async def _watch_channel(self) -> None:
        await self.channel.closed.wait()
        self.stop(lazy=True, why="the supervisor is gone (its channel closed)")


def _directory_problem(path: str) -> str | None:
    """Why ``path`` cannot be mounted on yet (missing, not a directory), or None."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return "no such directory yet"
    except OSError as e:
        return e.strerror or str(e)
    return None if stat.S_ISDIR(st.st_mode) else "not a directory"
