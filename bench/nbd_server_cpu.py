#!/usr/bin/env python3
"""The NBD server's own cost: fio's nbd engine against a store served in this process, no FUSE, no peer.

What a request costs the server, apart from the mount and replication: a
store (secondary role by default, so a write goes to the SVM's active layer
as the SVM's NBD export does) is served on a unix socket by
``NbdService`` in a child process; fio runs against it, and the child
reports the rate and its own CPU seconds (``getrusage``, its threads
included, fio excluded) per GiB moved. Several source trees can be
compared in one invocation, repetition by repetition, so they share the
machine's load; CPU per GiB is the figure that survives that load.

    cd /tmp && /work/main/.venv/bin/python /work/main/bench/nbd_server_cpu.py \\
        --tree old=/tmp/colofs-old --tree new=/work/main [--reps 5] [--runtime 3]

Run it from a directory holding no ``colofs`` package; each child imports
colofs from its tree through ``PYTHONPATH``. Needs fio with its nbd engine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile

JOBS = {  # name: (rw, bs, iodepth)
    "write-1m-qd1": ("write", "1m", 1),
    "write-1m-qd16": ("write", "1m", 16),
    "write-4k-qd16": ("randwrite", "4k", 16),
    "read-1m-qd16": ("read", "1m", 16),
    "read-4k-qd16": ("randread", "4k", 16),
}
GiB = 1 << 30


def cpu_now() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def serve_one(workdir: str, jobs: list[str], runtime: float, size: int, role: str) -> dict[str, list[float]]:
    """In the child: serve a fresh store and run each job against it; ``{job: [MB/s, CPU s/GiB]}``."""
    import trio

    from colofs.core.store import Store
    from colofs.nbd.service import NbdService

    out: dict[str, list[float]] = {}

    async def main() -> None:
        store = await Store.open(os.path.join(workdir, "store"), role=role, create=True)
        await store.create_disk("vm", "d", size)
        sock = os.path.join(workdir, "nbd.sock")
        async with trio.open_nursery() as nursery:
            svc = await NbdService.start(nursery, store, None, socket_path=sock, tcp=None)
            fill = ["fio", "--name=fill", "--rw=write", "--bs=1m", "--ioengine=nbd", "--iodepth=4",
                    f"--uri=nbd+unix:///vm/d?socket={sock}", f"--size={size}", "--output-format=json"]
            await trio.run_process(fill, capture_stdout=True)  # reads then read data, not holes
            for name in jobs:
                rw, bs, depth = JOBS[name]
                argv = ["fio", "--name=n", f"--rw={rw}", f"--bs={bs}", "--ioengine=nbd", f"--iodepth={depth}",
                        f"--uri=nbd+unix:///vm/d?socket={sock}", f"--size={size}", f"--runtime={runtime}",
                        "--time_based", "--refill_buffers", "--randrepeat=0", "--norandommap",
                        "--output-format=json"]
                c0 = cpu_now()
                res = await trio.run_process(argv, capture_stdout=True)
                cpu = cpu_now() - c0
                job = json.loads(res.stdout[res.stdout.index(b"{"):])["jobs"][0]
                side = job["read" if "read" in rw else "write"]
                out[name] = [side["bw_bytes"] / 1e6, cpu / max(side["io_bytes"] / GiB, 1e-9)]
            await svc.stop()
            nursery.cancel_scope.cancel()
        store.abandon()

    trio.run(main)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", default=[], help="LABEL=DIR, a source tree of colofs")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=3.0)
    ap.add_argument("--size", type=int, default=256, help="MiB of the disk")
    ap.add_argument("--role", default="secondary")
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    jobs = args.jobs.split(",")
    if args.child:
        print(json.dumps(serve_one(args.child, jobs, args.runtime, args.size << 20, args.role)))
        return
    if os.path.isdir("colofs"):
        raise SystemExit("run from a directory without a colofs package (see the usage)")
    results: dict[tuple[str, str], list[list[float]]] = {}
    for rep in range(args.reps):
        trees = args.tree if rep % 2 == 0 else list(reversed(args.tree))
        for spec in trees:
            label, _, tree = spec.partition("=")
            with tempfile.TemporaryDirectory(prefix="nbd-cpu-", dir="/var/tmp") as tmp:
                env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
                res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", tmp, "--jobs", args.jobs,
                                      "--runtime", str(args.runtime), "--size", str(args.size), "--role", args.role],
                                     env=env, capture_output=True, text=True, timeout=600, check=True)
            got = json.loads(res.stdout.strip().splitlines()[-1])
            for name, (mb, cpu) in got.items():
                results.setdefault((name, label), []).append([mb, cpu])
                print(f"rep {rep} {name:14} {label:8} {mb:8.1f} MB/s {cpu:6.2f} CPU s/GiB", flush=True)
    labels = [t.partition("=")[0] for t in args.tree]
    print(f"\n{'job':14} " + " ".join(f"{lb + ' MB/s':>12} {lb + ' CPU/GiB':>12}" for lb in labels))
    for name in jobs:
        cells = []
        for lb in labels:
            runs = results[(name, lb)]
            cells.append(f"{statistics.median(r[0] for r in runs):12.1f} {statistics.median(r[1] for r in runs):12.2f}")
        print(f"{name:14} " + " ".join(cells))


if __name__ == "__main__":
    main()
