#!/usr/bin/env python3
"""The secondary's memory under ingest: peak RSS, CPU and rate of a secondary process fed by a primary.

The secondary runs in a child process (its own loop and core, as the daemon
does) on 127.0.0.1, with the replication budgets given on the command line
(``--receive-bytes``, ``--merge``; the defaults are ``ReplConfig``'s); this
process is the primary, in ``async`` mode (writers run ahead, so the
secondary's queue fills: the case that peaks). Phases, on one 512 MiB disk:

* ``seq fresh``: 1 MiB sequential writes into the fresh disk (base holes);
* ``seq data``: the same again after a checkpoint (every block saved to hidden first);
* ``rand data``: 4 KiB random writes from 16 writers over the data.

For each phase: the secondary's peak RSS (``VmHWM``, reset before the phase
through ``/proc/PID/clear_refs``), its CPU seconds (user + system, threads
included: the figure a shared machine inflates least) per MiB, and the rate
until the secondary acknowledged the last write. ``--trace`` has the child
keep a ``tracemalloc`` snapshot of its largest traced peak and print the top
allocation sites at the end (slow: for finding what holds memory, not for rates).

The child's glibc is set as a VM worker's is (one malloc arena) unless
``--arenas`` says otherwise; ``--mmap-threshold`` pins the size from which
glibc maps buffers of their own (freed at once) instead of its dynamic one.

    .venv/bin/python bench/secondary_memory.py [--receive-bytes MiB] [--merge MiB] [--trace] [--repeat N]
        [--arenas N] [--mmap-threshold KiB]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from functools import partial

import trio

MiB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from colofs.core import Store  # noqa: E402
from colofs.repl import PrimaryReplicator, ReplConfig, serve_secondary  # noqa: E402
from colofs.workers.malloc import WORKER_ARENAS  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
DISK = 512 * MiB


def make_data(n: int, seed: int = 1) -> bytes:
    """Guest-like data: per 4 KiB, half random bytes, half a repeated record (lz4 saves about half)."""
    rng = random.Random(seed)
    parts = []
    for i in range(n // 4096):
        rec = f"record {i:08d} status=ok payload=".encode()
        parts.append(rng.randbytes(2048) + (rec * (2048 // len(rec) + 1))[:2048])
    return b"".join(parts)


def config(receive_mib: float | None, merge_mib: float | None) -> ReplConfig:
    cfg = ReplConfig()
    if receive_mib is not None:
        cfg = replace(cfg, receive_bytes=int(receive_mib * MiB))
    if merge_mib is not None:
        cfg = replace(cfg, apply_merge_bytes=int(merge_mib * MiB))
    return cfg


# -- the secondary process ------------------------------------------------------------------------


async def secondary_main(path: str, cfg: ReplConfig, trace: bool) -> None:
    syncs = [0]
    orig = os.fdatasync

    def counted(fd: int) -> None:
        orig(fd)
        syncs[0] += 1  # one int, written by the sync threads: a miscount by one is of no matter here

    os.fdatasync = counted
    store = await Store.open(path, role="secondary", create=True)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve_secondary, store, ("127.0.0.1", 0), None, config=cfg))
        print(f"ready {server.port}", flush=True)
        if trace:
            nursery.start_soon(_trace_peaks)
        # Each line on stdin asks for the counters: fdatasync calls, and the session's applies and batches.
        stdin = trio.lowlevel.FdStream(os.dup(0))
        buf = b""
        while True:
            chunk = await stdin.receive_some()
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                _, buf = buf.split(b"\n", 1)
                s = server.sessions.get("vm")
                applies, batches = (s.stats["applies"], s.stats["batches"]) if s is not None else (0, 0)
                print(f"stats {syncs[0]} {applies} {batches}", flush=True)


async def _trace_peaks() -> None:
    """Keep a snapshot at the highest traced size seen (sampled every 20 ms); print its top sites on SIGTERM."""
    import signal
    import tracemalloc

    tracemalloc.start(8)
    best = 0
    snap: tracemalloc.Snapshot | None = None
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            async def stop() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return
            nursery.start_soon(stop)
            while True:
                cur, _ = tracemalloc.get_traced_memory()
                if cur > best * 1.05:
                    best = cur
                    snap = tracemalloc.take_snapshot()
                await trio.sleep(0.02)
    if snap is not None:
        print(f"traced peak sampled: {best / MiB:.1f} MiB", file=sys.stderr)
        for stat in snap.statistics("traceback")[:12]:
            print(f"{stat.size / MiB:8.1f} MiB {stat.count:6d} blocks", file=sys.stderr)
            for line in stat.traceback.format()[-8:]:
                print("    " + line, file=sys.stderr)
    sys.exit(0)


# -- this process: the primary ------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_hwm(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def reset_hwm(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


class Primary:
    def __init__(self, store: Store, repl: PrimaryReplicator, child: subprocess.Popen[bytes]) -> None:
        self.store = store
        self.repl = repl
        self.child = child.pid
        self.proc = child

    def counters(self) -> tuple[int, int, int]:
        """The secondary's fdatasync calls, applies and batches so far."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"\n")
        self.proc.stdin.flush()
        _, syncs, applies, batches = self.proc.stdout.readline().split()
        return int(syncs), int(applies), int(batches)

    async def caught_up(self) -> None:
        link = self.repl.links["vm"]
        vm = self.store.vm("vm")
        while not (link.state == "streaming" and link.acked >= vm.state.last_applied):
            await trio.sleep(0.005)

    async def phase(self, name: str, nbytes: int, work: object) -> str:
        await self.caught_up()
        await self.repl.link("vm").replicate_checkpoint(timeout=120)
        reset_hwm(self.child)
        c0 = proc_cpu(self.child)
        n0 = self.counters()
        t0 = time.perf_counter()
        await work()  # type: ignore[operator]
        await self.caught_up()
        took = time.perf_counter() - t0
        cpu = proc_cpu(self.child) - c0
        syncs, applies, batches = (b - a for a, b in zip(n0, self.counters(), strict=True))
        mib = nbytes / MiB
        return (f"{name:<10} peak RSS {proc_hwm(self.child):6.1f} MiB  cpu {cpu * 1000 / mib:5.2f} ms/MiB  "
                f"{nbytes / took / 1e6:7.1f} MB/s  fdatasync {syncs / mib:5.3f}/MiB  "
                f"{batches / max(applies, 1):5.2f} batches/apply  {mib / max(applies, 1):6.3f} MiB/apply")


async def primary_main(args: argparse.Namespace, port: int, work: str, child: subprocess.Popen[bytes]) -> list[str]:
    data = make_data(64 * MiB)
    store = await Store.open(os.path.join(work, "primary"), role="primary", create=True)
    await store.create_disk("vm", "d0", DISK)
    disk = store.vm("vm").disk("d0")
    rng = random.Random(5)
    count = args.writes
    offs = [rng.randrange(DISK // 4096) * 4096 for _ in range(count)]

    async def seq() -> None:
        for off in range(0, DISK, MiB):
            await disk.write(off, data[off % len(data) : off % len(data) + MiB])

    async def rand() -> None:
        async def writer(k: int) -> None:
            for i in range(k, count, 16):
                j = i % 16384
                await disk.write(offs[i], data[j * 4096 : (j + 1) * 4096])

        async with trio.open_nursery() as n:
            for k in range(16):
                n.start_soon(writer, k)

    out = []
    async with trio.open_nursery() as nursery:
        repl = PrimaryReplicator(store, ("127.0.0.1", port), None, config=ReplConfig())
        await nursery.start(repl.run)
        p = Primary(store, repl, child)
        out.append(await p.phase("seq fresh", DISK, seq))
        out.append(await p.phase("seq data", DISK, seq))
        out.append(await p.phase("rand data", count * 4096, rand))
        nursery.cancel_scope.cancel()
    await store.close()
    return out


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", help="where to put the stores (default: a temporary directory)")
    ap.add_argument("--receive-bytes", type=float, help="the secondary's receive_bytes, MiB (default: ReplConfig's)")
    ap.add_argument("--merge", type=float, help="the secondary's apply_merge_bytes, MiB (default: ReplConfig's)")
    ap.add_argument("--writes", type=int, default=40000, help="4 KiB random writes in the rand phase")
    ap.add_argument("--repeat", type=int, default=1, help="runs, each with a fresh pair")
    ap.add_argument("--trace", action="store_true", help="tracemalloc in the secondary: its top sites at the peak")
    ap.add_argument("--arenas", type=int, default=WORKER_ARENAS,
                    help="glibc malloc arenas of the secondary (default: the VM worker's cap; 0: glibc's default)")
    ap.add_argument("--mmap-threshold", type=int, metavar="KiB",
                    help="pin glibc's mmap threshold in the secondary (default: glibc's dynamic one)")
    ap.add_argument("--secondary", help=argparse.SUPPRESS)
    args = ap.parse_args()
    cfg = config(args.receive_bytes, args.merge)
    if args.secondary:
        trio.run(secondary_main, args.secondary, cfg, args.trace)
        return
    env = dict(os.environ)  # glibc reads these at the child's start, as the zygote's mallopt sets them for a worker
    if args.arenas:
        env["MALLOC_ARENA_MAX"] = str(args.arenas)
    if args.mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold * 1024)
    print(f"secondary: receive_bytes {cfg.receive_bytes / MiB:g} MiB, apply_merge_bytes "
          f"{cfg.apply_merge_bytes / MiB:g} MiB, malloc arenas {args.arenas or 'default'}, mmap threshold "
          f"{f'{args.mmap_threshold} KiB' if args.mmap_threshold is not None else 'dynamic'}"
          f"{', tracemalloc on' if args.trace else ''}", flush=True)
    for _ in range(args.repeat):
        work = tempfile.mkdtemp(prefix="colofs-secmem-", dir=args.dir)
        argv = [sys.executable, os.path.abspath(__file__), "--secondary", os.path.join(work, "secondary")]
        for opt, val in (("--receive-bytes", args.receive_bytes), ("--merge", args.merge)):
            if val is not None:
                argv += [opt, str(val)]
        if args.trace:
            argv.append("--trace")
        child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, env=env)
        try:
            line = child.stdout.readline().split() if child.stdout else []
            if not line or line[0] != b"ready":
                raise SystemExit("the secondary process did not start")
            print(f"idle      peak RSS {proc_hwm(child.pid):6.1f} MiB (started, nothing received)", flush=True)
            for row in trio.run(primary_main, args, int(line[1]), work, child):
                print(row, flush=True)
        finally:
            child.terminate()
            child.wait(timeout=60)
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
