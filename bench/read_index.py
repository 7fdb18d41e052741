#!/usr/bin/env python3
"""CPU per read of ``Disk.read`` when the blocks sit in hidden or active: what the layers' block maps cost a read.

A secondary disk whose hidden log holds 128 MiB (written by the primary
after a checkpoint: every block saved first, with its digest) and whose
active log holds 4 MiB of the VM's own writes. Reads of 4 KiB and 1 MiB
from hidden (each block's digest checked), from active, and from base
beside them (no layer holds the range), page cache warm. Run it with two
trees' ``colofs`` (each copy of this script imports its own tree) and
compare the CPU per read in the same invocation order.

    .venv/bin/python bench/read_index.py [--reads 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `bench` and `colofs` importable

from bench.read_core import timed_reads
from colofs.core import Store

SIZE = 256 << 20
HIDDEN = 128 << 20
BS = 4096
MiB = 1 << 20


async def main(reads: int, rounds: int, where: str) -> None:
    work = tempfile.mkdtemp(prefix="colofs-read-index-", dir=where)
    try:
        store = await Store.open(os.path.join(work, "store"), role="secondary", create=True)
        try:
            disk = await store.create_disk("vm", "d", SIZE)
            chunk = os.urandom(MiB)
            await disk.apply([(off, chunk) for off in range(0, SIZE, MiB)])
            await store.vm("vm").checkpoint()
            await disk.apply([(off, chunk[::-1]) for off in range(0, HIDDEN, MiB)])  # saved into hidden first
            for off in range(HIDDEN, HIDDEN + (4 << 20), MiB):  # the VM's own writes: active
                await disk.write(off, chunk)
            rng = random.Random(7)
            cases = {
                "4K hidden": ([rng.randrange(HIDDEN // BS) * BS for _ in range(reads)], BS),
                "4K active": ([HIDDEN + rng.randrange((4 << 20) // BS) * BS for _ in range(reads)], BS),
                "4K base": ([SIZE // 2 + rng.randrange(SIZE // 4 // BS) * BS for _ in range(reads)], BS),
                "1M hidden": ([rng.randrange(HIDDEN // MiB - 1) * MiB for _ in range(reads // 20)], MiB),
                "1M hidden, unaligned": ([rng.randrange(HIDDEN // BS - 512) * BS for _ in range(reads // 20)], MiB),
                "1M active": ([HIDDEN + rng.randrange(3) * MiB for _ in range(reads // 20)], MiB),
                "1M base": ([SIZE // 2 + rng.randrange(SIZE // 4 // MiB) * MiB for _ in range(reads // 20)], MiB),
            }
            for off in range(0, SIZE, MiB):  # warm the page cache
                os.preadv(disk.base_fd, [bytearray(MiB)], off)
            await timed_reads(disk, cases["1M hidden"][0], MiB)
            seen: dict[str, list[float]] = {name: [] for name in cases}
            for _ in range(rounds):
                for name, (offsets, length) in cases.items():
                    seen[name].append(await timed_reads(disk, offsets, length))
            print(f"hidden {len(disk.hidden)} blocks, active {len(disk.active)} blocks; median of {rounds} rounds")
            for name, vals in seen.items():
                print(f"{name:22s} {statistics.median(vals):8.1f} us CPU/read  [{min(vals):.1f}-{max(vals):.1f}]")
        finally:
            await store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reads", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp")
    a = ap.parse_args()
    trio.run(main, a.reads, a.rounds, a.dir)
