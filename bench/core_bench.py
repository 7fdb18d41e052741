"""Speed of the replicated-disk core beside raw file I/O on the same filesystem, in one run.

Prints MB/s for apply_primary (1 MiB and 4 KiB writes), SVM reads and
writes, the time of a checkpoint with 64 MiB buffered and of a failover
commit with 256 MiB buffered, the loop-versus-thread cost of a 4 KiB read,
and the peak RSS. Every colofs row has a raw-file row measured the same way
next to it. Usage: ``python bench/core_bench.py [--dir DIR] [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable

import trio

from colofs.core import PrimaryWrite, Store
from colofs.core.ioctx import IOContext

MiB = 1 << 20
DISK = 1 << 30


def rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e6:9.1f} MB/s"


def row(name: str, value: str, ref: str = "", ratio: float | None = None) -> None:
    r = f"{ratio:6.2f}" if ratio is not None else ""
    print(f"{name:<44} {value:>16} {ref:>16} {r:>7}", flush=True)


def raw_write(path: str, total: int, size: int, sync_every: int, rng: random.Random, randoff: bool) -> float:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, DISK)
    buf = rng.randbytes(size)
    t = time.perf_counter()
    done = 0
    since = 0
    while done < total:
        off = rng.randrange(0, DISK // size) * size if randoff else done
        os.pwrite(fd, buf, off)
        done += size
        since += size
        if sync_every and since >= sync_every:
            os.fdatasync(fd)
            since = 0
    os.fdatasync(fd)
    el = time.perf_counter() - t
    os.close(fd)
    return el


def raw_read(path: str, total: int, size: int, rng: random.Random, randoff: bool) -> float:
    fd = os.open(path, os.O_RDONLY)
    t = time.perf_counter()
    done = 0
    while done < total:
        off = rng.randrange(0, total // size) * size if randoff else done
        os.pread(fd, size, off)
        done += size
    el = time.perf_counter() - t
    os.close(fd)
    return el


async def timed(fn: Callable[[], Awaitable[object]]) -> float:
    t = time.perf_counter()
    await fn()
    return time.perf_counter() - t


async def main(workdir: str, quick: bool) -> None:
    scale = 4 if quick else 1
    rng = random.Random(7)
    raw = os.path.join(workdir, "raw.img")
    store = await Store.open(os.path.join(workdir, "store"), role="secondary", create=True)
    disk = await store.create_disk("vm", "d", DISK)
    vm = store.vm("vm")
    seq = 0
    print(f"{'measurement':<44} {'colofs':>16} {'raw file':>16} {'ratio':>7}")

    # apply_primary, 1 MiB writes in batches of 4 (one group commit per 4 MiB), hidden filling.
    total = 256 * MiB // scale
    payload = rng.randbytes(MiB)

    async def apply_seq() -> None:
        nonlocal seq
        for off in range(0, total, 4 * MiB):
            writes = [PrimaryWrite("d", off + i * MiB, payload) for i in range(4)]
            seq = await vm.apply_primary(seq + 1, writes)

    el = await timed(apply_seq)
    ref = raw_write(raw, total, MiB, 4 * MiB, rng, False)
    row("apply_primary 1 MiB seq (fsync/4 MiB)", rate(total, el), rate(total, ref), ref / el)
    await vm.checkpoint(seq)

    # apply_primary, 4 KiB random writes in batches of 256 (1 MiB per group commit).
    total = 64 * MiB // scale
    small = rng.randbytes(4096)

    async def apply_rand() -> None:
        nonlocal seq
        for _ in range(total // MiB):
            writes = [PrimaryWrite("d", rng.randrange(0, DISK // 4096) * 4096, small) for _ in range(256)]
            seq = await vm.apply_primary(seq + 1, writes)

    el = await timed(apply_rand)
    ref = raw_write(raw, total, 4096, MiB, rng, True)
    row("apply_primary 4 KiB random (fsync/1 MiB)", rate(total, el), rate(total, ref), ref / el)
    await vm.checkpoint(seq)

    # SVM writes and reads (page cache warm), against pwrite/pread of the raw file.
    for size, total, randoff in [(MiB, 256 * MiB // scale, False), (4096, 32 * MiB // scale, True)]:
        buf = rng.randbytes(size)
        offs = [
            (rng.randrange(0, DISK // size) * size if randoff else i * size) for i in range(total // size)
        ]

        async def svm_w(buf: bytes = buf, offs: list[int] = offs) -> None:
            for o in offs:
                await disk.write(o, buf)

        async def svm_r(size: int = size, offs: list[int] = offs) -> None:
            for o in offs:
                await disk.read(o, size)

        label = "1 MiB seq" if size == MiB else "4 KiB random"
        el = await timed(svm_w)
        ref = raw_write(raw, total, size, 0, random.Random(1), randoff)
        row(f"svm_write {label}", rate(total, el), rate(total, ref), ref / el)
        el = await timed(svm_r)
        ref = raw_read(raw, total, size, random.Random(1), randoff)
        row(f"svm_read {label}", rate(total, el), rate(total, ref), ref / el)
        await vm.checkpoint(seq)

    # Checkpoint with 64 MiB buffered: 32 MiB hidden + 32 MiB active.
    async def fill(hidden_mib: int, active_mib: int) -> None:
        nonlocal seq
        for off in range(0, hidden_mib * MiB, 4 * MiB):
            seq = await vm.apply_primary(seq + 1, [PrimaryWrite("d", off + i * MiB, payload) for i in range(4)])
        base = 512 * MiB
        for off in range(0, active_mib * MiB, MiB):
            await disk.write(base + off, payload)

    await fill(32, 32)
    el = await timed(lambda: vm.checkpoint(seq))
    row("checkpoint, 64 MiB buffered", f"{el * 1000:9.1f} ms", "", None)

    # Failover commit with 256 MiB buffered: 128 MiB hidden + 128 MiB active.
    await fill(128 // scale, 128 // scale)
    el = await timed(vm.failover)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    src = os.path.join(workdir, "copy-src")
    with open(src, "wb") as f:
        for _ in range(256 // scale):
            f.write(payload)
    t = time.perf_counter()
    shutil.copyfile(src, os.path.join(workdir, "copy-dst"))
    fd = os.open(os.path.join(workdir, "copy-dst"), os.O_RDONLY)
    os.fdatasync(fd)
    os.close(fd)
    ref = time.perf_counter() - t
    row(f"failover commit, {256 // scale} MiB buffered", f"{el * 1000:9.1f} ms", f"{ref * 1000:9.1f} ms cp", ref / el)

    # The read policy: a 4 KiB page-cache hit on the loop versus in a worker thread.
    io = IOContext()  # what a store hands its disks: the read policy and the worker pool
    fd = os.open(raw, os.O_RDONLY)
    buf = bytearray(4096)
    mv = memoryview(buf)
    os.pread(fd, 4096, 0)
    n = 2000
    t = time.perf_counter()
    for _ in range(n):
        await io.read_into(fd, mv, 0)
    loop_us = (time.perf_counter() - t) / n * 1e6
    t = time.perf_counter()
    for _ in range(n):
        await trio.to_thread.run_sync(os.preadv, fd, [mv], 0)
    thread_us = (time.perf_counter() - t) / n * 1e6
    row("4 KiB cached read: loop (RWF_NOWAIT)", f"{loop_us:9.1f} us", f"{thread_us:9.1f} us thr", thread_us / loop_us)

    # The worker pool that replaced trio.to_thread for file I/O, one call at a time and 16 at once.
    t = time.perf_counter()
    for _ in range(n):
        await io.pool.run(os.preadv, fd, [mv], 0)
    pool_us = (time.perf_counter() - t) / n * 1e6
    row("4 KiB cached read: pool vs to_thread", f"{pool_us:9.1f} us", f"{thread_us:9.1f} us thr", thread_us / pool_us)

    async def many(call: Callable[..., Awaitable[object]]) -> float:
        bufs = [memoryview(bytearray(4096)) for _ in range(16)]

        async def one(b: memoryview) -> None:
            for _ in range(n // 16):
                await call(os.preadv, fd, [b], 0)

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for b in bufs:
                nursery.start_soon(one, b)
        return (time.perf_counter() - t0) / n * 1e6

    pool16 = await many(io.pool.run)
    thread16 = await many(trio.to_thread.run_sync)
    os.close(fd)
    io.close()
    row("4 KiB cached read, 16 at once: pool vs to_thread", f"{pool16:9.1f} us", f"{thread16:9.1f} us thr",
        thread16 / pool16)

    await store.close()
    row("peak RSS through the failover", f"{rss:9.1f} MiB")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one under /var/tmp)")
    ap.add_argument("--quick", action="store_true", help="a quarter of the sizes")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="colofs-bench-", dir=args.dir or "/var/tmp")
    try:
        trio.run(main, work, args.quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)
