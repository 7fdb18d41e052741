"""The mount daemon: one process per store, serving it on one mountpoint until unmounted.

``mountctl mount`` starts it (through :mod:`colofs.mountd`) in the background and
waits on ``--ready-fd`` for one JSON line: ``{"ready": true, ...}`` once the
mount answers requests, or ``{"error": "..."}``. With ``--foreground`` the same
code runs in the ``mountctl`` process.

With ``--peer`` or ``--listen`` the replication engine starts first (a
primary's write sinks are attached before the mount serves a write; a
secondary's port is bound), then the mount. A key file others can read, a
keyless non-loopback address and a port in use stop the startup with the
reason, which ``mountctl mount`` prints. ``--nbd-socket``/``--nbd-listen``
bind the NBD server (:mod:`colofs.nbd`) at the same point; at shutdown its
connections are closed right after the unmount, before replication stops.

Shutdown is an unmount while the daemon still serves: the kernel writes the
dirty pages of buffered writes back through the mount as the files are
released, then ends the connection; then replication stops (a primary first
gives its queued writes a moment to be acknowledged, then saves its dirty
maps), and only then is the store closed (synced and marked clean). ``SIGTERM``/``SIGINT``/``SIGHUP`` start that unmount from
inside; if the mount is busy (a VM still has a disk open) the unmount is made
lazy, so the daemon exits, store closed, once the last user is gone. A plain
``umount`` from outside ends the session the same way. Under systemd
(``NOTIFY_SOCKET``) the daemon sends ``READY=1`` once the mount answers and
``STOPPING=1`` once it is unmounted (:mod:`colofs.notify`).

With ``--workers`` the daemon is a supervisor instead (:mod:`colofs.workers`):
each VM is served by its own process, which reuses the pieces here (logging,
the mount, replication's start, the shutdown order) for its one VM.
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import json
import logging
import logging.handlers
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pyfuse3
import trio

from colofs.core.errors import ColofsError
from colofs.core.store import Store
from colofs.events import EventBus, socket_path
from colofs.fs.config import ConfigError, MountConfig, add_mount_arguments, config_from_args
from colofs.fs.control import MountInfo
from colofs.fs.fusedevice import queued_requests_probe
from colofs.fs.linkevents import current_state, watch_links, watch_verifies
from colofs.fs.lock import AlreadyMounted, StoreLock
from colofs.fs.metrics import FigureSource, VMCounts, serve_metrics
from colofs.fs.mountpoint import MountpointError, check_mountpoint, detach_stale, fuse_unmount
from colofs.fs.operations import Operations
from colofs.fs.replication import Replication
from colofs.nbd.fusecache import FuseCacheLink
from colofs.nbd.service import NbdService, NbdStartError
from colofs.notify import notify
from colofs.repl import ReplConfigError
from colofs.wire import KeyFileError, NonceRegistry, load_key

log = logging.getLogger(__name__)

Ready = Callable[[dict[str, Any]], None]
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class StartupError(Exception):
    """The mount could not be started; the message is for the user."""


def setup_logging(cfg: MountConfig, *, to_stderr: bool, vm: str | None = None) -> None:
    """Log to the mount's log file (and stderr); ``vm`` tags every line of a VM's worker process."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    os.makedirs(os.path.dirname(cfg.log_file), mode=0o700, exist_ok=True)
    fmt = LOG_FORMAT if vm is None else LOG_FORMAT.replace("%(name)s", f"[{vm}] %(name)s")
    handler: logging.Handler = logging.handlers.WatchedFileHandler(cfg.log_file)
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    if to_stderr:
        err = logging.StreamHandler(sys.stderr)
        err.setFormatter(logging.Formatter(fmt))
        root.addHandler(err)
    root.setLevel(logging.DEBUG if cfg.debug else logging.INFO)
    logging.getLogger("pyfuse3").setLevel(logging.DEBUG if cfg.debug else logging.WARNING)


def recovery_notes(store: Store) -> list[str]:
    """One line per VM that opening the store had to repair."""
    notes = []
    for name, vm in sorted(store.vms.items()):
        rec = vm.recovery
        if rec.action == "rolled-back":
            notes.append(
                f"VM {name}: recovered after a crash: {rec.blocks} blocks rolled back, "
                f"resuming after checkpoint seq {rec.resume_seq}"
            )
        elif rec.action == "failover-completed":
            notes.append(f"VM {name}: completed an interrupted failover ({rec.blocks} blocks committed)")
    return notes


async def run_fuse(done: trio.Event, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the FUSE session until it ends (the mount is gone); then set ``done``."""
    task_status.started()
    try:
        await pyfuse3.main()
    finally:
        done.set()  # the mount is gone


async def watch_signals(signals: AsyncIterator[int], mountpoint: str) -> None:
    """Unmount on each SIGTERM/SIGINT/SIGHUP; the end of the session then stops the process."""
    async for signum in signals:
        name = signal.Signals(signum).name
        log.info("%s received: unmounting %s (the kernel writes back its dirty pages first)", name, mountpoint)
        await unmount(mountpoint)


async def unmount(mountpoint: str, *, lazy: bool = False) -> bool:
    """Unmount from inside; a busy mount (a disk still open) is detached lazily instead. False if both failed.

    After a lazy unmount the session ends, and the process stops, once the last open file is closed.
    """
    if not lazy:
        ok, msg = await trio.to_thread.run_sync(fuse_unmount, mountpoint)
        if ok:
            return True
        log.warning("unmount of %s failed (%s); detaching it lazily: the daemon exits when the last "
                    "open file is closed", mountpoint, msg)
    ok, msg = await trio.to_thread.run_sync(functools.partial(fuse_unmount, mountpoint, lazy=True))
    if not ok:
        log.error("lazy unmount of %s failed%s: %s", mountpoint, "" if lazy else " too", msg)
    return ok


def key_of(cfg: MountConfig) -> bytes | None:
    """The shared key, read once at startup; a file others can read is refused."""
    if cfg.key_file is None:
        return None
    try:
        return load_key(cfg.key_file)
    except KeyFileError as e:
        raise StartupError(f"--key-file: {e}") from None


async def start_replication(nursery: trio.Nursery, repl: Replication, cfg: MountConfig) -> None:
    """Start the engine in ``nursery``: a primary's sinks are attached, a secondary's port is bound."""
    try:
        await nursery.start(repl.run)
    except ReplConfigError as e:
        raise StartupError(f"replication: {e}") from None
    except OSError as e:
        raise StartupError(f"replication: cannot listen on {cfg.listen}: {e.strerror or e}") from None
    if cfg.peer is not None:
        log.info("replication: primary, sending to %s (%s)", cfg.peer,
                 "authenticated" if repl.key is not None else "no key: loopback only")


async def _start_nbd(nursery: trio.Nursery, ops: Operations, cfg: MountConfig) -> NbdService | None:
    """Bind the NBD socket and port, if configured, before the mount serves (a failure stops the startup)."""
    if cfg.nbd_socket is None and cfg.nbd_listen is None:
        return None
    tcp = (cfg.nbd_listen.host, cfg.nbd_listen.port) if cfg.nbd_listen is not None else None
    try:
        tls = cfg.tls() if tcp is not None else None
        # The mount's file-handle counter moves with every open: the link's "was anything opened since".
        link = FuseCacheLink(ops.inodes, ops.cache, lambda: ops._next_fh)
        return await NbdService.start(nursery, ops.store, link,
                                      socket_path=cfg.nbd_socket, tcp=tcp,
                                      tls=tls.server if tls is not None else None)
    except (NbdStartError, ReplConfigError) as e:
        raise StartupError(f"nbd: {e}") from None


async def _start_observers(nursery: trio.Nursery, ops: Operations, bus: EventBus, cfg: MountConfig) -> None:
    """The event socket (a failure is logged: the mount serves without it) and ``--metrics`` (a failure stops the startup)."""
    counts = VMCounts(bus)  # counts from the first event on
    bus.greeting = functools.partial(current_state, ops)
    path = socket_path(cfg.store)
    try:
        await nursery.start(bus.serve, path)
    except OSError as e:
        log.warning("events: cannot listen on %s: %s; mountctl events will not work", path, e.strerror or e)
    start_watchers(nursery, ops, bus)
    if cfg.metrics is not None:
        try:
            await nursery.start(serve_metrics, FigureSource(ops, counts), cfg.metrics.host, cfg.metrics.port)
        except OSError as e:
            raise StartupError(f"--metrics: cannot listen on {cfg.metrics}: {e.strerror or e}") from None


def start_watchers(nursery: trio.Nursery, ops: Operations, bus: EventBus) -> None:
    """Report the primary's link changes and the verifies' progress as events on ``bus``."""
    if ops.repl.primary is not None:
        nursery.start_soon(watch_links, ops.repl.primary, bus)
    if ops.repl.verifies is not None:
        nursery.start_soon(watch_verifies, ops.repl.verifies, bus)


def wire_hooks(ops: Operations, repl: Replication) -> None:
    """Checkpoints the primary sends go through the mount exactly like local ones; new disks show up."""
    repl.hooks.take_checkpoint = ops.control.vms.checkpoint_through_mount
    repl.hooks.on_disk_added = ops.control.vms.disk_added


def mount_options(cfg: MountConfig, source: str | None = None) -> set[str]:
    """The FUSE options of a mount whose source (fsname) is ``source``, by default the store."""
    # The store as the mount's source (as fstab names it), so `mount -a` sees it is already mounted.
    source = cfg.store if source is None else source
    plain = not any(c in source for c in ", \t\n\\")
    options = {f"fsname={source if plain else 'colofs'}", "subtype=colofs", "default_permissions"}
    if cfg.allow_other:
        options.add("allow_other")
    return options


def mount(ops: Operations, cfg: MountConfig, mountpoint: str | None = None, source: str | None = None) -> None:
    """Mount ``ops`` at ``mountpoint`` (by default the configured one); raises :class:`StartupError`."""
    mountpoint = cfg.mountpoint if mountpoint is None else mountpoint
    try:
        pyfuse3.init(ops, mountpoint, mount_options(cfg, source))
    except RuntimeError as e:
        raise StartupError(f"cannot mount on {mountpoint}: {e} (see {cfg.log_file})") from e


async def serve(cfg: MountConfig, lock: StoreLock, ready: Ready) -> None:
    """Open the store, replicate, mount it, serve until unmounted; stop replicating, close the store.

    Start: the replication engine runs before the mount exists (no write is
    served untracked). Stop: the unmount comes first (the kernel writes its
    dirty pages back through the mount), then replication stops (a primary
    saves its dirty maps), then the FUSE session is closed and the store.
    """
    key = key_of(cfg)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        log.info("opening store %s (default role %s)", cfg.store, cfg.role)
        try:
            store = await Store.open(cfg.store, role=cfg.role, create=True)
        except ColofsError as e:
            raise StartupError(f"cannot open store {cfg.store}: {e}") from e
        try:
            notes = recovery_notes(store)
            for note in notes:
                log.warning("%s", note)
            bus = EventBus()  # handed to every part that reports a change
            # This node's outstanding handshake challenges, shared by all its connections.
            repl = Replication(cfg, store, key, events=bus, nonces=NonceRegistry())
            ops = Operations(store, MountInfo(cfg, os.getpid(), time.time()), repl)
            wire_hooks(ops, repl)
            failure: StartupError | None = None
            mounted = False
            nbd: NbdService | None = None
            try:
                async with trio.open_nursery() as nursery:
                    try:
                        await start_replication(nursery, repl, cfg)
                        nbd = await _start_nbd(nursery, ops, cfg)
                        await _start_observers(nursery, ops, bus, cfg)
                        mount(ops, cfg)
                        mounted = True
                        store.io.pending = queued_requests_probe()
                    except StartupError as e:
                        failure = e
                        nursery.cancel_scope.cancel()
                    else:
                        await _serve_mount(nursery, ops, repl, cfg, lock, signals, ready, notes, nbd)
            finally:
                if mounted:
                    pyfuse3.close(unmount=True)  # a no-op after a clean unmount
            if failure is not None:
                raise failure
            log.info("%s unmounted, replication stopped; closing the store", cfg.mountpoint)
        finally:
            lock.update(state="closing")
            with trio.CancelScope(shield=True):
                await store.close()


async def _serve_mount(nursery: trio.Nursery, ops: Operations, repl: Replication, cfg: MountConfig,
                       lock: StoreLock, signals: AsyncIterator[int], ready: Ready, notes: list[str],
                       nbd: NbdService | None = None) -> None:
    """Serve until the mount is gone, then stop everything else in ``nursery`` (NBD before replication)."""
    unmounted = trio.Event()
    await nursery.start(run_fuse, unmounted)
    ops.nursery = nursery
    nursery.start_soon(watch_signals, signals, cfg.mountpoint)
    lock.update(state="serving")
    log.info("serving %s on %s: %d VMs; replication: %s", cfg.store, cfg.mountpoint,
             len(ops.store.vms), repl.root_status()["state"])
    ready({"ready": True, "pid": os.getpid(), "mountpoint": cfg.mountpoint,
           "store": cfg.store, "log_file": cfg.log_file, "notes": notes,
           "vms": sorted(ops.store.vms), "nbd": nbd.addresses if nbd is not None else []})
    notify(READY=1, MAINPID=os.getpid(), STATUS=f"serving {cfg.store} on {cfg.mountpoint}")
    await unmounted.wait()
    notify(STOPPING=1, STATUS=f"{cfg.mountpoint} unmounted: stopping replication, closing the store")
    lock.update(state="stopping replication")
    await after_unmount(ops, repl, cfg.mountpoint, nbd)
    nursery.cancel_scope.cancel()


async def after_unmount(ops: Operations, repl: Replication, mountpoint: str, nbd: NbdService | None = None) -> None:
    """The mount is gone: stop talking to the kernel, close NBD, let replication drain (then cancel the rest)."""
    ops.cache.close()  # no kernel session to talk to any more
    if nbd is not None:
        log.info("%s unmounted: closing the NBD connections", mountpoint)
        await nbd.stop()
    if repl.primary is not None or repl.server is not None:
        log.info("%s unmounted: stopping replication", mountpoint)
    await repl.drain()


def run(cfg: MountConfig, *, ready: Ready, foreground: bool) -> int:
    """The whole life of a mount; returns the process exit status."""
    if cfg.workers:  # served by colofs.mountd, which sits above this module and the supervisor
        ready({"error": "--workers: start the mount with python -m colofs.mountd (mountctl mount does)"})
        return 2
    setup_logging(cfg, to_stderr=foreground)
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1)  # dumps every thread's stack into the log
    lock = StoreLock(cfg.lock_file)
    def serve_store() -> None:
        trio.run(serve, cfg, lock, ready)

    return run_locked(cfg, lock, ready, "the mount daemon", serve_store)


def run_locked(cfg: MountConfig, lock: StoreLock, ready: Ready, what: str,
               serve_store: Callable[[], str | None], **lock_info: Any) -> int:
    """Check the mountpoint, take the store's lock, run ``serve_store``; say how it ended.

    The single-process daemon and the supervisor share it: a failure to start
    goes to ``ready`` (``mountctl mount`` prints it) and into the lock file
    (``mountctl`` reads it after the process is gone), as does a crash;
    ``lock_info`` is recorded in the lock file beside the usual fields.
    ``serve_store`` returns None once everything was closed cleanly, or why not.
    """
    status = 1
    try:
        try:
            if detach_stale(cfg.mountpoint):
                log.warning("%s: detached a stale mount left by a dead daemon", cfg.mountpoint)
            check_mountpoint(cfg.mountpoint)
            os.makedirs(cfg.store, mode=0o700, exist_ok=True)
            lock.acquire(pid=os.getpid(), mountpoint=cfg.mountpoint, store=cfg.store,
                         log_file=cfg.log_file, state="starting", started=time.time(), **lock_info)
        except (MountpointError, AlreadyMounted, OSError) as e:
            raise StartupError(str(e)) from e
        unclean = serve_store()
        if unclean is None:
            log.info("store %s closed cleanly", cfg.store)  # both process models say it the same way
            lock.update(state="closed", clean=True, ended=time.time())
            status = 0
        else:
            log.error("%s", unclean)
            lock.update(state="failed", error=unclean, ended=time.time())
    except StartupError as e:
        log.error("%s", e)
        ready({"error": str(e)})
        if lock.fd >= 0:
            lock.update(state="failed", error=str(e), ended=time.time())
    except BaseException as e:
        log.exception("%s failed", what)
        failure = f"{type(e).__name__}: {e}"
        ready({"error": f"{what} failed: {failure} (see {cfg.log_file})"})
        if lock.fd >= 0:
            lock.update(state="failed", error=failure, ended=time.time())
    finally:
        lock.release()
    return status


def ready_writer(fd: int | None) -> Ready:
    """Report readiness (or failure) once on ``fd``, then close it."""
    state = {"fd": fd}

    def ready(msg: dict[str, Any]) -> None:
        f = state["fd"]
        if f is None:
            return
        state["fd"] = None
        try:
            os.write(f, (json.dumps(msg) + "\n").encode())
        except OSError:
            pass
        finally:
            os.close(f)

    return ready


def parser() -> argparse.ArgumentParser:
    """The daemon's command line (a worker process re-parses its supervisor's with it)."""
    p = argparse.ArgumentParser(prog="colofs-mount", description="Serve a colofs store over FUSE.")
    add_mount_arguments(p)
    p.add_argument("--ready-fd", type=int, help="file descriptor to report readiness on")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        p.error(str(e))
    return run(cfg, ready=ready_writer(args.ready_fd), foreground=args.ready_fd is None)


if __name__ == "__main__":
    sys.exit(main())
