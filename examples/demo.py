"""colofs demo: a secondary's disk through a checkpoint interval and a failover, driven on the core.

Creates a store in a temporary directory, feeds it primary writes as the
replication stream would, lets the secondary VM write as well, and shows
isolation (the SVM never sees the primary's writes between checkpoints),
a checkpoint (both views meet), a crash (rollback to the checkpoint) and a
failover (the SVM's view becomes the disk).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time

import trio

from colofs.core import PrimaryWrite, Store

MiB = 1 << 20
SIZE = 64 * MiB


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


async def main(work: str) -> None:
    path = os.path.join(work, "store")
    store = await Store.open(path, role="secondary", create=True)
    disk = await store.create_disk("vm1", "disk0", SIZE)
    vm = store.vm("vm1")
    say(f"secondary store at {path}: vm1/disk0, {SIZE // MiB} MiB, {disk.block_size}-byte blocks")
    rng = random.Random(1)
    primary = bytearray(SIZE)  # what the primary's disk holds
    svm = bytearray(SIZE)  # what the secondary VM sees

    seq = 0
    t = time.perf_counter()
    nbytes = 0
    for _ in range(32):
        writes = []
        for _ in range(8):
            n = rng.choice([4096, 65536, MiB])
            off = rng.randrange(0, SIZE - n)
            data = rng.randbytes(n)
            writes.append(PrimaryWrite("disk0", off, data))
            primary[off : off + n] = data
            nbytes += n
        seq = await vm.apply_primary(seq + 1, writes)
    el = time.perf_counter() - t
    say(f"applied {seq} primary writes ({nbytes / MiB:.0f} MiB) at {nbytes / el / 1e6:.0f} MB/s, durable per batch")

    for _ in range(50):
        off = rng.randrange(0, SIZE - 8192)
        data = rng.randbytes(rng.choice([512, 4096, 8192]))
        await disk.write(off, data)
        svm[off : off + len(data)] = data
    view = await disk.read(0, SIZE)
    say(f"isolation: SVM view equals the SVM's own writes only: {bytes(view) == bytes(svm)}")
    st = disk.status()
    say(f"buffers: hidden {st['hidden_bytes'] / MiB:.1f} MiB, active {st['active_bytes'] / MiB:.1f} MiB")

    t = time.perf_counter()
    await vm.checkpoint(seq)
    say(f"checkpoint at seq {seq} in {(time.perf_counter() - t) * 1000:.1f} ms")
    view = await disk.read(0, SIZE)
    say(f"after the checkpoint the SVM sees the primary's disk: {bytes(view) == bytes(primary)}")
    svm[:] = primary

    for _ in range(8):
        off = rng.randrange(0, SIZE - MiB)
        await vm.apply_primary(seq + 1, [PrimaryWrite("disk0", off, rng.randbytes(MiB))])
        seq += 1
    store.abandon()
    say("the secondary process 'crashes' with primary writes after the checkpoint")
    store = await Store.open(path, role="secondary")
    vm = store.vm("vm1")
    disk = vm.disk("disk0")
    say(f"recovery: {vm.recovery.action}, {vm.recovery.blocks} blocks rolled back; resume from seq {vm.recovery.resume_seq}")
    with open(os.path.join(disk.path, "base.raw"), "rb") as f:
        say(f"base equals the primary's disk at the checkpoint: {f.read() == bytes(primary)}")

    for _ in range(20):
        off = rng.randrange(0, SIZE - 4096)
        data = rng.randbytes(4096)
        await disk.write(off, data)
        svm[off : off + len(data)] = data
    t = time.perf_counter()
    moved = await vm.failover()
    say(f"failover: {moved} buffered blocks committed in {(time.perf_counter() - t) * 1000:.1f} ms; "
        f"role {vm.state.role}, epoch {vm.state.epoch}")
    with open(os.path.join(disk.path, "base.raw"), "rb") as f:
        say(f"the disk is now the SVM's view: {f.read() == bytes(svm)}")
    await store.close()
    say("done")


if __name__ == "__main__":
    work = tempfile.mkdtemp(prefix="colofs-demo-", dir="/var/tmp")
    try:
        trio.run(main, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
