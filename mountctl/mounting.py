"""Starting a mount daemon in the background and stopping it again.

``mount`` starts ``python -m colofs.mountd`` detached (own session, output
into the mount's log file) and waits on a pipe for its single readiness line.
``umount`` unmounts (the kernel writes back its dirty pages while the daemon
still serves), then waits for the daemon to close the store and let go of
the store's lock, and reports how the daemon ended.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

from colofs.fs.config import MountConfig
from colofs.fs.lock import holder, last_state
from colofs.fs.mountpoint import MountpointError, check_mountpoint, detach_stale, fuse_unmount
from mountctl.client import CtlError, resolve


def preflight(cfg: MountConfig) -> None:
    """The checks that need no daemon: stale mounts, the mountpoint, a store already served."""
    try:
        if detach_stale(cfg.mountpoint):
            print(
                f"mountctl: {cfg.mountpoint}: detached a stale mount left by a dead daemon "
                "(fusermount3 -u -z); its store is recovered on mount",
                file=sys.stderr,
            )
        check_mountpoint(cfg.mountpoint)
    except MountpointError as e:
        raise CtlError(str(e)) from None
    other = holder(cfg.lock_file)
    if other is not None:
        where = f" on {other['mountpoint']}" if other.get("mountpoint") else ""
        pid = f" by pid {other['pid']}" if other.get("pid") else ""
        raise CtlError(f"store {cfg.store} is already mounted{where}{pid}")


def daemon_args(cfg: MountConfig) -> list[str]:
    """The daemon's command line for ``cfg`` (the same one every worker of a supervisor re-parses)."""
    return cfg.argv()


def _tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip()
    except OSError:
        return ""


def start_daemon(cfg: MountConfig, timeout: float) -> dict[str, Any]:
    """Start the daemon in the background; returns its readiness message."""
    os.makedirs(os.path.dirname(cfg.log_file), mode=0o700, exist_ok=True)
    r, w = os.pipe()
    try:
        with open(cfg.log_file, "ab") as logf:
            proc = subprocess.Popen(
                [sys.executable, "-m", "colofs.mountd", *daemon_args(cfg), "--ready-fd", str(w)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, pass_fds=(w,),
                start_new_session=True, cwd="/",
            )
    finally:
        os.close(w)
    try:
        data = b""
        deadline = time.monotonic() + timeout
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise CtlError(
                    f"the mount daemon (pid {proc.pid}) did not get ready within {timeout:.0f} s; "
                    f"it keeps trying in the background, see {cfg.log_file}"
                )
            ready, _, _ = select.select([r], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                data += chunk
    finally:
        os.close(r)
    msg: dict[str, Any] = {}
    if data.strip():
        try:
            msg = json.loads(data)
        except ValueError:
            msg = {"error": data.decode(errors="replace").strip()}
    if msg.get("ready"):
        return msg
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    if msg.get("error"):
        raise CtlError(msg["error"])
    detail = _tail(cfg.log_file)
    raise CtlError(
        f"the mount daemon exited with status {proc.returncode} before it was ready; see {cfg.log_file}"
        + (f"\n{detail}" if detail else "")
    )


def unmount(mountpoint: str, *, lazy: bool, timeout: float) -> str:
    """Unmount and wait for the daemon to close the store; returns what to print."""
    mountpoint = os.path.abspath(mountpoint)
    try:
        if detach_stale(mountpoint):
            return (
                f"{mountpoint}: the daemon was gone (stale mount); detached it. "
                "The store was not closed cleanly: the next mount recovers it"
            )
    except MountpointError as e:
        raise CtlError(str(e)) from None
    target = resolve(mountpoint)
    if target.kind != "root":
        raise CtlError(f"{mountpoint} is not the root of a colofs mount (it is a {target.kind} path)")
    lock_file = target.status["lock_file"]
    pid = target.status.get("pid")
    started = time.monotonic()
    if target.status.get("process_model") == "workers":
        return _stop_supervisor(mountpoint, target.status, lazy=lazy, timeout=timeout)
    ok, msg = fuse_unmount(mountpoint, lazy=lazy)
    if not ok:
        if "busy" in msg.lower():
            raise CtlError(
                f"{mountpoint} is busy: a disk is still open (is a VM running?). "
                "Stop its users first, or use --lazy to detach now and finish when they close"
            )
        raise CtlError(f"unmounting {mountpoint} failed: {msg}")
    if lazy:
        return f"{mountpoint}: detached; the daemon (pid {pid}) closes the store when the last open file is closed"
    state = _wait_closed(lock_file, pid, started + timeout,
                         f"{mountpoint} is unmounted but the daemon (pid {pid}) is still closing the store after "
                         f"{timeout:.0f} s; see {target.status.get('log_file')}")
    took = time.monotonic() - started
    if state.get("state") == "closed":
        return f"{mountpoint}: unmounted; store {target.status['store']} closed cleanly ({took:.2f} s)"
    raise CtlError(
        f"{mountpoint}: unmounted, but the daemon ended in state {state.get('state')!r}: "
        f"{state.get('error', 'no detail')}; see {target.status.get('log_file')}"
    )


def _wait_closed(lock_file: str, pid: object, deadline: float, late: str) -> dict[str, Any]:
    """Wait until the daemon let go of the store's lock and exited; its last recorded state.

    ``late`` is the error if that has not happened by ``deadline``.
    """
    while holder(lock_file) is not None:
        if time.monotonic() > deadline:
            raise CtlError(late)
        time.sleep(0.05)
    if isinstance(pid, int):
        _wait_exit(pid, deadline)
    return last_state(lock_file)


def _stop_supervisor(mountpoint: str, status: dict[str, Any], *, lazy: bool, timeout: float) -> str:
    """A ``--workers`` mount: VM mounts sit on the root, so the supervisor unmounts them all, in order.

    ``SIGTERM`` has it stop every worker (each unmounts its VM, lazily if a
    disk is still open, drains and closes it), wait for them, then unmount the
    root. With ``lazy`` this returns at once; otherwise it waits for the
    supervisor to let go of the store's lock and exit, and reports how it ended.
    """
    lock_file = status["lock_file"]
    pid = status.get("pid")
    if not isinstance(pid, int):
        pid = (holder(lock_file) or {}).get("pid")
    if not isinstance(pid, int):
        raise CtlError(f"{mountpoint}: cannot tell which process supervises it (no pid in its status or lock)")
    if not lazy:
        users = _users_of(mountpoint)
        if users:
            raise CtlError(
                f"{mountpoint} is busy: a disk is still open (is a VM running?) by pid "
                f"{', '.join(map(str, users[:5]))}. Stop its users first, or use --lazy to detach now "
                "and finish when they close"
            )
    started = time.monotonic()
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        raise CtlError(f"{mountpoint}: its supervisor (pid {pid}) is gone") from None
    if lazy:  # returns once detached, as one process's lazy umount does; the closing goes on behind
        deadline = started + timeout
        while os.path.ismount(mountpoint) and alive(pid):
            if time.monotonic() > deadline:
                raise CtlError(f"{mountpoint}: the supervisor (pid {pid}) has not detached it after {timeout:.0f} s; "
                               f"see {status.get('log_file')}")
            time.sleep(0.05)
        return (f"{mountpoint}: detached; the supervisor (pid {pid}) closes each VM when its last open file "
                "is closed")
    state = _wait_closed(lock_file, pid, started + timeout,
                         f"{mountpoint}: the supervisor (pid {pid}) is still stopping its workers after "
                         f"{timeout:.0f} s (a VM whose disk is open is closed when its last user is gone); "
                         f"see {status.get('log_file')}")
    took = time.monotonic() - started
    if state.get("state") == "closed":
        return f"{mountpoint}: unmounted; every VM and store {status['store']} closed cleanly ({took:.2f} s)"
    raise CtlError(
        f"{mountpoint}: unmounted, but the supervisor ended in state {state.get('state')!r}: "
        f"{state.get('error', 'no detail')}; see {status.get('log_file')}"
    )


def _users_of(mountpoint: str) -> list[int]:
    """Processes with a file open, or their working directory, under ``mountpoint`` (as far as /proc shows).

    A ``--workers`` mount is stopped by its supervisor, which detaches a busy VM
    mount lazily; a plain umount refuses a busy mount instead, so this looks first.
    """
    prefix = mountpoint.rstrip("/") + "/"
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        links = [f"/proc/{entry}/cwd"]
        try:
            links += [f"/proc/{entry}/fd/{fd}" for fd in os.listdir(f"/proc/{entry}/fd")]
        except OSError:
            continue
        for link in links:
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if target.startswith(prefix) or target == mountpoint:
                found.append(int(entry))
                break
    return sorted(found)


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return False


def _wait_exit(pid: int, deadline: float) -> None:
    """The daemon lets go of the store's lock just before it exits: wait for the exit itself."""
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
