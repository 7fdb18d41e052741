#!/usr/bin/env python3
"""fio on a mounted colofs secondary disk against a raw file on the local file system, in one run.

Workloads: 1 MiB sequential and 4 KiB random, read and write; buffered and
O_DIRECT with psync, and O_DIRECT with libaio at queue depth 16. Page caches
are dropped before every measurement. Before each colofs workload the VM is
checkpointed, so reads see base and writes start an empty active layer (as
between two COLO checkpoints). Prints MB/s and IOPS per target, their ratio,
and the CPU the mount daemon used.

    sudo .venv/bin/python bench/fs_bench.py [--size 1G] [--runtime 6] [--dir /var/tmp]

Needs root (drop_caches, FUSE), fio and fusermount3. Takes about 3-4 minutes
with the defaults.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `bench` importable

from bench.host import cpu_seconds, drop_caches, fio_job, require_root, sh
from mountctl.pair import Node


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str
    bs: str
    engine: str
    direct: int
    iodepth: int = 1

    @property
    def is_read(self) -> bool:
        return "read" in self.rw


def workloads() -> list[Workload]:
    out = []
    for label, engine, direct, depth in (("buffered", "psync", 0, 1), ("O_DIRECT", "psync", 1, 1),
                                         ("libaio qd16 O_DIRECT", "libaio", 1, 16)):
        for rw, bs, what in (("write", "1m", "seq write 1M"), ("read", "1m", "seq read 1M"),
                             ("randwrite", "4k", "rand write 4K"), ("randread", "4k", "rand read 4K")):
            out.append(Workload(f"{label} {what}", rw, bs, engine, direct, depth))
    return out


def fio(path: Path, w: Workload, size: str, runtime: int) -> tuple[float, float]:
    """(MB/s, IOPS) of one workload."""
    out = sh(
        "fio", "--name=bench", f"--filename={path}", f"--rw={w.rw}", f"--bs={w.bs}",
        f"--ioengine={w.engine}", f"--direct={w.direct}", f"--iodepth={w.iodepth}", f"--size={size}",
        f"--runtime={runtime}", "--time_based", "--fallocate=none", "--allow_file_create=0",
        "--randrepeat=0", "--norandommap", "--invalidate=1", "--output-format=json",
        timeout=runtime * 10 + 60,
    )
    side = fio_job(out)["read" if w.is_read else "write"]
    return side["bw_bytes"] / 1e6, side["iops"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="disk and file size (default 1G)")
    ap.add_argument("--runtime", type=int, default=6, help="seconds per measurement (default 6)")
    ap.add_argument("--dir", default="/var/tmp", help="where the store and the raw file live")
    ap.add_argument("--only", help="run only workloads whose name contains this text")
    args = ap.parse_args()
    require_root("fio", "fusermount3")
    work = Path(tempfile.mkdtemp(prefix="colofs-bench-", dir=args.dir))
    raw = work / "raw.raw"
    node = Node(work, "secondary", "secondary")
    try:
        print(f"preparing {args.size} of random data in {raw} ...", flush=True)
        sh("fio", "--name=fill", f"--filename={raw}", "--rw=write", "--bs=1m", f"--size={args.size}",
           "--direct=1", "--ioengine=libaio", "--iodepth=8", "--refill_buffers", "--output-format=terse")
        node.mount()
        pid = node.pid
        assert pid is not None
        node.import_("vm", raw)
        mnt = node.mnt
        disk = mnt / "vm" / "disk.raw"
        rows = []
        for w in workloads():
            if args.only and args.only not in w.name:
                continue
            drop_caches()
            r_mb, r_iops = fio(raw, w, args.size, args.runtime)
            node.control("vm", "checkpoint")
            drop_caches()
            cpu0, t0 = cpu_seconds(pid), time.monotonic()
            c_mb, c_iops = fio(disk, w, args.size, args.runtime)
            cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0) * 100
            rows.append((w, r_mb, r_iops, c_mb, c_iops, cpu))
            print(f"  {w.name:36s} raw {r_mb:8.0f} MB/s   colofs {c_mb:8.0f} MB/s", flush=True)
        print()
        print(f"fio, {args.size} file, {args.runtime} s per run, caches dropped before each; "
              f"MB/s (IOPS for 4K); {os.cpu_count()} CPUs")
        print()
        print("| workload | raw file | colofs secondary | colofs/raw | daemon CPU |")
        print("|---|---|---|---|---|")
        for w, r_mb, r_iops, c_mb, c_iops, cpu in rows:
            small = w.bs == "4k"
            raw_s = f"{r_mb:.0f} ({r_iops / 1000:.1f}k)" if small else f"{r_mb:.0f}"
            col_s = f"{c_mb:.0f} ({c_iops / 1000:.1f}k)" if small else f"{c_mb:.0f}"
            print(f"| {w.name} | {raw_s} | {col_s} | {c_mb / r_mb if r_mb else 0:.2f} | {cpu:.0f}% |")
        return 0
    finally:
        node.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
