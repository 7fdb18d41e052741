"""colofs mounts for the comparison: a secondary, and for ingest a primary feeding it over loopback.

Mounting and unmounting go through ``mountctl`` exactly as an operator runs
it. Status and the timed control calls (checkpoint, failover) read and set
the same ``user.colofs.*`` attributes ``mountctl status --json`` and
``mountctl checkpoint``/``failover`` use, in-process: polling status every few
milliseconds, or timing a checkpoint, through a fresh Python interpreter
would measure the interpreter's start-up instead of colofs.
"""

from __future__ import annotations

import json
import mmap
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

from bench.compare.proc import (
    Hung,
    StepError,
    abort_fuse,
    alive,
    call_with_timeout,
    detach,
    mounts_under,
    proc_status_kib,
    run,
    wait_gone,
)

MOUNTCTL = [sys.executable, "-m", "mountctl.cli"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STATUS = "user.colofs.status"
T = TypeVar("T")


def available() -> str | None:
    """Why colofs cannot be mounted here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (Debian: fuse3)"
    try:
        import pyfuse3  # noqa: F401
    except ImportError as e:
        return f"pyfuse3 is not importable ({e}); run from the project's venv"
    return None


def mountctl(*args: str, timeout: float = 300) -> str:
    return run([*MOUNTCTL, *args], timeout=timeout, cwd=REPO).stdout.strip()


class ColofsMount:
    """One colofs daemon: a store directory served on a mountpoint."""

    def __init__(self, workdir: str, name: str, role: str, *, listen: str | None = None,
                 peer: str | None = None, key_file: str | None = None) -> None:
        self.store = os.path.join(workdir, f"{name}-store")
        self.mnt = os.path.join(workdir, f"{name}-mnt")
        self.role = role
        self.listen = listen
        self.peer = peer
        self.key_file = key_file
        self.pid: int | None = None
        self.peak_kib = 0
        self.hung: str | None = None  # set when a call into the mount never returned

    def mount(self) -> None:
        os.makedirs(self.mnt, exist_ok=True)
        args = ["mount", "--role", self.role, "--store", self.store]
        if self.listen:
            args += ["--listen", self.listen]
        if self.peer:
            args += ["--peer", self.peer]
        if self.key_file:
            args += ["--key-file", self.key_file]
        try:
            mountctl(*args, "--timeout", "120", self.mnt, timeout=150)
        except StepError:
            self.pid = self._lock_pid()  # a daemon that started but never got ready is still ours to stop
            raise
        self.pid = int(self.status()["pid"])

    def _lock_pid(self) -> int | None:
        """The daemon's PID from the store's lock file (written before it mounts)."""
        try:
            with open(os.path.join(self.store, ".colofs-mount.lock")) as f:
                pid = json.load(f).get("pid")
        except (OSError, ValueError, AttributeError):
            return None
        return pid if isinstance(pid, int) and alive(pid) else None

    def status(self, path: str = "") -> dict[str, Any]:
        """What ``mountctl status --json`` prints for the root (or ``path`` under the mount)."""
        target = os.path.join(self.mnt, path) if path else self.mnt
        try:
            return json.loads(self._call(lambda: os.getxattr(target, STATUS), 60, f"colofs status of {target}"))
        except (OSError, ValueError) as e:
            raise StepError(f"colofs status of {target}: {e}") from None

    def _call(self, fn: Callable[[], T], timeout: float, what: str) -> T:
        """A call into the mount that may not hang the harness: a stuck daemon marks the mount hung."""
        if self.hung:
            raise StepError(f"the colofs mount is hung since: {self.hung}")
        try:
            return call_with_timeout(fn, timeout, what)
        except Hung as e:
            self.hung = str(e)
            raise StepError(f"{e}: the colofs daemon (pid {self.pid}) is stuck; see {self.store}/.colofs-mount.log") \
                from None

    def vm_status(self, vm: str) -> dict[str, Any] | None:
        """A VM's status, or None while the VM does not exist on this mount."""
        return self.status().get("vms", {}).get(vm)

    def file(self, vm: str, disk: str = "disk") -> str:
        return os.path.join(self.mnt, vm, disk + ".raw")

    def create(self, vm: str, size: int, disk: str = "disk") -> str:
        mountctl("create", self.mnt, f"{vm}/{disk}", "--size", str(size), timeout=120)
        return self.file(vm, disk)

    def import_(self, vm: str, source: str, disk: str = "disk") -> str:
        mountctl("import", self.mnt, f"{vm}/{disk}", "--from", source, timeout=900)
        return self.file(vm, disk)

    def control(self, vm: str, name: str) -> tuple[float, dict[str, Any]]:
        """Set ``user.colofs.NAME`` on the VM directory (what mountctl does); (seconds, the daemon's outcome)."""
        from mountctl.client import CtlError, command

        path = os.path.join(self.mnt, vm)

        def timed() -> tuple[float, dict[str, Any]]:
            t0 = time.monotonic()
            res = command(path, name, b"")
            return time.monotonic() - t0, res

        try:
            return self._call(timed, 600 if name == "failover" else 120, f"colofs {name} of {vm}")
        except CtlError as e:
            raise StepError(f"colofs {name} of {vm}: {e}") from None

    def buffered(self, vm: str) -> tuple[int, int]:
        """(hidden, active) bytes over the VM's disks."""
        st = self.vm_status(vm) or {}
        disks = st.get("disks", {}).values()
        return sum(int(d.get("hidden_bytes", 0)) for d in disks), sum(int(d.get("active_bytes", 0)) for d in disks)

    def healthy(self) -> str | None:
        """Why this mount cannot serve (daemon gone), or None."""
        if self.pid is None:
            return "not mounted"
        if self.hung:
            return f"the colofs mount hung earlier in this run: {self.hung}"
        if not alive(self.pid):
            return f"the colofs daemon (pid {self.pid}) is gone; see {self.store}/.colofs-mount.log"
        return None

    def hwm_kib(self) -> int:
        if self.pid is not None:
            self.peak_kib = max(self.peak_kib, proc_status_kib(self.pid, "VmHWM") or 0)
        return self.peak_kib

    def rss_kib(self) -> int:
        return (proc_status_kib(self.pid, "VmRSS") or 0) if self.pid is not None else 0

    def umount(self) -> None:
        """``mountctl umount``; if that fails (or the mount hung), abort the connection, SIGKILL our daemon by PID."""
        pid, self.pid = self.pid, None
        if pid is None:
            return
        self.peak_kib = max(self.peak_kib, proc_status_kib(pid, "VmHWM") or 0)
        try:
            if self.hung:
                raise StepError(f"the mount hung ({self.hung})")
            mountctl("umount", self.mnt, "--timeout", "120", timeout=150)
        except StepError as e:
            print(f"colofs umount {self.mnt} failed ({e}); aborting its FUSE connection, killing pid {pid}",
                  file=sys.stderr)
            abort_fuse(self.mnt)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            wait_gone(pid, 10)
        for point in mounts_under(self.mnt):
            detach(point)


class ColofsPair:
    """The secondary (always) and the primary feeding it (only when ingest/buffer rows need one)."""

    def __init__(self, workdir: str, port: int) -> None:
        self.workdir = workdir
        self.port = port
        self.key_file = os.path.join(workdir, "colofs.key")
        with open(os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        self.secondary = ColofsMount(workdir, "secondary", "secondary", listen=f"127.0.0.1:{port}",
                                     key_file=self.key_file)
        self.primary: ColofsMount | None = None
        self.replication: str | None = None  # None: works; else why not

    def mount_primary(self) -> ColofsMount:
        self.primary = ColofsMount(self.workdir, "primary", "primary", peer=f"127.0.0.1:{self.port}",
                                   key_file=self.key_file)
        self.primary.mount()
        return self.primary

    def wait_replicated(self, vm: str, timeout: float) -> float:
        """Block until the secondary applied every write the primary has made to ``vm``; returns the time it ended."""
        assert self.primary is not None
        target = int((self.primary.vm_status(vm) or {}).get("last_applied", 0))
        deadline = time.monotonic() + timeout
        while True:
            st = self.secondary.vm_status(vm)
            if st is not None and int(st.get("last_applied", 0)) >= target:
                return time.monotonic()
            if time.monotonic() > deadline:
                have = None if st is None else st.get("last_applied")
                raise StepError(f"colofs secondary applied seq {have}, primary is at {target} after {timeout:.0f} s")
            time.sleep(0.005)

    def probe(self, vm: str, seed: str, timeout: float) -> str | None:
        """Create ``vm`` on the primary from ``seed`` and check the secondary's applied seq advances.

        Returns None when replication works, else the reason, quoting the
        secondary's status. The secondary gets the VM the way a new pair does
        (ATTACH creates it, then a digest-compared full sync).
        """
        assert self.primary is not None
        repl = self.secondary.status().get("replication", {})
        state = str(repl.get("state", "?"))
        if "inactive" in state or state == "not configured":
            timeout = min(timeout, 3.0)  # the status already says no; the probe confirms it
        self.primary.import_(vm, seed)
        before = int((self.secondary.vm_status(vm) or {}).get("last_applied", 0))
        buf = mmap.mmap(-1, 1 << 20)  # page aligned, as O_DIRECT wants
        buf.write(os.urandom(1 << 20))
        path = self.primary.file(vm)

        def write() -> None:
            fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
            try:
                os.pwrite(fd, buf, 0)
                os.fsync(fd)
            finally:
                os.close(fd)

        self.primary._call(write, 60, f"a 1 MiB O_DIRECT write to {path}")
        target = int((self.primary.vm_status(vm) or {}).get("last_applied", 0))
        deadline = time.monotonic() + timeout
        seen: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            seen = self.secondary.vm_status(vm)
            applied = int((seen or {}).get("last_applied", 0))
            if seen is not None and applied > before and applied >= target:
                return None
            time.sleep(0.1)
        note = repl.get("note")
        return (f"the secondary's applied seq did not advance within {timeout:.0f} s of a primary write "
                f"(primary at seq {target}; secondary status: replication {state!r}"
                f"{': ' + str(note) if note else ''}; VM {vm} "
                f"{'absent' if seen is None else 'at seq ' + str(seen.get('last_applied'))})")

    def checkpoint(self, vm: str) -> tuple[float, dict[str, Any]]:
        """A checkpoint of ``vm`` as the pair runs it; (seconds until the secondary's buffers are empty, detail).

        With a live primary the primary drives it (COLO checkpoints start
        there); if the primary refuses, the secondary checkpoints itself.
        """
        if self.primary is None or self.replication is not None:
            seconds, res = self.secondary.control(vm, "checkpoint")
            return seconds, {"driven_by": "secondary", "daemon_seconds": _daemon_seconds(res)}
        t0 = time.monotonic()
        try:
            _, res = self.primary.control(vm, "checkpoint")
            driven = "primary"
        except StepError as e:
            _, res = self.secondary.control(vm, "checkpoint")
            driven = f"secondary (primary refused: {e})"
        seq = int(res.get("seq") or 0)
        deadline = time.monotonic() + 30
        while True:
            st = self.secondary.vm_status(vm) or {}
            if self.secondary.buffered(vm) == (0, 0) and int(st.get("last_checkpoint", 0)) >= seq:
                break
            if time.monotonic() > deadline:
                raise StepError(f"the checkpoint at seq {seq} did not reach the colofs secondary within 30 s "
                                f"(it still buffers {self.secondary.buffered(vm)} hidden/active bytes)")
            time.sleep(0.002)
        return time.monotonic() - t0, {"driven_by": driven, "daemon_seconds": _daemon_seconds(res)}

    def umount_all(self) -> None:
        for m in (self.primary, self.secondary):
            if m is not None:
                m.umount()


def _daemon_seconds(res: dict[str, Any]) -> float | None:
    parts = [res.get(k) for k in ("writeback_seconds", "checkpoint_seconds", "invalidate_seconds")]
    if all(isinstance(p, int | float) for p in parts):
        return round(sum(float(p) for p in parts if p is not None), 6)
    return None
