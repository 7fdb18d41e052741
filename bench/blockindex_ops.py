#!/usr/bin/env python3
"""What a log's block map costs: bytes per block and CPU per operation, ``BlockIndex`` against two dicts.

Two dicts (block -> offset, block -> digest) are what a write-once log held
before ``colofs.core.blockindex``. Bytes are what ``tracemalloc`` sees held
once a map is built (blocks spread over a 1 TiB disk, and a sequential run);
CPU is the process's (``time.process_time``) per operation, each kind
measured in turn within one round, median of ``--rounds``.

    .venv/bin/python bench/blockindex_ops.py [--blocks 131072] [--rounds 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `colofs` importable

from colofs.core.blockindex import BlockIndex

BS = 4096


def held(build: Callable[[], object]) -> tuple[object, int]:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = build()
        return kept, tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=131072)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    n = a.blocks
    rng = random.Random(1)
    spread = rng.sample(range(1 << 28), n)
    digests = [rng.getrandbits(64) for _ in range(n)]

    def dicts(blocks: list[int], step: int) -> tuple[dict[int, int], dict[int, int]]:
        m: dict[int, int] = {}
        s: dict[int, int] = {}
        for i in range(0, n, step):
            part = [b + 0 for b in blocks[i : i + step]]  # fresh int objects, as decoded from the wire
            m.update(zip(part, range(BS * i, BS * (i + step), BS), strict=True))
            s.update(zip(part, [d ^ 1 for d in digests[i : i + step]], strict=True))
        return m, s

    def index(blocks: list[int], step: int) -> BlockIndex:
        ix = BlockIndex(keep_digests=True, unit=BS)
        for i in range(0, n, step):
            ix.put_many(blocks[i : i + step], range(BS * i, BS * (i + step), BS), digests[i : i + step])
        return ix

    seq = list(range(n))
    print(f"{n} blocks; bytes held per block (tracemalloc):")
    for name, blocks, step in (("spread over 1 TiB, 16 per batch", spread, 16), ("sequential, 256 per batch", seq, 256)):
        _, d = held(lambda blocks=blocks, step=step: dicts(blocks, step))
        _, x = held(lambda blocks=blocks, step=step: index(blocks, step))
        print(f"  {name:34s} dicts {d / n:6.1f}  BlockIndex {x / n:5.1f}")

    times: dict[str, list[float]] = {}

    def timed(label: str, fn: Callable[[], object], count: int) -> object:
        t0 = time.process_time()
        out = fn()
        times.setdefault(label, []).append((time.process_time() - t0) * 1e9 / count)
        return out

    probes = spread[: min(n, 50000)]
    firsts = range(0, n - 256, 997)
    for _ in range(a.rounds):
        m, _s = timed("insert, 16 spread blocks per batch: dicts", lambda: dicts(spread, 16), n)
        ix = timed("insert, 16 spread blocks per batch: BlockIndex", lambda: index(spread, 16), n)
        timed("get: dict", lambda m=m: [m.get(b) for b in probes], len(probes))
        timed("get: BlockIndex", lambda ix=ix: [ix.get(b) for b in probes], len(probes))
        timed("b in map: dict", lambda m=m: [b in m for b in probes], len(probes))
        timed("b in map: BlockIndex", lambda ix=ix: [b in ix for b in probes], len(probes))
        ms, _ = timed("insert, 256 consecutive blocks per batch: dicts", lambda: dicts(seq, 256), n)
        ixs = timed("insert, 256 consecutive blocks per batch: BlockIndex", lambda: index(seq, 256), n)

        def dict_runs(ms: dict[int, int] = ms) -> None:
            for f in firsts:
                start = ms.get(f)
                _ = list(map(ms.get, range(f, f + 256))) == list(range(start, start + 256 * BS, BS))

        timed("is 1 MiB (256 blocks) one run: dict", dict_runs, len(firsts))
        timed("is 1 MiB (256 blocks) one run: BlockIndex",
              lambda ixs=ixs: [ixs.run_at(f, 256, BS) for f in firsts], len(firsts))
    print(f"CPU ns per operation (per block for inserts), median of {a.rounds}:")
    for label, vals in times.items():
        print(f"  {label:56s} {statistics.median(vals):9.0f}")


if __name__ == "__main__":
    main()
