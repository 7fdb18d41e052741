#!/usr/bin/env python3
"""CPU per MiB the core spends applying primary writes over data, in this process (no threads' start-up or sockets).

A 256 MiB secondary disk is written once and checkpointed, then 128 MiB of
1 MiB sequential writes and 128 MiB of 4 KiB random writes (into the other
half, so most blocks are saved into hidden first) are applied through
``VM.apply_primary`` in 4 MiB groups; ``time.process_time`` (threads
included) per MiB of each. Give a tree's root to measure that tree's
``colofs`` (compare two trees by alternating runs):

    .venv/bin/python bench/ingest_cpu.py [TREE]
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parent.parent))

from colofs.core import PrimaryWrite, Store

MiB = 1 << 20


async def main() -> None:
    work = tempfile.mkdtemp(dir="/var/tmp", prefix="colofs-ingest-cpu-")
    try:
        store = await Store.open(os.path.join(work, "s"), role="secondary", create=True)
        await store.create_disk("vm", "d", 256 * MiB)
        vm = store.vm("vm")
        chunk = os.urandom(MiB)
        seq = 0
        for g in range(0, 256, 4):  # every block written once, then checkpointed: "over data"
            await vm.apply_primary(seq + 1, [PrimaryWrite("d", (g + k) * MiB, chunk) for k in range(4)])
            seq += 4
        await vm.checkpoint()
        out = []
        rng = random.Random(3)
        for name, size, count in (("seq 1M", MiB, 128), ("rand 4K", 4096, 32768)):
            if size == MiB:
                offs = [i * MiB for i in range(count)]
            else:
                offs = [rng.randrange(128 * MiB // 4096, 256 * MiB // 4096) * 4096 for _ in range(count)]
            per = (4 * MiB) // size
            t0 = time.process_time()
            for i in range(0, count, per):
                writes = [PrimaryWrite("d", o, chunk[:size]) for o in offs[i : i + per]]
                await vm.apply_primary(seq + 1, writes)
                seq += len(writes)
            out.append(f"{name} {(time.process_time() - t0) * 1000 / (count * size / MiB):.2f} ms/MiB")
        print(", ".join(out))
        await store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    trio.run(main)
