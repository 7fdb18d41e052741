"""Peak memory of every daemon in the run: RSS (the kernel's ``VmHWM``) and PSS (sampled), per process.

The kernel keeps a high-water mark for RSS but none for PSS (the memory a
process holds with shared pages split among their sharers), so a thread
samples ``/proc/PID/smaps_rollup`` of each daemon, and of every process it
started, twice a second for the whole run. A daemon is named once and found
again by a callable, so one that restarts (QEMU's chain after a failover, a
quorum primary started per measurement) is followed.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.compare.proc import proc_status_kib, pss_kib

INTERVAL = 0.5  # seconds between samples: light on 2 cores, and no fio run is shorter than 1 s


@dataclass
class Peaks:
    """Per process (see :func:`label`): the highest RSS high-water mark and the highest PSS seen, in KiB."""

    rss: dict[str, int] = field(default_factory=dict)
    pss: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, rss: int | None, pss: int | None) -> None:
        if rss:
            self.rss[key] = max(self.rss.get(key, 0), rss)
        if pss:
            self.pss[key] = max(self.pss.get(key, 0), pss)

    def highest(self, kind: str) -> int:
        """The highest single process's peak (the per-process budget is what the rows compare)."""
        values = (self.rss if kind == "rss" else self.pss).values()
        return max(values, default=0)


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, from /proc/PID/task/TID/children."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
            except (OSError, ValueError):
                continue
    return out


def label(pid: int, root: int) -> str:
    """``daemon|child COMM[PID]``, with `` vm VM`` for a colofs VM worker: which process of a daemon's tree.

    Forked workers share the daemon's argv and comm; the VM a worker serves is
    the directory of the ``base.raw`` files it holds open.
    """
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        comm = "?"
    vm = vm_of(pid) if pid != root else None
    return f"{'daemon' if pid == root else 'child'} {comm}[{pid}]" + (f" vm {vm}" if vm else "")


def vm_of(pid: int) -> str | None:
    """The VM whose disks' ``base.raw`` ``pid`` holds open (``STORE/VM/DISK/base.raw``), if any."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.endswith("/base.raw"):
            parts = target.split("/")
            if len(parts) >= 4:
                return parts[-3]
    return None


class MemorySampler:
    """Samples the named daemons until :meth:`stop`; :meth:`peaks` is what it saw of one of them."""

    def __init__(self) -> None:
        self.targets: dict[str, Callable[[], int | None]] = {}
        self._peaks: dict[str, Peaks] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._labels: dict[int, str] = {}  # a worker's label once its VM is known (no fd scan per sample)

    def watch(self, name: str, pid: Callable[[], int | None]) -> None:
        """Follow the daemon ``pid()`` names (None while it is not running) and everything it starts."""
        with self._lock:
            self.targets[name] = pid
            self._peaks.setdefault(name, Peaks())

    def sample(self) -> None:
        """One round over every target (also called directly right before a daemon stops)."""
        with self._lock:
            targets = list(self.targets.items())
        for name, get in targets:
            pid = get()
            if pid is None:
                continue
            for p in descendants(pid):
                rss, pss = proc_status_kib(p, "VmHWM"), pss_kib(p)
                key = self._labels.get(p) or label(p, pid)
                if " vm " in key:
                    self._labels[p] = key
                with self._lock:
                    self._peaks[name].add(key, rss, pss)

    def peaks(self, name: str) -> Peaks:
        with self._lock:
            p = self._peaks.get(name, Peaks())
            return Peaks(dict(p.rss), dict(p.pss))

    def _loop(self) -> None:
        while not self._stop.wait(INTERVAL):
            self.sample()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="memory sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
