#!/usr/bin/env python3
"""Replication throughput beside raw file writes, in one run: primary and secondary as two processes.

The secondary runs in a child process (its own event loop and core, as on a
real pair) serving a fresh store on 127.0.0.1; this process is the primary.
Workloads, each on a freshly checkpointed pair (so the secondary's hidden
buffer fills from empty, copy-before-write of every first-touched block):

* 1 GiB sequential, 1 MiB writes, one writer;
* 4 KiB random writes, 16 concurrent writers (like fio iodepth 16);

in ``async`` mode (a write completes on the primary disk) and ``sync`` mode
(once the secondary acknowledged it). "written" is the rate the writers
saw; "replicated" runs until the secondary has acknowledged the last write.
Beside them: a raw file written the same way, and the colofs primary with
replication off. Then the lz4 ratio seen on the wire and the checkpoint
latency with 64 MiB in the secondary's hidden buffer (median of 3).

    .venv/bin/python bench/repl_bench.py [--dir DIR] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial

import trio

MiB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from colofs.core import Store  # noqa: E402
from colofs.repl import PrimaryReplicator, ReplConfig, serve_secondary  # noqa: E402


def make_data(n: int, seed: int = 1) -> bytes:
    """Guest-like data: per 4 KiB, half random bytes, half a repeated record (lz4 saves ~half)."""
    rng = random.Random(seed)
    parts = []
    for i in range(n // 4096):
        rec = f"record {i:08d} status=ok payload=".encode()
        parts.append(rng.randbytes(2048) + (rec * (2048 // len(rec) + 1))[:2048])
    return b"".join(parts)


def row(name: str, value: str, ref: str = "", note: str = "") -> None:
    print(f"{name:<46} {value:>18} {ref:>18}  {note}", flush=True)


# -- the secondary process -----------------------------------------------------------------


async def secondary_main(path: str) -> None:
    store = await Store.open(path, role="secondary", create=True)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve_secondary, store, ("127.0.0.1", 0), None))
        print(f"ready {server.port}", flush=True)


# -- raw baselines -----------------------------------------------------------------------------


def raw_seq(path: str, total: int, data: bytes) -> float:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t0 = time.perf_counter()
        for off in range(0, total, MiB):
            os.pwrite(fd, data[off % len(data) : off % len(data) + MiB], off)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def raw_random(path: str, size: int, count: int, data: bytes, rng: random.Random) -> float:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        offs = [rng.randrange(size // 4096) * 4096 for _ in range(count)]
        t0 = time.perf_counter()
        for i, off in enumerate(offs):
            os.pwrite(fd, data[(i % 256) * 4096 : (i % 256 + 1) * 4096], off)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


# -- the primary ---------------------------------------------------------------------------------


class Bench:
    def __init__(self, root: str, port: int, disk_size: int) -> None:
        self.root = root
        self.port = port
        self.disk_size = disk_size
        self.store: Store | None = None
        self.repl: PrimaryReplicator | None = None

    async def seq(self, vm: str, total: int, data: bytes) -> tuple[float, float]:
        disk = self.store.vm(vm).disk("d0")
        t0 = time.perf_counter()
        for off in range(0, total, MiB):
            await disk.write(off, data[off % len(data) : off % len(data) + MiB])
        written = time.perf_counter() - t0
        await self.caught_up(vm)
        return written, time.perf_counter() - t0

    async def rand(self, vm: str, count: int, data: bytes, rng: random.Random, depth: int = 16) -> tuple[float, float]:
        disk = self.store.vm(vm).disk("d0")
        nblocks = self.disk_size // 4096
        offs = [rng.randrange(nblocks) * 4096 for _ in range(count)]

        async def writer(k: int) -> None:
            for i in range(k, count, depth):
                await disk.write(offs[i], data[(i % 256) * 4096 : (i % 256 + 1) * 4096])

        t0 = time.perf_counter()
        async with trio.open_nursery() as n:
            for k in range(depth):
                n.start_soon(writer, k)
        written = time.perf_counter() - t0
        await self.caught_up(vm)
        return written, time.perf_counter() - t0

    async def caught_up(self, vm: str) -> None:
        if self.repl is None or vm not in self.repl.links:
            return
        link = self.repl.links[vm]
        pvm = self.store.vm(vm)
        while not (link.state == "streaming" and link.acked >= pvm.state.last_applied):
            await trio.sleep(0.002)


async def primary_main(args: argparse.Namespace, port: int, work: str) -> None:
    total = (64 if args.quick else 1024) * MiB
    count = 4000 if args.quick else 30000
    disk_size = total
    data = make_data(64 * MiB)
    rng = random.Random(5)

    t = raw_seq(os.path.join(work, "raw.img"), total, data)
    raw_seq_rate = total / t / 1e6
    t = raw_random(os.path.join(work, "raw.img"), disk_size, count, data, rng)
    raw_iops = count / t
    os.unlink(os.path.join(work, "raw.img"))

    # Replication off: the core alone, same writes, in a store of its own.
    solo = await Store.open(os.path.join(work, "solo"), role="primary", create=True)
    b = Bench(work, port, disk_size)
    b.store = solo
    await solo.create_disk("solo", "d0", disk_size)
    w, _ = await b.seq("solo", total, data)
    solo_seq = total / w / 1e6
    w, _ = await b.rand("solo", count, data, rng)
    solo_iops = count / w
    await solo.close()
    shutil.rmtree(os.path.join(work, "solo"))

    store = await Store.open(os.path.join(work, "primary"), role="primary", create=True)
    b.store = store
    for vm in ("async", "sync"):
        await store.create_disk(vm, "d0", disk_size)

    print(f"colofs replication bench: {total // MiB} MiB sequential (1 MiB writes), {count} random 4 KiB "
          f"writes at depth 16; {os.cpu_count()} CPUs; secondary in a second process on 127.0.0.1\n")
    row("workload", "colofs", "raw file", "")
    row("primary only (no replication), seq 1M", f"{solo_seq:9.1f} MB/s", f"{raw_seq_rate:9.1f} MB/s")
    row("primary only (no replication), rand 4K", f"{solo_iops:9.0f} IOPS", f"{raw_iops:9.0f} IOPS")

    cfg = ReplConfig()
    async with trio.open_nursery() as nursery:
        b.repl = PrimaryReplicator(store, ("127.0.0.1", port), None, config=cfg)
        await nursery.start(b.repl.run)
        for vm in ("async", "sync"):
            if vm == "sync":
                await b.repl.set_mode(vm, "sync")
            await b.caught_up(vm)  # the initial (full, digest-compared) sync of an empty disk
            await b.repl.link(vm).replicate_checkpoint()
            w, e = await b.seq(vm, total, data)
            row(f"{vm}: seq 1M written", f"{total / w / 1e6:9.1f} MB/s", f"{raw_seq_rate:9.1f} MB/s")
            row(f"{vm}: seq 1M replicated (acked by secondary)", f"{total / e / 1e6:9.1f} MB/s", "",
                f"hidden buffer filled to {total // MiB} MiB")
            await b.repl.link(vm).replicate_checkpoint(timeout=120)
            w, e = await b.rand(vm, count, data, rng)
            row(f"{vm}: rand 4K written", f"{count / w:9.0f} IOPS", f"{raw_iops:9.0f} IOPS")
            row(f"{vm}: rand 4K replicated", f"{count / e:9.0f} IOPS", "")
            await b.repl.link(vm).replicate_checkpoint(timeout=120)
        st = b.repl.status("async")
        ratio = st["lz4_ratio"]
        row("lz4 ratio on the wire (wire/raw, async VM)", f"{ratio:9.3f}" if ratio else "n/a", "",
            "test data: half random, half repetitive")

        # Checkpoint latency: 64 MiB of primary writes buffered in the secondary's hidden layer.
        lat = []
        empty = []
        disk = store.vm("async").disk("d0")
        for r in range(3):
            t0 = time.perf_counter()
            res = await b.repl.link("async").replicate_checkpoint()
            empty.append(time.perf_counter() - t0)
            base = (r * 64 * MiB) % max(MiB, disk_size - 64 * MiB)
            for off in range(0, min(64 * MiB, disk_size), MiB):
                await disk.write(base + off, data[off : off + MiB])
            await b.caught_up("async")
            res = await b.repl.link("async").replicate_checkpoint()
            lat.append(res.latency_s)
        row("checkpoint, 64 MiB buffered (median of 3)", f"{statistics.median(lat) * 1e3:9.1f} ms", "")
        row("checkpoint, nothing buffered (median of 3)", f"{statistics.median(empty) * 1e3:9.1f} ms", "")
        nursery.cancel_scope.cancel()
    await store.close()


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", help="where to put the stores (default: a temporary directory)")
    ap.add_argument("--quick", action="store_true", help="64 MiB and 4000 writes: a smoke run")
    ap.add_argument("--secondary", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.secondary:
        trio.run(secondary_main, args.secondary)
        return
    work = tempfile.mkdtemp(prefix="colofs-repl-bench-", dir=args.dir)
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--secondary",
                              os.path.join(work, "secondary")], stdout=subprocess.PIPE, cwd=ROOT)
    try:
        line = child.stdout.readline().split()
        if not line or line[0] != b"ready":
            raise SystemExit("the secondary process did not start")
        trio.run(primary_main, args, int(line[1]), work)
    finally:
        child.terminate()
        child.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
