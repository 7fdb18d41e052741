#!/usr/bin/env python3
"""The primary's disk over its NBD socket, two builds of colofs side by side in one run.

``make bench`` measures one build; comparing a change by two such runs
compares two machine loads as much as two builds. This starts a loopback
pair (a primary with ``--nbd-socket`` replicating into a secondary) from
each source tree given, and runs every fio job (the nbd engine, as QEMU
attaches) on each pair in turn, repetition by repetition, so both see the
same load. Per job and tree: the median rate and the serving process's CPU
seconds per GiB written (``/proc/PID/stat``, which survives load better
than the rate). Each measurement starts after a checkpoint and ends once
the secondary has applied everything.

    cd /tmp && sudo /work/main/.venv/bin/python /work/main/bench/nbd_primary.py \\
        --tree old=/tmp/colofs-old --tree new=/work/main [--reps 3] [--runtime 3] [--jobs sync-4k-qd16,...]

Run it from a directory holding no ``colofs`` package (``python -m`` puts the
working directory first on the path); each tree's daemons get it through
``PYTHONPATH``. Needs root (FUSE) and fio with its nbd engine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `bench` importable

from bench.compare.colofs_pair import ColofsPair
from bench.host import cpu_seconds, fio_job, require_root, sh
from mountctl.pair import free_port

VM = "pvm"
GiB = 1 << 30


@dataclass(frozen=True)
class Job:
    name: str
    mode: str  # the replication mode: sync or async
    rw: str
    bs: str
    depth: int
    via: str = "nbd"  # or "fuse": the same job on the primary's file, O_DIRECT libaio, for reference


JOBS = [
    Job("sync-4k-qd1", "sync", "randwrite", "4k", 1),
    Job("sync-4k-qd16", "sync", "randwrite", "4k", 16),
    Job("sync-1m-qd1", "sync", "write", "1m", 1),
    Job("sync-1m-qd16", "sync", "write", "1m", 16),
    Job("async-4k-qd16", "async", "randwrite", "4k", 16),
    Job("async-1m-qd1", "async", "write", "1m", 1),
    Job("async-1m-qd16", "async", "write", "1m", 16),
    Job("fuse-sync-4k-qd16", "sync", "randwrite", "4k", 16, "fuse"),
    Job("fuse-async-1m-qd16", "async", "write", "1m", 16, "fuse"),
]


class Side:
    """One tree's pair: its primary serves ``VM``'s disk on an NBD socket."""

    def __init__(self, label: str, tree: str, work: Path, seed: Path, size: int) -> None:
        self.label = label
        self.tree = tree
        self.sock = work / "p.nbd"
        self.size = size
        self.mode = "async"
        with self.env():
            self.pair = ColofsPair(work, free_port())
            try:
                self.pair.mount_secondary()
                self.pair.mount_primary("--nbd-socket", str(self.sock))
                why = self.pair.probe(VM, str(seed), timeout=300)
            except BaseException:
                self.pair.cleanup()
                raise
        if why:
            self.close()
            raise SystemExit(f"{label}: replication does not work: {why}")

    def env(self) -> _Env:
        return _Env(self.tree)

    def pid(self) -> int:
        p = self.pair.primary
        pid = ((p.vm_status(VM) or {}).get("worker") or {}).get("pid")
        return pid if isinstance(pid, int) else int(p.pid or 0)

    def run(self, job: Job, runtime: float) -> tuple[float, float]:
        """(MB/s, CPU seconds of the serving process per GiB written) of one fio run."""
        with self.env():
            if job.mode != self.mode:
                self.pair.primary.control(VM, "mode", job.mode.encode())
                self.mode = job.mode
            self.pair.checkpoint_timed(VM)
            pid = self.pid()
            cpu0 = cpu_seconds(pid)
            if job.via == "nbd":
                target = ["--ioengine=nbd", f"--uri=nbd+unix:///{VM}/disk?socket={self.sock}"]
            else:
                target = ["--ioengine=libaio", "--direct=1", f"--filename={self.pair.primary.file(VM)}",
                          "--allow_file_create=0", "--fallocate=none"]
            out = sh("fio", "--name=n", f"--rw={job.rw}", f"--bs={job.bs}", *target, f"--iodepth={job.depth}",
                     f"--size={self.size}", f"--runtime={runtime}", "--time_based", "--refill_buffers",
                     "--randrepeat=0", "--norandommap", "--output-format=json")
            self.pair.wait_applied(VM, timeout=300)
            cpu = cpu_seconds(pid) - cpu0
        w = fio_job(out)["write"]
        nbytes = int(w["io_bytes"])
        return float(w["bw_bytes"]) / 1e6, cpu / max(nbytes / GiB, 1e-9)

    def close(self) -> None:
        with self.env():
            self.pair.cleanup()


class _Env:
    """``PYTHONPATH`` set to one tree while its pair's tools run."""

    def __init__(self, tree: str) -> None:
        self.tree = tree
        self.old: str | None = None

    def __enter__(self) -> None:
        self.old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = self.tree

    def __exit__(self, *exc: object) -> None:
        if self.old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = self.old


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", required=True, help="LABEL=DIR, a source tree of colofs")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=3.0)
    ap.add_argument("--size", type=int, default=256, help="MiB of the disk the jobs write over")
    ap.add_argument("--jobs", default="", help="comma-separated job names (default: all)")
    ap.add_argument("--json", default="", help="also write the medians here")
    args = ap.parse_args()
    require_root("fio", "fusermount3")
    if Path("colofs").exists():
        raise SystemExit("run from a directory without a colofs package (see the usage)")
    jobs = [j for j in JOBS if not args.jobs or j.name in args.jobs.split(",")]
    size = args.size << 20
    rates: dict[tuple[str, str], list[float]] = {}
    cpus: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="nbd-primary-", dir="/var/tmp") as tmp, ExitStack() as stack:
        seed = Path(tmp) / "seed"
        with open(seed, "wb") as f:
            f.truncate(size)
        sides = []
        for spec in args.tree:
            label, _, tree = spec.partition("=")
            work = Path(tmp) / label
            work.mkdir()
            side = Side(label, os.path.abspath(tree), work, seed, size)
            stack.callback(side.close)
            sides.append(side)
        for rep in range(args.reps):
            for job in jobs:
                for side in sides if rep % 2 == 0 else reversed(sides):
                    t0 = time.monotonic()
                    mb, cpu = side.run(job, args.runtime)
                    rates.setdefault((job.name, side.label), []).append(mb)
                    cpus.setdefault((job.name, side.label), []).append(cpu)
                    print(f"rep {rep} {job.name:14} {side.label:8} {mb:8.1f} MB/s  {cpu:6.2f} CPU s/GiB"
                          f"  ({time.monotonic() - t0:.0f} s)", flush=True)
    print(f"\n{'job':14} " + " ".join(f"{s.label + ' MB/s':>14} {s.label + ' CPU/GiB':>14}" for s in sides))
    result = {}
    for job in jobs:
        cells = []
        for side in sides:
            r = statistics.median(rates[(job.name, side.label)])
            c = statistics.median(cpus[(job.name, side.label)])
            result[f"{job.name}/{side.label}"] = {"mb_s": round(r, 1), "cpu_s_per_gib": round(c, 2),
                                                  "runs_mb_s": [round(x, 1) for x in rates[(job.name, side.label)]]}
            cells.append(f"{r:14.1f} {c:14.2f}")
        print(f"{job.name:14} " + " ".join(cells))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
