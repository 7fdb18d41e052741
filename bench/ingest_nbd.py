"""fio's ``nbd`` engine straight into a secondary's ``VM/DISK:ingest`` export, beside its SVM export.

No QEMU in between: this isolates what the ingest export costs per NBD write
(applying it as a forwarded primary write, whose hidden copy is made durable
before the reply) from what QEMU's quorum primary adds. One secondary mount
with ``--nbd-socket``; a VM of ``--size`` MiB whose base is filled once
(so copy-before-write saves data, not ZERO records, unless ``--fresh``);
then, interleaved ``--reps`` times, a time-based fio job into
``VM/DISK:ingest`` and into ``VM/DISK`` (the SVM's view), each after a local
checkpoint. Prints IOPS and MB/s per run and the medians.

Usage: ``python bench/ingest_nbd.py [--dir DIR] [--size MiB] [--bs 4k] [--rw randwrite]
[--iodepth 16] [--runtime S] [--reps N] [--fresh]``. Needs root (FUSE), fio with its nbd engine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from bench.compare.fio import FioJob, run_fio
from mountctl.pair import Node

VM = "ing"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--size", type=int, default=1024, help="disk size in MiB")
    ap.add_argument("--bs", default="4k")
    ap.add_argument("--rw", default="randwrite")
    ap.add_argument("--iodepth", type=int, default=16)
    ap.add_argument("--runtime", type=float, default=5.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fresh", action="store_true", help="leave base as holes (ZERO records in hidden)")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    size = args.size << 20
    work = tempfile.mkdtemp(prefix="ingest-nbd-", dir=args.dir)
    node = Node(work, "sec", "secondary")
    sock = Path(work) / "nbd.sock"
    results: dict[str, list[dict[str, float]]] = {"ingest": [], "svm": []}
    try:
        node.mount("--nbd-socket", str(sock))
        node.create(VM, size)
        if not args.fresh:
            # The SVM's writes are dropped at a checkpoint; fill base through ingest's primary image instead.
            job = FioJob("write", "1M", engine="nbd", iodepth=4, size=size)
            run_fio(job, uri=f"nbd+unix:///{VM}/disk:ingest?socket={sock}")
        node.mountctl("checkpoint", str(node.mnt / VM))
        job = FioJob(args.rw, args.bs, engine="nbd", iodepth=args.iodepth, size=size, runtime=args.runtime)
        for rep in range(args.reps):
            for kind, export in (("ingest", f"{VM}/disk:ingest"), ("svm", f"{VM}/disk")):
                node.mountctl("checkpoint", str(node.mnt / VM))
                r = run_fio(job, uri=f"nbd+unix:///{export}?socket={sock}")
                results[kind].append({"iops": r.iops, "mb_s": r.mb_s, "seconds": r.runtime_s})
                print(f"rep {rep} {kind:6s} {r.iops:9.0f} IOPS {r.mb_s:8.1f} MB/s", flush=True)
    finally:
        node.cleanup()
        if not os.path.ismount(node.mnt):
            shutil.rmtree(work, ignore_errors=True)
    for kind, rows in results.items():
        if rows:
            print(f"median {kind:6s} {statistics.median(r['iops'] for r in rows):9.0f} IOPS "
                  f"{statistics.median(r['mb_s'] for r in rows):8.1f} MB/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
