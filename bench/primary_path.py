#!/usr/bin/env python3
"""The primary's 4K write against the SVM's 4K write, in one run on one replicating pair.

Issue 13's target is the primary's 4K qd1 at >= 0.9x the SVM file's 4K qd1:
forwarding a write (sequence number, retention, dirty map, queueing to the
link) should cost little more than the local write. This puts both numbers
side by side on the same pair, the same disk and the same load, so the ratio
is not blurred by another run's noise:

* a loopback pair (:class:`mountctl.pair.Pair`), one disk filled through the
  primary and checkpointed, so every write overwrites data;
* per repetition, alternated: fio 4K randwrite qd1 O_DIRECT psync on the
  primary's file (the protected VM, ``async`` mode by default), then the same
  job on the secondary's SVM file, each after a checkpoint; the primary's
  run is drained (the secondary acknowledged everything) before the next;
* with ``--profile DIR``, one more primary run under ``py-spy record`` on the
  primary daemon, with its top functions by own and by inclusive samples.

    sudo .venv/bin/python bench/primary_path.py [--reps 3] [--runtime 10] [--profile /tmp/prof]

Needs root (FUSE, drop_caches) and fio; py-spy only for ``--profile``.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `bench` importable

from bench.host import cpu_seconds, fio_job, require_root, sh
from mountctl.pair import Node, Pair, PairError
from mountctl.units import parse_size

VM = "vm"


def fio_4k(path: Path, size: int, runtime: float) -> float:
    """IOPS of fio 4K randwrite, qd1, O_DIRECT psync, for ``runtime`` seconds."""
    out = sh("fio", "--name=p", f"--filename={path}", "--rw=randwrite", "--bs=4k", "--ioengine=psync",
             "--direct=1", "--iodepth=1", f"--size={size}", f"--runtime={runtime}", "--time_based",
             "--allow_file_create=0", "--fallocate=none", "--refill_buffers", "--buffer_compress_percentage=50",
             "--randrepeat=0", "--norandommap", "--output-format=json")
    return float(fio_job(out)["write"]["iops"])


def batches(pair: Pair) -> tuple[int, int]:
    """(batches, writes) the primary has sent to the secondary so far."""
    peer = (pair.primary.vm_status(VM) or {}).get("peer") or {}
    return int(peer.get("batches", 0)), int(peer.get("writes_sent", 0))


def serving_pid(node: Node, vm: str = VM) -> int:
    """The process that serves ``vm``: its worker (a process per VM, the default), or the one daemon."""
    pid = ((node.vm_status(vm) or {}).get("worker") or {}).get("pid")
    if isinstance(pid, int):
        return pid
    assert node.pid is not None
    return node.pid


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in KiB: what the daemon holds now, and its peak so far."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def top(raw: Path, n: int = 25) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """(own, inclusive) share of samples of the top ``n`` functions in py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or "Thread._bootstrap" in stack or "get_events" in stack:
            continue  # other threads (the pools, idle), and the loop waiting in epoll
        k = int(count)
        total += k
        frames = [f.split(" (")[0] + " " + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1].rstrip(")")
                  for f in stack.split(";")]
        own[frames[-1]] += k
        for f in set(frames):
            incl[f] += k
    share = 100.0 / max(total, 1)
    return ([(f, c * share) for f, c in own.most_common(n)], [(f, c * share) for f, c in incl.most_common(n)])


def profile(pair: Pair, size: int, runtime: float, out_dir: Path, svm: bool = False) -> None:
    """One primary run (or SVM run) under py-spy on its daemon; prints the top functions of its busy main thread."""
    node = pair.secondary if svm else pair.primary
    pid = serving_pid(node)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / ("svm.txt" if svm else "primary.txt")
    spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pid), "-r", "250",
                            "-f", "raw", "-o", str(raw), "-d", str(int(runtime) + 2)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)  # let py-spy attach before the load starts
        pair.checkpoint(VM)
        iops = fio_4k(node.file(VM), size, runtime)
        pair.wait_acked(VM, timeout=600)
    finally:
        spy.wait(timeout=120)
    print(f"\nprofile of the {'secondary daemon under SVM' if svm else 'primary daemon under'} 4K qd1 "
          f"({iops:.0f} IOPS while sampled), {raw}; % of the main thread's busy samples")
    own, incl = top(raw)
    print("  own %   function")
    for f, s in own:
        print(f"  {s:5.1f}   {f}")
    print("  incl %  function")
    for f, s in incl:
        if s > 99:
            continue  # the daemon's entry points, in every sample
        print(f"  {s:5.1f}   {f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="256M", help="disk size (default 256M)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=10.0, help="seconds per fio run (default 10)")
    ap.add_argument("--mode", default="async", choices=("async", "sync"))
    ap.add_argument("--profile", type=Path, help="also profile the primary daemon, writing py-spy output here")
    ap.add_argument("--dir", default="/var/tmp", help="where the stores live")
    args = ap.parse_args()
    size = parse_size(args.size)
    require_root("fio", "fusermount3")
    work = Path(tempfile.mkdtemp(prefix="colofs-primary-path-", dir=args.dir))
    pair = Pair(work)
    try:
        pair.start()
        disk = pair.primary.create(VM, size)
        svm = pair.wait_disk(VM)
        sh("fio", "--name=fill", f"--filename={disk}", "--rw=write", "--bs=1m", "--ioengine=libaio", "--iodepth=8",
           "--direct=1", f"--size={size}", "--allow_file_create=0", "--fallocate=none", "--output-format=terse")
        pair.wait_acked(VM, timeout=600)
        pair.primary.control(VM, "mode", args.mode.encode())
        pri_pid, sec_pid = serving_pid(pair.primary), serving_pid(pair.secondary)
        (prss, phwm), (srss, shwm) = memory_kib(pri_pid), memory_kib(sec_pid)
        print(f"after the fill ({args.size} in 1M writes, qd8): primary RSS {prss / 1024:.1f} MiB "
              f"(peak {phwm / 1024:.1f}); secondary RSS {srss / 1024:.1f} MiB (peak {shwm / 1024:.1f})", flush=True)
        rows: list[tuple[float, float]] = []
        for rep in range(args.reps):
            pair.checkpoint(VM)
            c0 = (cpu_seconds(pri_pid), cpu_seconds(sec_pid))
            b0 = batches(pair)
            t0 = time.monotonic()
            p = fio_4k(disk, size, args.runtime)
            pair.wait_acked(VM, timeout=600)
            dt = time.monotonic() - t0
            cpu = [(cpu_seconds(pid) - c) / dt * 100 for pid, c in zip((pri_pid, sec_pid), c0, strict=True)]
            b1 = batches(pair)
            per_batch = (b1[1] - b0[1]) / max(1, b1[0] - b0[0])
            pair.checkpoint(VM)
            c1 = cpu_seconds(sec_pid)
            t1 = time.monotonic()
            s = fio_4k(svm, size, args.runtime)
            svm_cpu = (cpu_seconds(sec_pid) - c1) / (time.monotonic() - t1) * 100
            rows.append((p, s))
            # CPU per write (µs): what each write costs the daemons, less noisy than IOPS on a shared host
            us = [c * 1e4 / p for c in cpu]
            print(f"rep {rep + 1}: primary ({args.mode}) {p:7.0f} IOPS (CPU primary {cpu[0]:.0f}% = {us[0]:.0f} us/write, "
                  f"secondary {cpu[1]:.0f}% = {us[1]:.0f} us/write, {per_batch:.1f} writes/batch)   "
                  f"SVM {s:7.0f} IOPS (CPU {svm_cpu:.0f}% = {svm_cpu * 1e4 / s:.0f} us/write)   ratio {p / s:.2f}",
                  flush=True)
            retained = int(((pair.primary.vm_status(VM) or {}).get("peer") or {}).get("retained_bytes") or 0)
            (prss, phwm), (srss, shwm) = memory_kib(pri_pid), memory_kib(sec_pid)
            print(f"       memory: primary RSS {prss / 1024:.1f} MiB (peak {phwm / 1024:.1f}), retained "
                  f"{retained / 2**20:.1f} MiB; secondary RSS {srss / 1024:.1f} MiB (peak {shwm / 1024:.1f})",
                  flush=True)
        ps, ss = [r[0] for r in rows], [r[1] for r in rows]
        print(f"median: primary {statistics.median(ps):.0f}  SVM {statistics.median(ss):.0f}  "
              f"ratio {statistics.median(p / s for p, s in rows):.2f}")
        if args.profile:
            profile(pair, size, args.runtime, args.profile)
            profile(pair, size, args.runtime, args.profile, svm=True)
    except PairError as e:
        raise SystemExit(str(e)) from None
    finally:
        pair.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
