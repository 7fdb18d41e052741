"""What a primary's 4K write costs in the core, with and without replication's bookkeeping.

``bench/primary_path.py`` measures the whole path (fio, FUSE, both daemons)
on a shared 2-core machine, where one run's noise hides a few microseconds.
This calls ``Disk.write`` in one process, no FUSE and no peer, and reports
the CPU per write (``time.process_time``, the writeback thread included) of:

* ``local``: the base overwrite alone (no write sink);
* ``tracked``: the same with the link's :class:`~colofs.repl.tracking.Tracking`
  as the VM's sink (numbering, dirty map, retained log, its spill task), the
  secondary "acknowledging" every ``--ack`` writes and confirming a
  checkpoint every ``--checkpoint`` MiB;

each under a writeback rule and spill setting (see :data:`VARIANTS`),
alternated over ``--reps`` repetitions. It also prints the peak resident
bytes of the retained log and the process's peak RSS.

Usage: ``python bench/primary_write_core.py [--dir DIR] [--size MiB] [--writes N] [--reps N]``.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `colofs` importable

import colofs.core.cbw
from colofs.core import Store
from colofs.repl.config import ReplConfig
from colofs.repl.linkstate import Lifecycle
from colofs.repl.retained import RetainedBudget
from colofs.repl.tracking import Tracking

MiB = 1 << 20
VARIANTS = "local kick,local now,tracked kick nospill,tracked now nospill,tracked now"
"""Each: ``local`` or ``tracked``; ``kick`` (writeback started every ``WRITEBACK_EVERY`` bytes of any
writes, as before small runs stopped counting), ``now`` (the current rule) or ``nokick``; maybe ``nospill``
(the retained log keeps every write in memory, as before spilling) or ``resN`` (N MiB of it kept in memory
instead of ``retained.RESIDENT_LIMIT``)."""


async def one(disk: object, tracking: Tracking | None, writes: int, size: int, ack: int, ckpt: int,
              seed: int) -> tuple[float, float, int]:
    """CPU and wall µs per write of ``writes`` random 4K overwrites, and the retained log's peak resident bytes."""
    rng = random.Random(seed)
    blocks = size // 4096
    bufs = [rng.randbytes(4096) for _ in range(64)]
    offs = [rng.randrange(blocks) * 4096 for _ in range(writes)]
    peak = 0
    vm_state = disk.vm.state  # type: ignore[attr-defined]
    t0, w0 = time.process_time(), time.perf_counter()
    for i, off in enumerate(offs):
        await disk.write(off, bytes(memoryview(bufs[i & 63])))  # type: ignore[attr-defined]  # a new object each
        if i % ack == ack - 1:
            await trio.sleep(0)  # where the daemon's loop would serve others (the spill task among them)
            if tracking is not None:
                tracking.retained.mark_sent(vm_state.last_applied)  # a batch went out, and its ACK came back
                tracking.acknowledged(vm_state.last_applied)
                peak = max(peak, tracking.retained.resident)
            if tracking is not None and i % ckpt == ckpt - 1:
                tracking.checkpoint_confirmed(vm_state.last_applied)
                await trio.sleep(0)  # let the spill task see the emptied log
    dt, wall = time.process_time() - t0, time.perf_counter() - w0
    return dt / writes * 1e6, wall / writes * 1e6, peak


async def main_async(args: argparse.Namespace) -> None:
    work = tempfile.mkdtemp(prefix="colofs-primary-core-", dir=args.dir)
    size = args.size * MiB
    try:
        store = await Store.open(os.path.join(work, "p"), role="primary", create=True)
        disk = await store.create_disk("vm", "d", size)
        vm = store.vm("vm")
        chunk = os.urandom(MiB)
        for off in range(0, size, MiB):
            await disk.write(off, chunk)
        cfg = ReplConfig()
        life = Lifecycle()
        tracking = Tracking(vm, cfg, life, lambda: None, RetainedBudget(cfg.max_retained_total_bytes))
        tracking.acknowledged(vm.state.last_applied)
        tracking.checkpoint_confirmed(vm.state.last_applied)
        results: dict[str, list[tuple[float, float]]] = {}
        peaks: dict[str, list[int]] = {}
        every, min_run = colofs.core.cbw.WRITEBACK_EVERY, colofs.core.cbw.WRITEBACK_MIN_RUN
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tracking.retained.run_spill)
            limit = tracking.retained.resident_limit
            for rep in range(args.reps):
                for name in args.variants.split(","):
                    kick = name.split()[1]
                    # "kick": every WRITEBACK_EVERY bytes of any writes (the rule before small runs stopped counting)
                    colofs.core.cbw.WRITEBACK_MIN_RUN = 0 if kick == "kick" else min_run
                    colofs.core.cbw.WRITEBACK_EVERY = every if kick in ("kick", "now") else 1 << 62
                    tracked = name.startswith("tracked")
                    res = [int(t[3:]) * MiB for t in name.split() if t.startswith("res")]
                    tracking.retained.resident_limit = 1 << 62 if "nospill" in name else res[0] if res else limit
                    vm.forward = tracking if tracked else None
                    us, wall, peak = await one(disk, tracking if tracked else None, args.writes, size, args.ack,
                                               args.checkpoint * MiB // 4096, rep)
                    if not tracked:  # writes untracked: the log restarts after them
                        tracking.retained.reset(vm.state.last_applied + 1)
                        tracking.acknowledged(vm.state.last_applied)
                    else:
                        tracking.checkpoint_confirmed(vm.state.last_applied)
                    results.setdefault(name, []).append((us, wall))
                    peaks.setdefault(name, []).append(peak)
            nursery.cancel_scope.cancel()
        colofs.core.cbw.WRITEBACK_EVERY, colofs.core.cbw.WRITEBACK_MIN_RUN = every, min_run
        vm.forward = None
        for name, v in results.items():
            cpu, wall = [x[0] for x in v], [x[1] for x in v]
            print(f"{name:22s} CPU {statistics.median(cpu):6.1f} us/write [{min(cpu):.1f}-{max(cpu):.1f}]   "
                  f"wall {statistics.median(wall):6.1f} us/write [{min(wall):.1f}-{max(wall):.1f}]   "
                  f"retained resident peak {max(peaks[name]) / MiB:.1f} MiB")
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"process peak RSS {hwm:.1f} MiB")
        await store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--size", type=int, default=256, help="disk MiB (default 256)")
    ap.add_argument("--writes", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ack", type=int, default=64, help="writes per acknowledgement (a batch)")
    ap.add_argument("--variants", default=VARIANTS, help=f"comma-separated (default {VARIANTS!r})")
    ap.add_argument("--checkpoint", type=int, default=64, help="MiB written between confirmed checkpoints")
    trio.run(main_async, ap.parse_args())


if __name__ == "__main__":
    main()
