#!/usr/bin/env python3
"""What a forwarded 4K write costs both sides, without FUSE: the replication path alone, A/B in one run.

``bench/primary_path.py`` measures the whole path through FUSE on a shared
2-core machine, where the IOPS and even the CPU per write move with the
load. This keeps only what forwarding adds: this process is the primary
(its core plus :class:`~colofs.repl.PrimaryReplicator`), a child process
serves the secondary on 127.0.0.1 (``bench/repl_bench.py --secondary``), and
one writer does random 4K overwrites at queue depth 1, each followed by a
blocking ``time.sleep(--pace)`` (no CPU: the time a FUSE round trip and fio
take between two writes, when trio's timers are too coarse) and a yield to
the loop, so that batches gather about as many writes as behind fio at
queue depth 1 through FUSE. Each variant
(see :data:`VARIANTS`) runs ``--writes`` writes per repetition, alternated
over ``--reps`` repetitions, each after a checkpoint and until the secondary
acknowledged the last write; printed per variant: CPU µs per write of each
process (``/proc/PID/stat``; the primary's includes the writer and its
pacing, the same for every variant; also for its loop thread alone, the
rest being worker threads: encoding, the retained log's spill), writes per batch, the rate and, with
``--trace``, the primary process's peak of memory Python allocated
(tracemalloc: the write data, batches, lz4 output; not the heap's
fragments). ``--workload 1m`` writes the whole disk in 1 MiB writes from 8
writers instead (the fill of bench/primary_memory.py).

    .venv/bin/python bench/forward_core.py [--writes 20000] [--reps 5] [--pace 0.0001]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script

import colofs.repl.batching as batching
import colofs.repl.retained as retained
from bench.host import cpu_seconds
from colofs.core import Store
from colofs.repl import PrimaryReplicator, ReplConfig

MiB = 1 << 20
VM = "vm"
VARIANTS = "wait20ms,wait50ms"
"""Each a ``+``-joined list of: ``waitNms`` (a small async batch waits N ms for company,
``batching.ASYNC_BATCH_DELAY``), ``batchNk`` (``batch_max_bytes`` N KiB), ``resNk`` (the retained
log keeps N KiB in memory), or ``local`` alone: the same writes to a disk of another store that is not
replicated (what the writer, its pacing and the core cost without forwarding); what a variant does not
name keeps the defaults."""


def apply_variant(name: str, link: object, cfg: ReplConfig, delay: float) -> None:
    """Set the knobs ``name`` names on ``link`` (a VMLink), the rest back to the defaults."""
    batching.ASYNC_BATCH_DELAY = delay
    link.batching.cfg = cfg  # type: ignore[attr-defined]
    link.tracking.retained.resident_limit = retained.RESIDENT_LIMIT  # type: ignore[attr-defined]
    for part in name.split("+"):
        if part.startswith("wait") and part.endswith("ms"):
            batching.ASYNC_BATCH_DELAY = float(part[4:-2]) / 1000
        elif part.startswith("batch") and part.endswith("k"):
            link.batching.cfg = dataclasses.replace(cfg, batch_max_bytes=int(part[5:-1]) << 10)  # type: ignore[attr-defined]
        elif part.startswith("res") and part.endswith("k"):
            link.tracking.retained.resident_limit = int(part[3:-1]) << 10  # type: ignore[attr-defined]
        elif part not in ("default", "local"):
            raise SystemExit(f"unknown variant {part!r}")


async def run(args: argparse.Namespace, port: int, child: int, work: str) -> None:
    size = args.size * MiB
    store = await Store.open(os.path.join(work, "primary"), role="primary", create=True)
    disk = await store.create_disk(VM, "d0", size)
    rng = random.Random(7)
    half = rng.randbytes(2048)
    data = [rng.randbytes(2048) + half for _ in range(64)]  # lz4 saves about half, as fio's 50 % does
    for off in range(0, size, MiB):
        await disk.write(off, b"".join(data[: MiB // 4096 % 64] * (MiB // 4096 // 64 + 1))[:MiB])
    pvm = store.vm(VM)
    local_store = await Store.open(os.path.join(work, "local"), role="primary", create=True)
    local_disk = await local_store.create_disk(VM, "d0", size)
    for off in range(0, size, MiB):
        await local_disk.write(off, bytes(MiB))
    cfg = ReplConfig()
    repl = PrimaryReplicator(store, ("127.0.0.1", port), None, config=cfg)
    delay = batching.ASYNC_BATCH_DELAY
    big = rng.randbytes(MiB // 2) * 2  # 1 MiB writes, half compressible
    results: dict[str, list[tuple[float, ...]]] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(repl.run)
        link = repl.link(VM)

        async def caught_up() -> None:
            while not (link.state == "streaming" and link.acked >= pvm.state.last_applied):
                await trio.sleep(0.002)

        await caught_up()
        for rep in range(args.reps):
            for name in args.variants.split(","):
                apply_variant(name, link, cfg, delay)
                await link.replicate_checkpoint(timeout=120)
                st0 = link.stats
                if args.trace:
                    tracemalloc.reset_peak()
                c0, s0, t0, l0 = time.process_time(), cpu_seconds(child), time.perf_counter(), time.thread_time()
                if args.workload == "4k":
                    n = args.writes
                    offs = [rng.randrange(size // 4096) * 4096 for _ in range(n)]
                    target = local_disk if name == "local" else disk
                    for i, off in enumerate(offs):
                        await target.write(off, data[i & 63])
                        time.sleep(args.pace)  # the loop blocked, no CPU: between two requests of a qd1 guest
                        await trio.lowlevel.checkpoint()
                else:  # the whole disk in 1 MiB writes, 8 writers (fio's qd8 fill)
                    n = size // MiB

                    async def writer(k: int) -> None:
                        for off in range(k * MiB, size, 8 * MiB):
                            await disk.write(off, bytes(big))  # a new buffer each, as a FUSE request is

                    async with trio.open_nursery() as writers:
                        for k in range(8):
                            writers.start_soon(writer, k)
                await caught_up()
                c1, s1, t1, l1 = time.process_time(), cpu_seconds(child), time.perf_counter(), time.thread_time()
                peak = tracemalloc.get_traced_memory()[1] / MiB if args.trace else 0.0
                st1 = link.stats
                per_batch = (st1["writes_sent"] - st0["writes_sent"]) / max(1, st1["batches"] - st0["batches"])
                results.setdefault(name, []).append(
                    ((c1 - c0) / n * 1e6, (s1 - s0) / n * 1e6, per_batch, n / (t1 - t0), peak, (l1 - l0) / n * 1e6))
                r = results[name][-1]
                print(f"rep {rep + 1} {name:10s} primary {r[0]:7.1f} us/write (loop {r[5]:5.1f})  secondary {r[1]:7.1f} us/write  "
                      f"{r[2]:6.1f} writes/batch  {r[3]:7.0f} writes/s  traced peak {r[4]:5.1f} MiB", flush=True)
        nursery.cancel_scope.cancel()
    await store.close()
    await local_store.close()
    print("\nmedian [min-max] per variant")
    for name, rows in results.items():
        cols = list(zip(*rows, strict=True))
        shown = [f"{statistics.median(c):.1f} [{min(c):.1f}-{max(c):.1f}]" for c in cols]
        print(f"{name:10s} primary {shown[0]} us/write (loop thread {shown[5]}), secondary {shown[1]} us/write, "
              f"{shown[2]} writes/batch, {shown[3]} writes/s, traced peak {shown[4]} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--size", type=int, default=256, help="disk MiB (default 256)")
    ap.add_argument("--writes", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--pace", type=float, default=0.0001, help="seconds the loop sleeps after each write (default 0.0001)")
    ap.add_argument("--variants", default=VARIANTS, help=f"comma-separated (default {VARIANTS!r})")
    ap.add_argument("--workload", default="4k", choices=("4k", "1m"),
                    help="4k: --writes random 4K writes at qd1; 1m: the disk in 1 MiB writes by 8 writers")
    ap.add_argument("--trace", action="store_true",
                    help="also the primary's peak of Python-allocated memory (tracemalloc; slows allocation)")
    args = ap.parse_args()
    if args.trace:
        tracemalloc.start()
    work = tempfile.mkdtemp(prefix="colofs-forward-core-", dir=args.dir)
    repl_bench = os.path.join(os.path.dirname(os.path.abspath(__file__)), "repl_bench.py")
    child = subprocess.Popen([sys.executable, repl_bench, "--secondary", os.path.join(work, "secondary")],
                             stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        line = child.stdout.readline().split()
        if not line or line[0] != b"ready":
            raise SystemExit("the secondary process did not start")
        trio.run(run, args, int(line[1]), child.pid, work)
    finally:
        child.terminate()
        child.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
