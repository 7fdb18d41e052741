"""A deterministic primary write stream for the crash test, and the child that applies it.

Run as ``python -m tests.core.crash_stream STORE SEED LAST_SEQ``: opens (and
recovers) the store, then applies the stream from where the VM stands, with
SVM writes in between and a checkpoint after every ``CHECKPOINT_EVERY``
writes, printing ``checkpoint N`` once each checkpoint returned and ``batch N`` after each batch
(and its checkpoint, if one was due), so a test can place its kill by the stream's progress.
"""

from __future__ import annotations

import random
import sys

import trio

from colofs.core import PrimaryWrite, Store

DISK_SIZE = 1 << 20
BLOCK = 4096
BATCH = 4
CHECKPOINT_EVERY = 20  # a multiple of BATCH: batch boundaries never straddle a checkpoint


def stream_write(seed: int, seq: int) -> PrimaryWrite:
    rng = random.Random(seed * 1_000_003 + seq)
    n = rng.choice([1, 100, 512, 4096, 5000, 20000, 65536])
    off = rng.randrange(0, DISK_SIZE - n + 1)
    data = rng.randbytes(n) if rng.random() < 0.5 else bytes([seq % 251 + 1]) * n
    return PrimaryWrite("disk0", off, data)


def primary_image(seed: int, upto: int) -> bytearray:
    img = bytearray(DISK_SIZE)
    for s in range(1, upto + 1):
        w = stream_write(seed, s)
        img[w.offset : w.offset + len(w.data)] = w.data
    return img


async def run(path: str, seed: int, last: int) -> None:
    store = await Store.open(path, role="secondary", create=True)
    if "vm" not in store.vms:
        await store.create_disk("vm", "disk0", DISK_SIZE, block_size=BLOCK)
    vm = store.vm("vm")
    disk = vm.disk("disk0")
    seq = vm.state.last_applied
    print(f"start {seq}", flush=True)
    rng = random.Random(seed ^ seq)
    while seq < last:
        first = seq + 1
        writes = [stream_write(seed, s) for s in range(first, first + BATCH)]
        seq = await vm.apply_primary(first, writes)
        off = rng.randrange(0, DISK_SIZE - 9000)
        await disk.write(off, rng.randbytes(rng.choice([7, 4096, 9000])))
        if seq % CHECKPOINT_EVERY == 0:
            await vm.checkpoint(seq)
            print(f"checkpoint {seq}", flush=True)
        print(f"batch {seq}", flush=True)
    await store.close()
    print("done", flush=True)


if __name__ == "__main__":
    trio.run(run, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
