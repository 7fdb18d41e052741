"""What the per-block digests of write-once layers cost: hashing, appending, and reading back checked.

Prints xxh3 throughput (one call per 4 KiB block, as the layers hash), then
for a hidden layer holding 64 MiB: SVM reads served from it with the digest
check and with the check switched off (the same code path without the
hash), and apply_primary (copy-before-write into hidden, sync, commit
record, base) in MB/s. Usage: ``python bench/digest_bench.py [--dir DIR]``.
Runs against whatever ``colofs`` is importable, so an older tree can be
measured the same way (rows it cannot run are skipped).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time

import trio
import xxhash

from colofs.core import PrimaryWrite, Store

MiB = 1 << 20
BS = 4096
HIDDEN = 64 * MiB


def row(name: str, value: str) -> None:
    print(f"{name:<52} {value:>16}", flush=True)


def hash_rate() -> None:
    data = memoryview(random.Random(1).randbytes(64 * MiB))
    t = time.perf_counter()
    for i in range(0, len(data), BS):
        xxhash.xxh3_64_intdigest(data[i : i + BS])
    el = time.perf_counter() - t
    row("xxh3_64, one call per 4 KiB block", f"{len(data) / el / 1e9:8.2f} GB/s")
    t = time.perf_counter()
    xxhash.xxh3_64_intdigest(data)
    el = time.perf_counter() - t
    row("xxh3_64, one call over 64 MiB", f"{len(data) / el / 1e9:8.2f} GB/s")


async def layers(workdir: str) -> None:
    store = await Store.open(os.path.join(workdir, "store"), role="secondary", create=True)
    try:
        disk = await store.create_disk("vm", "d", 2 * HIDDEN)
        vm = store.vm("vm")
        rng = random.Random(2)
        payload = rng.randbytes(MiB)
        seq = 0
        for off in range(0, HIDDEN, 4 * MiB):
            seq = await vm.apply_primary(seq + 1, [PrimaryWrite("d", off + i * MiB, payload) for i in range(4)])
        await vm.checkpoint(seq)
        # Hidden fills with the checkpoint's blocks while base takes new ones: the timed apply.
        t = time.perf_counter()
        for off in range(0, HIDDEN, 4 * MiB):
            seq = await vm.apply_primary(seq + 1, [PrimaryWrite("d", off + i * MiB, payload[::-1])
                                                   for i in range(4)])
        el = time.perf_counter() - t
        row("apply_primary 1 MiB x4 per group, hidden filling", f"{HIDDEN / el / 1e6:8.1f} MB/s")
        sums = getattr(disk.hidden, "sums", None)
        for size, n in ((BS, 8192), (128 * 1024, 512)):
            offs = [rng.randrange(0, HIDDEN // size) * size for _ in range(n)]
            for checked in (True, False):
                if not checked and sums is None:
                    continue
                if sums is not None:
                    disk.hidden.sums = sums if checked else {}
                for o in offs[:64]:  # warm
                    await disk.read(o, size)
                t = time.perf_counter()
                for o in offs:
                    await disk.read(o, size)
                el = time.perf_counter() - t
                what = "checked" if sums is not None and checked else "unchecked"
                row(f"svm_read {size // 1024} KiB random from hidden, {what}",
                    f"{n * size / el / 1e6:8.1f} MB/s")
        if sums is not None:
            disk.hidden.sums = sums
    finally:
        store.abandon()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one under /var/tmp)")
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="colofs-digest-", dir=args.dir or "/var/tmp")
    try:
        hash_rate()
        trio.run(layers, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
