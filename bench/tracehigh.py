"""Where a daemon's Python memory was at its highest: a ``tracemalloc`` snapshot per new high, per process.

Put this file's directory's ``tracehigh/`` (made by :func:`install`) first on
``PYTHONPATH`` of a daemon started afterwards: its ``sitecustomize`` starts
``tracemalloc`` in every process forked with ``os.fork`` (the VM workers,
from the zygote) and a thread that, every 50 ms, takes a snapshot whenever the traced
memory passed its last high by a MiB, and writes its top allocation sites to
``OUT/PID.txt``. It slows allocation; take memory peaks with it, not rates.
Only what Python allocates is traced (not libfuse's buffers, nor the heap's
fragments).
"""

from __future__ import annotations

import os
from pathlib import Path

SITE = '''\
import os, sys, threading, time, tracemalloc

OUT = {out!r}


def _watch():
    best = 0
    path = os.path.join(OUT, f"{{os.getpid()}}.txt")
    while True:
        time.sleep(0.05)
        now = tracemalloc.get_traced_memory()[0]
        if now > best + (1 << 20):
            best = now
            top = tracemalloc.take_snapshot().statistics("lineno")[:12]
            with open(path, "w") as f:
                f.write(f"{{' '.join(sys.argv[1:3])}}: {{now / 2**20:.1f}} MiB traced\\n")
                for s in top:
                    f.write(f"  {{s.size / 2**20:7.2f}} MiB {{s.count:7d}}  {{s.traceback}}\\n")


def _start():
    if not tracemalloc.is_tracing():
        tracemalloc.start(1)
    threading.Thread(target=_watch, daemon=True).start()


os.register_at_fork(after_in_child=_start)  # only os.fork runs it: the zygote's workers, not subprocesses
'''


def install(work: Path) -> Path:
    """Write the ``sitecustomize`` under ``work`` and put it first on ``PYTHONPATH``; returns where reports go."""
    site = work / "tracehigh"
    out = work / "tracehigh-out"
    site.mkdir()
    out.mkdir()
    (site / "sitecustomize.py").write_text(SITE.format(out=str(out)))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return out


def report(out: Path, pid: int) -> str:
    """The last high's report of process ``pid``, or a note that there is none."""
    try:
        return (out / f"{pid}.txt").read_text().rstrip()
    except OSError:
        return f"(no tracemalloc report from pid {pid})"
