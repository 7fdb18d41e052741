"""The supervisor of a ``--workers`` mount: the store lock, the root mount, and a worker per VM.

It mirrors :func:`colofs.fs.daemon.run`: detach a stale mount, check the
mountpoint, take the store's lock, mount, report ready on the ready fd (and
``READY=1`` to systemd), serve until told to stop. Before any of that it
forks the zygote (:mod:`colofs.workers.zygote`), so workers are forked from a
process that has the code imported and holds nothing else. It lists the
store's VM directories without opening them (the workers own their files),
mounts the root (:mod:`colofs.workers.rootfs`), starts every worker at once,
and reports ready once each has reported ``ready`` or failed. A secondary's
replication port is the supervisor's (:mod:`colofs.workers.router`).
Events of every worker are re-emitted on the supervisor's event socket.

``SIGTERM``/``SIGINT``/``SIGHUP``, or the root unmounted from outside:
``stop`` to every worker (each unmounts its VM, lazily if busy, drains and
closes it), wait for every exit, unmount the root (lazily if busy), release
the lock.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import pyfuse3
import trio

from colofs.core.state import read_store_marker, write_store_marker
from colofs.core.store import MARKER
from colofs.core.vmbase import STATE_FILE
from colofs.events import EventBus, socket_path
from colofs.fs.config import MountConfig
from colofs.fs.control import COLOFS_VERSION, CONTROL_VERSION
from colofs.fs.daemon import (
    Ready,
    StartupError,
    key_of,
    mount_options,
    run_fuse,
    run_locked,
    setup_logging,
    unmount,
)
from colofs.fs.lock import StoreLock
from colofs.fs.metrics import refusals, serve_metrics
from colofs.fs.paging import page
from colofs.nbd.handoff import start_front
from colofs.nbd.service import NbdService, NbdStartError
from colofs.notify import notify
from colofs.repl import ReplConfig, ReplConfigError
from colofs.workers.channel import Channel
from colofs.workers.fleet import Fleet
from colofs.workers.memory import MEMORY_KEYS, memory_of
from colofs.workers.metrics import WorkerFigures
from colofs.workers.rootfs import RootOperations
from colofs.workers.router import Router
from colofs.workers.table import SERVING, STOPPED, Table, describe_exit, hang_kill_after
from colofs.workers.worker import main as worker_main
from colofs.workers.zygote import Zygote

log = logging.getLogger(__name__)

LEFTOVER_WAIT = 10.0
"""How long a new supervisor waits for the workers of a killed one to close their VMs."""
START_WAIT = 300.0
"""How long the startup waits for every worker to report ready or failed before reporting ready anyway."""


def _vm_dirs(store: str) -> list[str]:
    """The VM directories of the store, without opening them (an interrupted creation's empty one skipped)."""
    names = []
    for entry in sorted(os.listdir(store)):
        path = os.path.join(store, entry)
        if entry.startswith(".") or not os.path.isdir(path):
            continue
        if not os.path.exists(os.path.join(path, STATE_FILE)) and \
                not [e for e in os.listdir(path) if not e.startswith(STATE_FILE)]:
            log.warning("store %s: ignoring %s, an empty VM directory (an interrupted creation)", store, entry)
            continue
        names.append(entry)
    return names


def _node_id(store: str) -> str:
    """The store's node id; a new store gets its marker here (the workers open it as a store)."""
    marker = os.path.join(store, MARKER)
    if not os.path.exists(marker):
        if any(not e.startswith(".") for e in os.listdir(store)):
            raise StartupError(f"cannot open store {store}: refusing to create a store in a non-empty directory")
        import uuid

        write_store_marker(marker, uuid.uuid4().hex)
        log.info("created store %s", store)
    try:
        return str(read_store_marker(marker)["node_id"])
    except Exception as e:
        raise StartupError(f"cannot open store {store}: {e}") from e


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _ancestors() -> set[int]:
    """This process and every process above it."""
    out, pid = set(), os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return out


def leftover_workers(store: str, exclude: set[int]) -> list[int]:
    """Processes of an earlier supervisor of ``store`` still running (its workers, forked: same command line).

    A supervisor killed with ``SIGKILL`` leaves its workers; one whose VM's
    disk is still open serves it until the disk is closed. A new worker for
    that VM must not open its files meanwhile.
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        argv = _cmdline(int(entry))
        if "--workers" in argv and any(
                a == "--store" and i + 1 < len(argv) and os.path.abspath(argv[i + 1]) == store
                for i, a in enumerate(argv)):
            found.append(int(entry))
    return sorted(found)


def wait_for_leftovers(store: str, exclude: set[int], timeout: float) -> None:
    """Wait (blocking, before trio runs) for an earlier supervisor's processes to end; StartupError if they do not."""
    deadline = time.monotonic() + timeout
    left = leftover_workers(store, exclude)
    if left:
        log.warning("processes of an earlier supervisor of %s still run (pids %s): waiting up to %.0f s for them "
                    "to close their VMs", store, ", ".join(map(str, left)), timeout)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if _cmdline(p)]
    if left:
        raise StartupError(
            f"store {store}: workers of an earlier supervisor still serve its VMs (pids "
            f"{', '.join(map(str, left))}); each ends when its VM's disks are closed. Stop their users "
            "(or kill them), then mount again")


class Supervisor:
    """One ``--workers`` mount's supervisor while it runs."""

    def __init__(self, cfg: MountConfig, zygote: Zygote, lock: StoreLock, argv: list[str]) -> None:
        self.cfg = cfg
        self.lock = lock
        self.started = time.time()
        self.node_id = ""
        self.bus = EventBus()
        try:
            self.settings = ReplConfig(tls=cfg.tls())
        except ReplConfigError as e:
            raise StartupError(f"replication: {e}") from None
        self.table = Table(kill_after=hang_kill_after())
        self.fleet = Fleet(zygote=zygote, table=self.table, bus=self.bus, argv=argv,
                           mountpoint=cfg.mountpoint, budget_total=self.settings.max_retained_total_bytes)
        self.router: Router | None = None
        self.nbd: NbdService | None = None

    def root_status(self) -> dict[str, Any]:
        cfg = self.cfg
        names = self.table.names()
        first = page(names, 0, "vms")
        assert first is not None
        repl: dict[str, Any] = dict(cfg.replication())
        links = [w.link for w in self.table.workers.values() if w.link]
        if cfg.peer is not None:
            repl.update(state="running", role="primary", authenticated=cfg.key_file is not None,
                        vms=sum(1 for w in self.table.workers.values() if w.role == "primary"),
                        **{s: links.count(s) for s in ("connected", "connecting", "resyncing", "refused")})
        elif self.router is not None:
            st = self.router.status()
            repl.update(state="running", role="secondary", authenticated=cfg.key_file is not None,
                        port=st["port"], connections=st["connections"],
                        refused=st["refused"] + self.fleet.refused, sessions=links.count("connected"),
                        last_refusal=self.fleet.last_refusal or st["last_refusal"], pending=st["pending"],
                        refused_by_reason=st["refused_by_reason"], routed=st["routed"])
        return {
            "kind": "root", "version": COLOFS_VERSION, "control_version": CONTROL_VERSION,
            "store": cfg.store, "node_id": self.node_id, "default_role": cfg.role,
            "mountpoint": cfg.mountpoint, "pid": os.getpid(), "started": self.started,
            "log_file": cfg.log_file, "lock_file": cfg.lock_file, "replication": repl,
            "vm_count": len(names), "vm_roles": self.table.roles(), "vms": first["vms"],
            "vm_pages": first["pages"], "process_model": "workers", "workers": self.table.counts(),
        }

    async def memory(self) -> dict[str, Any]:
        """What the supervisor, the zygote and the workers hold (bytes; PSS/USS count shared pages fairly).

        Totals only, so the root's status stays bounded. The PIDs are taken here, on the loop that
        changes the table; the /proc reads are a thread's work.
        """
        pids = [w.pid for w in self.table.workers.values() if w.pid is not None]
        return await trio.to_thread.run_sync(self._memory_of, pids)

    def _memory_of(self, pids: list[int]) -> dict[str, Any]:
        def figures(pid: int) -> dict[str, int]:
            try:
                return memory_of(pid)
            except OSError:
                return dict.fromkeys(MEMORY_KEYS, 0)

        workers = [figures(pid) for pid in pids]
        return {"supervisor": figures(os.getpid()), "zygote": figures(self.fleet.zygote.pid),
                "workers": {k: sum(f[k] for f in workers) for k in MEMORY_KEYS}, "worker_count": len(workers)}

    def unclean(self) -> str | None:
        """Why VMs were not closed cleanly at the end (their workers' errors), or None: as one process's umount says."""
        bad = [f"VM {w.vm}: {w.error or w.last_exit}" for _, w in sorted(self.table.workers.items())
               if w.state == STOPPED and w.last_exit not in (None, describe_exit(0))]
        return "; ".join(bad) or None

    def greeting(self) -> list[dict[str, Any]]:
        """What a new event listener is sent first: one ``exists`` line per VM."""
        return [{"event": "exists", "vm": w.vm, "role": w.role, "phase": w.phase, "epoch": w.extra.get("epoch"),
                 "last_seq": w.extra.get("last_seq"), "peer": w.link, "link": w.link, "worker": w.state}
                for _, w in sorted(self.table.workers.items())]

    async def serve(self, ready: Ready) -> None:
        cfg = self.cfg
        key = key_of(cfg)
        self.node_id = _node_id(cfg.store)
        vms = _vm_dirs(cfg.store)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            mounted = False
            failure: StartupError | None = None
            try:
                async with trio.open_nursery() as nursery:
                    try:
                        await self._start(nursery, key)
                        ops = RootOperations(self.fleet, role=cfg.role, store=cfg.store,
                                             status=self.root_status, memory=self.memory, nursery=nursery)
                        try:
                            pyfuse3.init(ops, cfg.mountpoint, mount_options(cfg))
                        except RuntimeError as e:
                            raise StartupError(f"cannot mount on {cfg.mountpoint}: {e} (see {cfg.log_file})") from e
                        mounted = True
                    except StartupError as e:
                        failure = e
                        nursery.cancel_scope.cancel()
                    else:
                        unmounted = trio.Event()
                        await nursery.start(run_fuse, unmounted)
                        await self._serve(nursery, vms, signals, unmounted, ready)
            finally:
                if mounted:
                    pyfuse3.close(unmount=True)
            if failure is not None:
                raise failure

    async def _start(self, nursery: trio.Nursery, key: bytes | None) -> None:
        """Everything the root mount needs first: the exits watch, a secondary's port, the events."""
        cfg = self.cfg
        await nursery.start(self.fleet.run)
        if cfg.listen is not None:
            self.router = Router(self.fleet, self.settings, keyed=key is not None)
            try:
                await nursery.start(self.router.serve, cfg.listen.host, cfg.listen.port)
            except ReplConfigError as e:
                raise StartupError(f"replication: {e}") from None
            except OSError as e:
                raise StartupError(f"replication: cannot listen on {cfg.listen}: {e.strerror or e}") from None
        if cfg.nbd_socket is not None or cfg.nbd_listen is not None:
            tcp = (cfg.nbd_listen.host, cfg.nbd_listen.port) if cfg.nbd_listen is not None else None
            try:
                self.nbd = await start_front(nursery, self._serving_channels, socket_path=cfg.nbd_socket, tcp=tcp)
            except NbdStartError as e:
                raise StartupError(f"nbd: {e}") from None
        await self._start_events(nursery)
        if cfg.metrics is not None:
            router = self.router
            source = WorkerFigures(self.fleet, refused=None if router is None else lambda: refusals(router.status()))
            try:
                await nursery.start(serve_metrics, source, cfg.metrics.host, cfg.metrics.port)
            except OSError as e:
                raise StartupError(f"--metrics: cannot listen on {cfg.metrics}: {e.strerror or e}") from None

    def _serving_channels(self) -> dict[str, Channel]:
        """The VMs whose worker serves now, and their channels (where NBD clients are handed)."""
        return {vm: ch for vm, ch in self.fleet.channels.items()
                if (w := self.table.get(vm)) is not None and w.state == SERVING}

    async def _start_events(self, nursery: trio.Nursery) -> None:
        self.bus.greeting = self.greeting
        path = socket_path(self.cfg.store)
        try:
            await nursery.start(self.bus.serve, path)
        except OSError as e:
            log.warning("events: cannot listen on %s: %s; mountctl events will not work", path, e.strerror or e)

    async def _serve(self, nursery: trio.Nursery, vms: list[str], signals: AsyncIterator[int],
                     unmounted: trio.Event, ready: Ready) -> None:
        cfg = self.cfg
        for vm in vms:
            self.table.add(vm)
        async with trio.open_nursery() as starting:  # all at once
            for vm in vms:
                starting.start_soon(self._start_one, vm)
        stop = trio.Event()
        nursery.start_soon(self._watch_signals, signals, stop)
        nursery.start_soon(self._watch_unmount, unmounted, stop)
        await self.fleet.wait_for(lambda: all(self.fleet.settled(vm) for vm in vms) or stop.is_set(), START_WAIT)
        self.lock.update(state="serving")
        counts = self.table.counts()
        log.info("serving %s on %s: %d VMs, workers %s", cfg.store, cfg.mountpoint, len(vms), counts)
        ready({"ready": True, "pid": os.getpid(), "mountpoint": cfg.mountpoint, "store": cfg.store,
               "log_file": cfg.log_file, "notes": list(self.fleet.notes), "vms": self.table.names(),
               "nbd": self.nbd.addresses if self.nbd is not None else [], "workers": len(vms),
               "failed": sorted(w.vm for w in self.table.workers.values() if w.error)})
        notify(READY=1, MAINPID=os.getpid(), STATUS=f"serving {cfg.store} on {cfg.mountpoint}")
        await stop.wait()
        notify(STOPPING=1, STATUS=f"stopping the workers of {cfg.store}")
        self.lock.update(state="stopping workers")
        if self.nbd is not None:
            await self.nbd.stop()  # no new clients; each worker ends its own at its unmount

        async def unmount_root() -> None:
            if not unmounted.is_set():
                log.info("every VM mount is gone; unmounting %s", cfg.mountpoint)
                await unmount(cfg.mountpoint)

        await self.fleet.stop_all(lazy=False, detached=unmount_root)
        log.info("every worker ended")
        await unmounted.wait()
        nursery.cancel_scope.cancel()

    async def _start_one(self, vm: str) -> None:
        try:
            await self.fleet.start(vm)
        except Exception as e:
            log.error("VM %s: cannot start its worker: %s", vm, e)

    async def _watch_signals(self, signals: AsyncIterator[int], stop: trio.Event) -> None:
        async for signum in signals:
            log.info("%s received: stopping every worker, then unmounting %s",
                     signal.Signals(signum).name, self.cfg.mountpoint)
            stop.set()

    async def _watch_unmount(self, unmounted: trio.Event, stop: trio.Event) -> None:
        await unmounted.wait()
        if not stop.is_set():
            log.warning("%s was unmounted from outside: stopping every worker", self.cfg.mountpoint)
            stop.set()


def run(cfg: MountConfig, *, ready: Ready, foreground: bool) -> int:
    """The whole life of a ``--workers`` mount; returns the process exit status."""
    zygote = Zygote.fork(worker_main)  # first: nothing but the imported code is copied into it
    setup_logging(cfg, to_stderr=foreground)
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1)
    lock = StoreLock(cfg.lock_file)

    def serve_store() -> str | None:
        # (not the ancestors: the mountctl mount waiting for readiness has the same options)
        wait_for_leftovers(cfg.store, {*_ancestors(), zygote.pid}, LEFTOVER_WAIT)
        log.info("supervisor of %s starting (pid %d, zygote %d)", cfg.store, os.getpid(), zygote.pid)
        supervisor = Supervisor(cfg, zygote, lock, cfg.argv())
        trio.run(supervisor.serve, ready)
        return supervisor.unclean()  # a VM its worker could not close: as one process's umount says

    try:
        return run_locked(cfg, lock, ready, "the supervisor", serve_store, process_model="workers")
    finally:
        zygote.close()
