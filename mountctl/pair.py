"""A replicating colofs pair on one machine, driven the way an operator drives one.

A secondary mount listening on 127.0.0.1 and a primary mount whose ``--peer``
reaches it, sharing a generated key file (mode 0600). Mounting and unmounting
run ``mountctl`` as a command, exactly as an operator would. Status and the
control commands are the same ``user.colofs.*`` calls ``mountctl`` makes, done
in this process, so that polling status or timing a checkpoint does not
measure an interpreter's start-up. Cleanup stops only the daemons this
harness started (by the PIDs their stores recorded) and detaches their
mountpoints, whatever happened before.

The demo, the benchmarks and the end-to-end tests all start their pairs (or
single mounts) with this. It sits beside ``mountctl`` rather than under
``tests/`` or ``bench/`` because it is made only of mountctl's own commands
and client, and so is importable wherever colofs is installed: by a script in
``examples/``, by ``bench/``, by the tests. Subclasses add what one user needs
(the benchmarks: hang detection; the tests: a fault proxy and their waits)
by overriding :meth:`Node.mountctl`, :meth:`Pair.wait` or :attr:`Pair.node_class`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from colofs.fs.config import LOCK_NAME
from mountctl.client import PREFIX, CtlError, command
from mountctl.mounting import alive

MOUNTCTL = [sys.executable, "-m", "mountctl.cli"]
LOOPBACK = "127.0.0.1"
STATUS = PREFIX + "status"
T = TypeVar("T")
WORKERS_SWITCH = "COLOFS_TEST_WORKERS"
__all__ = ["Node", "Pair", "PairError", "alive", "detach", "free_port", "kill_tree", "poll", "single_process_forced", "with_workers",
           "write_key"]


class PairError(Exception):
    """A step of driving a mount failed; the message says which step and what the daemon or tool said."""


def single_process_forced() -> bool:
    """Whether ``COLOFS_TEST_WORKERS=0`` asks every mount the harness starts to serve with ``--single-process``.

    A mount serves each VM from a process of its own by default; this runs the
    same tests and benchmarks on the one-process model, which stays supported.
    """
    return os.environ.get(WORKERS_SWITCH, "") == "0"


def with_workers(options: tuple[str, ...] | list[str]) -> list[str]:
    """``options`` of ``mountctl mount``, with ``--single-process`` added when :func:`single_process_forced`.

    Not when the options choose a model themselves (``--workers`` or ``--single-process``).
    """
    out = list(options)
    if single_process_forced() and "--workers" not in out and "--single-process" not in out:
        out.append("--single-process")
    return out


def _children() -> dict[int, list[int]]:
    """Every running process's children, from /proc."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out.setdefault(ppid, []).append(int(entry))
    return out


def kill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid`` and every process below it, all at the same moment; the PIDs signalled.

    A ``--workers`` daemon is a supervisor, its zygote and a worker per VM: a
    crash of the host's daemon is all of them at once. Each is stopped first,
    so that none sees another die (a worker whose supervisor is gone would
    close its VM cleanly) before it is killed itself.
    """
    children = _children()
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for p in tree:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
    return tree


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on right now (mountctl needs a number: it cannot listen on port 0)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def write_key(path: str | os.PathLike[str], data: bytes | None = None) -> Path:
    """A key file readable by its owner only: 32 random bytes unless ``data`` is given."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data if data is not None else os.urandom(32))
    return Path(path)


def detach(path: str | os.PathLike[str]) -> None:
    """Lazily detach a FUSE mount whose daemon is gone, so that the files under it can be removed."""
    for argv in (["fusermount3", "-u", "-z", str(path)], ["umount", "-l", str(path)]):
        try:
            if subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode == 0:
                return
        except (OSError, subprocess.TimeoutExpired):
            continue


def poll(pred: Callable[[], T], timeout: float, what: str, interval: float = 0.005) -> T:
    """Call ``pred`` until it returns something truthy and return that; PairError naming ``what`` at the deadline.

    The daemons are other processes and status is an attribute read, so there
    is nothing to block on: a short interval keeps the time an outcome is
    seen close to the time it happened.
    """
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise PairError(f"timed out after {timeout:.0f} s waiting for {what}; last seen: {got!r}")
        time.sleep(interval)


class Node:
    """One mount daemon: a store and its mountpoint under a work directory, named ``NAME-store``/``NAME-mnt``."""

    def __init__(self, work: str | os.PathLike[str], name: str, role: str) -> None:
        self.work = Path(work)
        self.name = name
        self.store = self.work / f"{name}-store"
        self.mnt = self.work / f"{name}-mnt"
        self.role = role
        self.pids: list[int] = []  # every daemon this node started, newest last
        self.mounted = False  # mounted by this node and not unmounted since (a killed daemon leaves it stale)

    # -- life cycle ---------------------------------------------------------------------------

    def mountctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``mountctl ARGS``; what it printed (notes go to stderr), or PairError with its complaint."""
        argv = [*MOUNTCTL, *map(str, args)]
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                                 stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise PairError(f"mountctl {' '.join(argv[3:5])} did not finish within {timeout:.0f} s") from None
        if res.returncode != 0:
            raise PairError(f"mountctl {' '.join(argv[3:])} failed ({res.returncode}): "
                            f"{(res.stderr or res.stdout).strip()}")
        return res

    def mount(self, *options: str, role: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``mountctl mount`` with this node's role (or ``role``, this once) and store; remembers the daemon's PID."""
        try:
            self.mnt.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # a stale mount of a killed daemon (ENOTCONN): mountctl detaches it
        other = self.lock_pid()  # a daemon already serving this store is not ours, whatever happens next
        try:
            res = self.mountctl("mount", "--role", role or self.role, "--store", str(self.store),
                                *with_workers(options),
                                "--timeout", str(timeout), str(self.mnt), timeout=timeout + 30)
            self.mounted = True
            return res
        finally:
            pid = self.lock_pid()  # also a daemon that started but never got ready: still ours to stop
            if pid is not None and pid != other and pid not in self.pids:
                self.pids.append(pid)

    def lock_pid(self) -> int | None:
        """The PID in the store's lock file (the daemon writes it before it mounts), if that process runs."""
        try:
            pid = json.loads((self.store / LOCK_NAME).read_text()).get("pid")
        except (OSError, ValueError, AttributeError):
            return None
        return pid if isinstance(pid, int) and alive(pid) else None

    @property
    def pid(self) -> int | None:
        """The newest daemon this node started, while it runs."""
        return self.pids[-1] if self.pids and alive(self.pids[-1]) else None

    def umount(self, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``mountctl umount``: the daemon closes the store cleanly and exits."""
        res = self.mountctl("umount", "--timeout", str(timeout), str(self.mnt), timeout=timeout + 30)
        self.mounted = False
        return res

    def kill(self, timeout: float = 30) -> None:
        """SIGKILL the daemons this node started, as a crash would; the mount is left stale."""
        killed = [p for pid in self.pids for p in kill_tree(pid)]  # with --workers: its zygote and workers too
        poll(lambda: not any(alive(p) for p in killed), timeout, f"daemons {killed} to exit")
        self.pids = []

    def cleanup(self) -> None:
        """Unmount; if that fails, kill this node's own daemons and detach the mountpoint. Never raises."""
        if any(alive(p) for p in self.pids):
            try:
                self.umount(timeout=60)
            except Exception as e:  # whatever a subclass's mountctl raises, still clean up
                print(f"unmounting {self.mnt} failed ({e}); killing pid(s) {self.pids}", file=sys.stderr)
                try:
                    self.kill(timeout=10)
                except PairError as gone:
                    print(str(gone), file=sys.stderr)
        self.pids = [p for p in self.pids if alive(p)]
        if os.path.ismount(self.mnt) or self._stale():
            detach(self.mnt)
        self.mounted = False

    def _stale(self) -> bool:
        try:
            os.stat(self.mnt)
        except OSError:
            return True  # ENOTCONN: a mount whose daemon is gone
        return False

    def log(self) -> str:
        """The daemon's log file (kept in the store)."""
        try:
            return (self.store / ".colofs-mount.log").read_text(errors="replace")
        except OSError:
            return ""

    # -- looking and driving --------------------------------------------------------------------

    def path(self, *parts: str) -> Path:
        return self.mnt.joinpath(*parts)

    def file(self, vm: str, disk: str = "disk") -> Path:
        """The mounted file of a disk."""
        return self.mnt / vm / f"{disk}.raw"

    def status(self, path: str = "") -> dict[str, Any]:
        """What ``mountctl status --json`` prints for the root (or for ``path`` under the mount)."""
        return self.read_status(path)

    def read_status(self, path: str = "") -> dict[str, Any]:
        """:meth:`status` as read in this process, whatever a subclass makes ``status`` do; the waits use it."""
        target = self.mnt / path if path else self.mnt
        try:
            return json.loads(os.getxattr(target, STATUS))
        except (OSError, ValueError) as e:
            raise PairError(f"status of {target}: {e}") from None

    def vm_status(self, vm: str) -> dict[str, Any] | None:
        """The VM directory's status (the root's names the VMs only), or None while there is no such VM."""
        if not (self.mnt / vm).is_dir():
            return None
        try:
            return self.read_status(vm)
        except PairError:
            if not (self.mnt / vm).is_dir():
                return None
            raise

    def control(self, vm: str, name: str, value: bytes | str = b"") -> dict[str, Any]:
        """Set ``user.colofs.NAME`` on the VM directory, as mountctl does; the daemon's outcome."""
        try:
            return command(str(self.mnt / vm), name, value)
        except CtlError as e:
            raise PairError(f"{name} of {vm} on {self.mnt}: {e}") from None

    def create(self, vm: str, size: int, disk: str = "disk") -> Path:
        self.mountctl("create", str(self.mnt), f"{vm}/{disk}", "--size", str(size))
        return self.file(vm, disk)

    def import_(self, vm: str, source: str | os.PathLike[str], disk: str = "disk", timeout: float = 900) -> Path:
        self.mountctl("import", str(self.mnt), f"{vm}/{disk}", "--from", str(source), timeout=timeout)
        return self.file(vm, disk)

    def buffered(self, vm: str) -> tuple[int, int]:
        """(hidden, active) bytes over the VM's disks: what a checkpoint will discard."""
        disks = (self.vm_status(vm) or {}).get("disks", {}).values()
        return sum(int(d.get("hidden_bytes", 0)) for d in disks), sum(int(d.get("active_bytes", 0)) for d in disks)


class Pair:
    """A secondary listening on 127.0.0.1 and a primary replicating into it; a context manager that cleans up."""

    node_class: type[Node] = Node

    def __init__(self, work: str | os.PathLike[str], *, port: int | None = None) -> None:
        self.work = Path(work)
        self.key = write_key(self.work / "colofs.key")
        self.port = port or free_port()
        self.secondary = self.node_class(self.work, "secondary", "secondary")
        self.primary = self.node_class(self.work, "primary", "primary")

    def mount_secondary(self, *options: str, key: Path | None = None) -> None:
        self.secondary.mount("--listen", f"{LOOPBACK}:{self.port}", "--key-file", str(key or self.key), *options)

    def mount_primary(self, *options: str, key: Path | None = None, via: int | None = None) -> None:
        """The primary's ``--peer`` is the secondary, or ``via`` a port in between (a proxy)."""
        self.primary.mount("--peer", f"{LOOPBACK}:{via or self.port}", "--key-file", str(key or self.key), *options)

    def start(self) -> Pair:
        self.mount_secondary()
        self.mount_primary()
        return self

    def cleanup(self) -> None:
        """Primary first (it is the one that writes), then the secondary, each whatever the other did."""
        try:
            self.primary.cleanup()
        finally:
            self.secondary.cleanup()

    def __enter__(self) -> Pair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- waiting for the pair -----------------------------------------------------------------

    def wait(self, pred: Callable[[], T], timeout: float, what: str) -> T:
        """How every wait below waits; a subclass may wait its own way."""
        return poll(pred, timeout, what)

    def wait_disk(self, vm: str, disk: str = "disk", timeout: float = 60) -> Path:
        """The disk a primary created shows on the secondary's mount (ATTACH created it there)."""
        f = self.secondary.file(vm, disk)
        self.wait(f.exists, timeout, f"{vm}/{disk} on the secondary")
        return f

    def wait_acked(self, vm: str, timeout: float = 120) -> float:
        """Until the secondary acknowledged every write the primary applied to ``vm``; the time it was seen."""

        seen: dict[str, Any] = {}

        def acked() -> bool:
            seen.clear()
            seen.update(self.primary.vm_status(vm) or {})
            peer = seen.get("peer") or {}
            return peer.get("state") == "connected" and peer.get("acked_seq", -1) >= seen.get("last_applied", 0)

        try:
            self.wait(acked, timeout, f"the secondary to acknowledge every write of {vm}")
        except PairError as e:
            raise PairError(f"{e} (primary at seq {seen.get('last_applied')}, peer {seen.get('peer')})") from None
        return time.monotonic()

    def wait_applied(self, vm: str, timeout: float = 120) -> float:
        """Until the secondary applied the primary's last write to ``vm`` (as of now); the time it was seen."""
        target = int((self.primary.vm_status(vm) or {}).get("last_applied", 0))
        self.wait(lambda: int((self.secondary.vm_status(vm) or {}).get("last_applied", -1)) >= target, timeout,
                  f"the secondary to apply seq {target} of {vm}")
        return time.monotonic()

    def checkpoint(self, vm: str) -> dict[str, Any]:
        """A checkpoint driven by the primary, as COLO does; the daemon's outcome (seq, latency, ...)."""
        return self.primary.control(vm, "checkpoint")
