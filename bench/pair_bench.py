#!/usr/bin/env python3
"""fio through a replicating colofs pair on loopback, beside a raw file, in one run.

A secondary mount (``--listen``) and a primary mount (``--peer``) on
127.0.0.1 with a shared key; one 1 GiB disk on the primary, filled once and
checkpointed, so every measured write overwrites data and the secondary's
hidden buffer fills with copies of it (copy-before-write) as it would between
two COLO checkpoints. Per workload and replication mode (``async``, ``sync``):

* colofs MB/s: bytes written divided by the time from the start of fio to the
  moment the secondary acknowledged the last write (fio's ``end_fsync``
  included); ``lag`` is how long that took after fio returned;
* the checkpoint that follows, timed on its own (``mountctl checkpoint``'s
  xattr, in-process), with the hidden bytes it discarded;
* the same fio job on a raw file on the same file system, in the same run;
* the lz4 wire/raw ratio the primary's status reports (cumulative), and the
  CPU both daemons used.

Then the checkpoint latency with 64 MiB buffered on the secondary (median of
three). fio's buffers are refilled and 50 % compressible.

    sudo .venv/bin/python bench/pair_bench.py [--size 1G] [--rand-io 64M] [--dir /var/tmp]

Needs root (drop_caches, FUSE), fio and fusermount3; about 3-5 minutes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `bench` importable

from bench.host import MiB, cpu_seconds, drop_caches, fio_job, require_root, sh
from mountctl.pair import Pair, PairError
from mountctl.units import parse_size


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str
    bs: str
    engine: str
    direct: int
    iodepth: int
    sequential: bool


WORKLOADS = (
    Workload("seq 1M O_DIRECT", "write", "1m", "psync", 1, 1, True),
    Workload("seq 1M buffered", "write", "1m", "psync", 0, 1, True),
    Workload("rand 4K O_DIRECT qd16", "randwrite", "4k", "libaio", 1, 16, False),
)


def fio(path: Path, w: Workload, size: int, io_bytes: int) -> tuple[int, float]:
    """Run one job; (bytes written, seconds fio took, its end_fsync included)."""
    t0 = time.monotonic()
    out = sh("fio", "--name=bench", f"--filename={path}", f"--rw={w.rw}", f"--bs={w.bs}",
             f"--ioengine={w.engine}", f"--direct={w.direct}", f"--iodepth={w.iodepth}", f"--size={size}",
             f"--io_size={io_bytes}", "--end_fsync=1", "--fallocate=none", "--allow_file_create=0",
             "--refill_buffers", "--buffer_compress_percentage=50", "--randrepeat=0", "--norandommap",
             "--invalidate=1", "--output-format=json")
    seconds = time.monotonic() - t0
    return int(fio_job(out)["write"]["io_bytes"]), seconds


@dataclass
class Row:
    workload: Workload
    mode: str
    colofs_mb: float
    fio_mb: float
    lag: float
    raw_mb: float
    checkpoint_ms: float
    hidden_mib: float
    lz4: float | None
    cpu_pri: float
    cpu_sec: float


def measure(pair: Pair, w: Workload, mode: str, size: int, io_bytes: int, raw_mb: float) -> Row:
    pri, sec = pair.primary, pair.secondary
    disk = pri.file("vm")
    drop_caches()
    assert pri.pid is not None and sec.pid is not None
    c0 = (cpu_seconds(pri.pid), cpu_seconds(sec.pid))
    t0 = time.monotonic()
    nbytes, fio_s = fio(disk, w, size, io_bytes)
    t_ack = pair.wait_acked("vm", timeout=600)
    elapsed = t_ack - t0
    cpu = ((cpu_seconds(pri.pid) - c0[0]) / elapsed * 100, (cpu_seconds(sec.pid) - c0[1]) / elapsed * 100)
    hidden = sec.buffered("vm")[0]
    lz4 = pri.vm_status("vm")["peer"].get("lz4_ratio")
    t1 = time.monotonic()
    res = pri.control("vm", "checkpoint")
    ckpt = time.monotonic() - t1
    assert res.get("replicated"), res
    return Row(w, mode, nbytes / elapsed / 1e6, nbytes / fio_s / 1e6, t_ack - t0 - fio_s, raw_mb,
               ckpt * 1000, hidden / MiB, lz4, cpu[0], cpu[1])


def checkpoint_latency(pair: Pair, buffered: int) -> tuple[float, float, float]:
    """Median (setxattr round trip, engine latency, secondary hidden MiB) of three checkpoints with ``buffered`` bytes."""
    pri, sec = pair.primary, pair.secondary
    disk = pri.file("vm")
    totals, engine, hidden = [], [], []
    for i in range(3):
        sh("fio", "--name=fill", f"--filename={disk}", "--rw=write", "--bs=1m", f"--size={buffered}",
           f"--offset={i * buffered}", "--direct=1", "--ioengine=psync", "--refill_buffers",
           "--buffer_compress_percentage=50", "--allow_file_create=0", "--output-format=terse")
        pair.wait_acked("vm", timeout=600)
        hidden.append(sec.buffered("vm")[0] / MiB)
        t0 = time.monotonic()
        res = pri.control("vm", "checkpoint")
        totals.append(time.monotonic() - t0)
        engine.append(float(res["latency_seconds"]))
    return statistics.median(totals) * 1000, statistics.median(engine) * 1000, statistics.median(hidden)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="disk size and sequential bytes per run (default 1G)")
    ap.add_argument("--rand-io", default="64M", help="bytes of 4 KiB random writes per run (default 64M)")
    ap.add_argument("--buffered", default="64M", help="buffered bytes for the checkpoint latency (default 64M)")
    ap.add_argument("--dir", default="/var/tmp", help="where the stores and the raw file live")
    args = ap.parse_args()
    size, rand_io, buffered = parse_size(args.size), parse_size(args.rand_io), parse_size(args.buffered)
    require_root("fio", "fusermount3")
    work = Path(tempfile.mkdtemp(prefix="colofs-pair-bench-", dir=args.dir))
    pair = Pair(work)
    pri = pair.primary
    raw = work / "raw.raw"
    started = time.monotonic()
    try:
        pair.start()
        disk = pri.create("vm", size)
        print(f"filling the {size // MiB} MiB disk through the pair, and the raw file ...", flush=True)
        t0 = time.monotonic()
        fill = Workload("fill", "write", "1m", "libaio", 1, 8, True)
        fio(disk, fill, size, size)
        fill_rate = size / (pair.wait_acked("vm", timeout=600) - t0) / 1e6
        pri.control("vm", "checkpoint")
        with open(raw, "wb") as f:
            f.truncate(size)
        fio(raw, fill, size, size)
        raw_rates: dict[str, float] = {}
        rows: list[Row] = []
        for mode in ("async", "sync"):
            pri.control("vm", "mode", mode.encode())
            for w in WORKLOADS:
                io_bytes = size if w.sequential else rand_io
                if w.name not in raw_rates:
                    drop_caches()
                    nbytes, seconds = fio(raw, w, size, io_bytes)
                    raw_rates[w.name] = nbytes / seconds / 1e6
                row = measure(pair, w, mode, size, io_bytes, raw_rates[w.name])
                rows.append(row)
                print(f"  {mode:5s} {w.name:22s} colofs {row.colofs_mb:6.0f} MB/s (fio {row.fio_mb:.0f}, "
                      f"lag {row.lag:.2f} s)  raw {row.raw_mb:6.0f} MB/s  checkpoint {row.checkpoint_ms:.0f} ms "
                      f"({row.hidden_mib:.0f} MiB hidden)", flush=True)
        pri.control("vm", "mode", b"async")
        total_ms, engine_ms, hidden_mib = checkpoint_latency(pair, buffered)
        lz4 = pri.vm_status("vm")["peer"].get("lz4_ratio")
    except PairError as e:
        raise SystemExit(str(e)) from None
    finally:
        pair.cleanup()
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"colofs pair on 127.0.0.1 (2 daemons, shared key), {size // MiB} MiB disk, {os.cpu_count()} CPUs; "
          f"fio end_fsync=1, buffers 50% compressible; colofs MB/s until the secondary acknowledged")
    print(f"initial fill (1M O_DIRECT qd8, blocks new to the secondary): {fill_rate:.0f} MB/s")
    print()
    print("| workload | mode | colofs MB/s | (fio's own) | ack lag | raw file MB/s | colofs/raw | "
          "checkpoint after | hidden discarded | lz4 wire/raw | CPU pri/sec |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        extra = f" ({r.colofs_mb * 1e6 / 4096 / 1000:.1f}k IOPS)" if r.workload.bs == "4k" else ""
        print(f"| {r.workload.name} | {r.mode} | {r.colofs_mb:.0f}{extra} | {r.fio_mb:.0f} | {r.lag:.2f} s | "
              f"{r.raw_mb:.0f} | {r.colofs_mb / r.raw_mb:.2f} | {r.checkpoint_ms:.0f} ms | "
              f"{r.hidden_mib:.0f} MiB | {r.lz4 if r.lz4 is not None else '-'} | "
              f"{r.cpu_pri:.0f}%/{r.cpu_sec:.0f}% |")
    print()
    print(f"checkpoint with {hidden_mib:.0f} MiB buffered in hidden: {total_ms:.0f} ms (setxattr round trip), "
          f"{engine_ms:.0f} ms engine latency (median of 3); lz4 wire/raw overall {lz4}")
    print(f"took {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
