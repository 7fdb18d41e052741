"""colofs mounts for the comparison: a secondary, and for ingest a primary feeding it over loopback.

The mounts are :mod:`mountctl.pair`'s (mountctl for mount and umount, the
``user.colofs.*`` attributes in-process for status and the timed control
calls). What the comparison adds: every call into a mount runs with a
timeout, so a stuck daemon fails its rows instead of hanging the run and is
then aborted at cleanup; failures are :class:`StepError`, which a row
reports; and the daemons' peak memory is sampled.
"""

from __future__ import annotations

import mmap
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

from bench.compare.proc import (
    Hung,
    abort_fuse,
    call_with_timeout,
    mounts_under,
    proc_status_kib,
    wait_gone,
)
from bench.host import StepError
from mountctl.pair import Node, Pair, PairError, alive, detach

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


class ColofsMount(Node):
    """One colofs daemon whose every call may time out; PairError becomes StepError."""

    def __init__(self, work: str | os.PathLike[str], name: str, role: str) -> None:
        super().__init__(work, name, role)
        self.peak_kib = 0
        self.hung: str | None = None  # set when a call into the mount never returned

    def mountctl(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        try:
            return super().mountctl(*args, timeout=timeout)
        except PairError as e:
            raise StepError(str(e)) from None

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
        except PairError as e:
            raise StepError(str(e)) from None

    def status(self, path: str = "") -> dict[str, Any]:
        return self._call(lambda: super(ColofsMount, self).status(path), 60, f"colofs status of {self.mnt / path}")

    def control(self, vm: str, name: str, value: bytes | str = b"") -> dict[str, Any]:
        return self.timed_control(vm, name, value)[1]

    def timed_control(self, vm: str, name: str, value: bytes | str = b"") -> tuple[float, dict[str, Any]]:
        """Set ``user.colofs.NAME`` on the VM directory; (seconds it took, the daemon's outcome)."""

        def timed() -> tuple[float, dict[str, Any]]:
            t0 = time.monotonic()
            res = Node.control(self, vm, name, value)
            return time.monotonic() - t0, res

        return self._call(timed, 600 if name == "failover" else 120, f"colofs {name} of {vm}")

    def healthy(self) -> str | None:
        """Why this mount cannot serve (daemon gone), or None."""
        if not self.pids:
            return "not mounted"
        if self.hung:
            return f"the colofs mount hung earlier in this run: {self.hung}"
        if self.pid is None:
            return f"the colofs daemon (pid {self.pids[-1]}) is gone; see {self.store}/.colofs-mount.log"
        return None

    def hwm_kib(self) -> int:
        if self.pid is not None:
            self.peak_kib = max(self.peak_kib, proc_status_kib(self.pid, "VmHWM") or 0)
        return self.peak_kib

    def rss_kib(self) -> int:
        return (proc_status_kib(self.pid, "VmRSS") or 0) if self.pid is not None else 0

    def cleanup(self) -> None:
        """``mountctl umount``; if that fails (or the mount hung), abort the connection, SIGKILL our daemon by PID."""
        pids, self.pids = [p for p in self.pids if alive(p)], []
        if not pids:
            return
        for pid in pids:
            self.peak_kib = max(self.peak_kib, proc_status_kib(pid, "VmHWM") or 0)
        try:
            if self.hung:
                raise StepError(f"the mount hung ({self.hung})")
            self.mountctl("umount", str(self.mnt), "--timeout", "120", timeout=150)
        except StepError as e:
            print(f"colofs umount {self.mnt} failed ({e}); aborting its FUSE connection, killing pid(s) {pids}",
                  file=sys.stderr)
            abort_fuse(str(self.mnt))
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                wait_gone(pid, 10)
        for point in mounts_under(str(self.mnt)):
            detach(point)


class ColofsPair(Pair):
    """The secondary (always) and the primary feeding it (mounted only when ingest/buffer rows need one)."""

    node_class = ColofsMount
    secondary: ColofsMount
    primary: ColofsMount

    def __init__(self, workdir: str, port: int) -> None:
        super().__init__(workdir, port=port)
        self.replication: str | None = None  # None: works; else why not

    @property
    def has_primary(self) -> bool:
        return bool(self.primary.pids)

    def wait(self, pred: Callable[[], T], timeout: float, what: str) -> T:
        try:
            return super().wait(pred, timeout, what)
        except PairError as e:
            raise StepError(f"colofs: {e}") from None

    def probe(self, vm: str, seed: str, timeout: float) -> str | None:
        """Create ``vm`` on the primary from ``seed`` and check the secondary's applied seq advances.

        Returns None when replication works, else the reason, quoting the
        secondary's status. The secondary gets the VM the way a new pair does
        (ATTACH creates it, then a digest-compared full sync).
        """
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
        seen: list[dict[str, Any] | None] = [None]

        def advanced() -> bool:
            seen[0] = self.secondary.vm_status(vm)
            applied = int((seen[0] or {}).get("last_applied", 0))
            return seen[0] is not None and applied > before and applied >= target

        try:
            self.wait(advanced, timeout, f"the secondary to apply seq {target}")
            return None
        except StepError:
            pass
        note = repl.get("note")
        return (f"the secondary's applied seq did not advance within {timeout:.0f} s of a primary write "
                f"(primary at seq {target}; secondary status: replication {state!r}"
                f"{': ' + str(note) if note else ''}; VM {vm} "
                f"{'absent' if seen[0] is None else 'at seq ' + str(seen[0].get('last_applied'))})")

    def checkpoint_timed(self, vm: str) -> tuple[float, dict[str, Any]]:
        """A checkpoint of ``vm`` as the pair runs it; (seconds until the secondary's buffers are empty, detail).

        With a live primary the primary drives it (COLO checkpoints start
        there); if the primary refuses, the secondary checkpoints itself.
        """
        if not self.has_primary or self.replication is not None:
            seconds, res = self.secondary.timed_control(vm, "checkpoint")
            return seconds, {"driven_by": "secondary", "daemon_seconds": _daemon_seconds(res)}
        t0 = time.monotonic()
        try:
            res = self.primary.control(vm, "checkpoint")
            driven = "primary"
        except StepError as e:
            res = self.secondary.control(vm, "checkpoint")
            driven = f"secondary (primary refused: {e})"
        seq = int(res.get("seq") or 0)

        def reached() -> bool:
            st = self.secondary.vm_status(vm) or {}
            return self.secondary.buffered(vm) == (0, 0) and int(st.get("last_checkpoint", 0)) >= seq

        self.wait(reached, 30, f"the checkpoint at seq {seq} to empty the secondary's buffers")
        return time.monotonic() - t0, {"driven_by": driven, "daemon_seconds": _daemon_seconds(res)}


def _daemon_seconds(res: dict[str, Any]) -> float | None:
    parts = [res.get(k) for k in ("writeback_seconds", "checkpoint_seconds", "invalidate_seconds")]
    if all(isinstance(p, int | float) for p in parts):
        return round(sum(float(p) for p in parts if p is not None), 6)
    return None
