#!/usr/bin/env python3
"""CPU per 4K read of the core call the FUSE and NBD read handlers make (``Disk.read``), page cache warm.

Beside it the same offsets read with one ``os.preadv`` from base: the
difference is what colofs's Python adds per read, before FUSE or NBD add
theirs. Three layer states of a secondary disk: empty layers (just after a
checkpoint, the benchmark's case), layers holding blocks elsewhere on the
disk (the read still comes from base), and every read landing in active.
With ``--profile`` the first state is run under cProfile and its top
functions printed.

    .venv/bin/python bench/read_core.py [--reads 50000] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `colofs` importable

from colofs.core import Store
from colofs.core.disk import Disk

SIZE = 256 << 20
BS = 4096


async def timed_reads(disk: Disk, offsets: list[int], length: int = BS) -> float:
    """CPU µs per ``Disk.read`` of ``length`` bytes at each offset (bench/read_index.py uses it too)."""
    t0 = time.process_time()
    for off in offsets:
        await disk.read(off, length)
    return (time.process_time() - t0) * 1e6 / len(offsets)


async def main(reads: int, profile: bool, where: str) -> None:
    work = tempfile.mkdtemp(prefix="colofs-read-core-", dir=where)
    try:
        store = await Store.open(os.path.join(work, "store"), role="secondary", create=True)
        try:
            disk = await store.create_disk("vm", "d", SIZE)
            chunk = os.urandom(1 << 20)
            await disk.apply([(off, chunk) for off in range(0, SIZE, 1 << 20)])
            await store.vm("vm").checkpoint()
            rng = random.Random(7)
            offsets = [rng.randrange(SIZE // BS // 2) * BS for _ in range(reads)]  # the first half
            buf = bytearray(BS)
            for off in range(0, SIZE, 1 << 20):  # warm the page cache
                os.preadv(disk.base_fd, [bytearray(1 << 20)], off)
            t0 = time.process_time()
            for off in offsets:
                os.preadv(disk.base_fd, [buf], off)
            raw = (time.process_time() - t0) * 1e6 / reads
            empty = await timed_reads(disk, offsets)
            if profile:
                prof = cProfile.Profile()
                prof.enable()
                await timed_reads(disk, offsets)
                prof.disable()
            for off in range(SIZE // 2, SIZE // 2 + (4 << 20), BS):  # active blocks in the other half
                await disk.write(off, b"a" * BS)
            apart = await timed_reads(disk, offsets)
            act = [SIZE // 2 + (o % (4 << 20)) for o in offsets]
            active = await timed_reads(disk, act)
            print(f"os.preadv 4K from base:              {raw:6.1f} us CPU/read")
            print(f"Disk.read, layers empty:             {empty:6.1f} us  (+{empty - raw:.1f})")
            print(f"Disk.read, layers hold other blocks: {apart:6.1f} us  (+{apart - raw:.1f})")
            print(f"Disk.read, every read in active:     {active:6.1f} us  (+{active - raw:.1f})")
            if profile:
                print("\ncProfile, layers empty (tottime):")
                pstats.Stats(prof).sort_stats("tottime").print_stats(12)
        finally:
            await store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reads", type=int, default=50000)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--dir", default="/var/tmp")
    a = ap.parse_args()
    trio.run(main, a.reads, a.profile, a.dir)
