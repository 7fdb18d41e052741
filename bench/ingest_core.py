"""What a secondary's ingest and failover cost in the core: rate, bytes written per byte ingested, syncs.

Applies primary writes to a fresh secondary disk through ``VM.apply_primary``
(what a replication session calls, in groups of ``--group`` MiB), 4 KiB
random and 1 MiB sequential, each into a fresh disk (base all holes) and
again over a disk whose base holds data (every block written once and
checkpointed). For each it prints MB/s, the bytes written to base,
hidden.log and other files per byte ingested (counted at the core's
``write_all``) and the ``fdatasync`` calls. Then a checkpoint with ``--checkpoint`` MiB
buffered and a failover commit with ``--failover`` MiB buffered, each half in hidden
(over data) and half in active; with ``--synced`` both start as ``make bench``'s rows do
(everything on the device, nothing cached). Their sync calls are counted by kind:
``fdatasync`` and ``fsync`` (the state file and directories).

Usage: ``python bench/ingest_core.py [--dir DIR] [--mib N] [--group MiB] [--failover MiB] [--checkpoint MiB]
[--repeat N] [--only ingest|checkpoint|failover] [--cold] [--synced] [--chunk MiB]``.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import trio

import colofs.core.blocklog
import colofs.core.cbw
import colofs.core.fileio
import colofs.core.vm
import colofs.core.vmbase
from colofs.core import PrimaryWrite, Store
from colofs.core.fileio import Buffer

MiB = 1 << 20
DISK = 2 << 30


class Meter:
    """Counts bytes the core writes per file (by name) and ``fdatasync`` calls, while installed."""

    def __init__(self) -> None:
        self.bytes: Counter[str] = Counter()
        self.syncs = 0
        self.fsyncs = 0  # os.fsync: the state file and directories
        self.counting = True
        self._lock = threading.Lock()
        self._orig_write = colofs.core.fileio.write_all
        self._orig_sync = os.fdatasync
        self._orig_fsync = os.fsync
        self._orig_copy = os.copy_file_range
        self.copied = 0  # bytes of base.raw written by copy_file_range (the failover's kernel copies)
        self.paused = 0.0  # seconds every disk was held (whole_disks): the switch, no VM I/O meanwhile
        self._whole = {m: m.__dict__.get("whole_disks") for m in (colofs.core.vm, colofs.core.vmbase)}

    def _count(self, fd: int, n: int) -> None:
        try:
            name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            name = "?"
        kind = name if name in ("base.raw", "hidden.log", "active.log") else "other"
        with self._lock:
            if self.counting:
                self.bytes[kind] += n

    def install(self) -> None:
        orig_write, orig_sync, orig_copy, orig_fsync = self._orig_write, self._orig_sync, self._orig_copy, self._orig_fsync

        def write_all(fd: int, bufs: Sequence[Buffer], offset: int) -> None:
            orig_write(fd, bufs, offset)
            self._count(fd, sum(len(b) for b in bufs))

        def copy_file_range(src: int, dst: int, count: int, offset_src: int | None = None,
                            offset_dst: int | None = None) -> int:
            n = orig_copy(src, dst, count, offset_src, offset_dst)
            self._count(dst, n)
            with self._lock:
                if self.counting:
                    self.copied += n
            return n

        def fdatasync(fd: int) -> None:
            orig_sync(fd)
            with self._lock:
                if self.counting:
                    self.syncs += 1

        def fsync(fd: int) -> None:
            orig_fsync(fd)
            with self._lock:
                if self.counting:
                    self.fsyncs += 1

        @asynccontextmanager
        async def timed_whole_disks(disks: object) -> AsyncIterator[None]:
            async with self._orig_whole(disks):  # type: ignore[arg-type]
                t = time.perf_counter()
                try:
                    yield
                finally:
                    self.paused += time.perf_counter() - t

        for module, orig in self._whole.items():
            if orig is not None:
                self._orig_whole = orig
                module.whole_disks = timed_whole_disks  # type: ignore[attr-defined]
        colofs.core.cbw.write_all = write_all
        colofs.core.blocklog.write_all = write_all
        os.fdatasync = fdatasync
        os.fsync = fsync
        os.copy_file_range = copy_file_range

    def uninstall(self) -> None:
        for module, orig in self._whole.items():
            if orig is not None:
                module.whole_disks = orig  # type: ignore[attr-defined]
        colofs.core.cbw.write_all = self._orig_write
        colofs.core.blocklog.write_all = self._orig_write
        os.fdatasync = self._orig_sync
        os.fsync = self._orig_fsync
        os.copy_file_range = self._orig_copy

    def reset(self) -> None:
        self.bytes.clear()
        self.syncs = 0
        self.fsyncs = 0
        self.copied = 0
        self.paused = 0.0
        self.counting = True

    def freeze(self) -> None:
        """Stop counting until the next :meth:`reset`."""
        self.counting = False


def cpu() -> float:
    """CPU seconds of this process, its threads included (user + system): a figure load does not inflate."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def report(name: str, total: int, seconds: list[float], cpus: list[float], meter: Meter) -> None:
    """One row: median [min-max] MB/s and median CPU ms per MiB, the last repetition's writes and syncs."""
    b = meter.bytes
    rates = sorted(total / s / 1e6 for s in seconds)
    print(
        f"{name:<30} {rates[len(rates) // 2]:7.1f} [{rates[0]:.0f}-{rates[-1]:.0f}] MB/s  "
        f"cpu {sorted(cpus)[len(cpus) // 2] * 1000 / (total / MiB):5.2f} ms/MiB  "
        f"base {b['base.raw'] / total:5.2f}  "
        f"hidden {b['hidden.log'] / total:5.3f}  other {(b['active.log'] + b['other']) / total:5.3f}  "
        f"fdatasync {meter.syncs:6d} ({meter.syncs / (total / MiB):5.2f}/MiB)",
        flush=True,
    )


async def ingest(vm: object, seq: int, writes: list[tuple[int, bytes]], group: int) -> int:
    """Apply ``writes`` in groups of ``group`` bytes, as a session's merged batches; returns the last seq."""
    batch: list[PrimaryWrite] = []
    size = 0
    for off, data in writes:
        batch.append(PrimaryWrite("d", off, data))
        size += len(data)
        if size >= group:
            seq = await vm.apply_primary(seq + 1, batch)  # type: ignore[attr-defined]
            batch, size = [], 0
    if batch:
        seq = await vm.apply_primary(seq + 1, batch)  # type: ignore[attr-defined]
    return seq


async def run(
    workdir: str, mib: int, group_mib: int, failover_mib: int, repeat: int, only: str, cold: bool, chunk: int,
    synced: bool = False, checkpoint_mib: int = 64,
) -> None:
    rng = random.Random(13)
    total = mib * MiB
    group = group_mib * MiB
    big = rng.randbytes(MiB)
    small = rng.randbytes(4096)
    patterns = {
        "1 MiB sequential": [(i * MiB, big) for i in range(mib)],
        "4 KiB random": [(rng.randrange(0, DISK // 4096) * 4096, small) for _ in range(total // 4096)],
    }
    meter = Meter()
    meter.install()
    try:
        n = 0
        for label, writes in (patterns.items() if only in ("all", "ingest") else []):
            for over in ("fresh disk", "data in base"):
                times: list[float] = []
                cpus: list[float] = []
                for _ in range(repeat):
                    n += 1
                    store = await Store.open(os.path.join(workdir, f"s{n}"), role="secondary", create=True)
                    await store.create_disk("vm", "d", DISK)
                    vm = store.vm("vm")
                    seq = 0
                    if over == "data in base":
                        seq = await ingest(vm, seq, writes, group)
                        await vm.checkpoint(seq)
                    meter.reset()
                    t, c = time.perf_counter(), cpu()
                    seq = await ingest(vm, seq, writes, group)
                    times.append(time.perf_counter() - t)
                    cpus.append(cpu() - c)
                    meter.freeze()  # the store's close (its syncs) is not part of the row
                    await store.close()
                    shutil.rmtree(os.path.join(workdir, f"s{n}"))
                report(f"{label}, {over}", total, times, cpus, meter)

        if only in ("all", "checkpoint"):
            await control_row("checkpoint", workdir, checkpoint_mib, repeat, cold, synced, chunk, group, meter, big, small)
        if only in ("all", "failover"):
            await control_row("failover", workdir, failover_mib, repeat, cold, synced, chunk, group, meter, big, small)
    finally:
        meter.uninstall()


class Tally:
    """What a row's timed operations took: wall, CPU (process, loop thread), syncs, pause."""

    def __init__(self) -> None:
        self.spent: list[float] = []
        self.cpus: list[float] = []
        self.loop: list[float] = []
        self.paused: list[float] = []
        self.syncs = (0, 0)
        self.phases: dict[str, list[float]] = {}

    def line(self, name: str, detail: str) -> str:
        def med(v: list[float]) -> float:
            return sorted(v)[len(v) // 2] * 1000

        return (f"{name} {med(self.spent):7.1f} [{min(self.spent) * 1000:.0f}-{max(self.spent) * 1000:.0f}] ms  "
                f"cpu {med(self.cpus):.0f} ms (loop {med(self.loop):.0f})  {detail}fdatasync {self.syncs[0]}  "
                f"fsync {self.syncs[1]}  paused {med(self.paused):.1f} [{min(self.paused) * 1000:.1f}-"
                f"{max(self.paused) * 1000:.1f}] ms")


async def control_row(what: str, workdir: str, mib: int, repeat: int, cold: bool, synced: bool, chunk: int,
                      group: int, meter: Meter, big: bytes, small: bytes) -> None:
    """Time ``what`` (checkpoint or failover) with ``mib`` MiB buffered: half hidden (over data), half active."""
    tally = Tally()
    moved = copied = base = 0
    for r in range(repeat):
        path = os.path.join(workdir, f"{what[0]}{r}")
        store = await Store.open(path, role="secondary", create=True)
        disk = await store.create_disk("vm", "d", DISK)
        vm = store.vm("vm")
        half = mib // 2
        fill = [(i * MiB, big) for i in range(half)]
        seq = await ingest(vm, 0, fill, group)
        await vm.checkpoint(seq)
        seq = await ingest(vm, seq, [(off, small * 256) for off, _ in fill], group)  # hidden: half, over data
        for i in range(half):
            await disk.write(DISK // 2 + i * MiB, big)  # active: the other half
        if chunk:
            disk.commit_chunk = chunk << 20
        if cold:  # the layers' data no longer in the page cache, as long after it was buffered
            for layer in (disk.hidden, disk.active):
                os.fsync(layer.fd)
                os.posix_fadvise(layer.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if synced:  # as make bench starts a checkpoint or failover: everything on the device, nothing cached
            for fd in (disk.base_fd, disk.hidden.fd, disk.active.fd):
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        meter.reset()
        t, c, lt = time.perf_counter(), cpu(), time.thread_time()
        if what == "failover":
            moved = await vm.failover()
        else:
            await vm.checkpoint(seq)
        tally.spent.append(time.perf_counter() - t)
        tally.cpus.append(cpu() - c)
        tally.loop.append(time.thread_time() - lt)
        meter.freeze()
        tally.syncs = (meter.syncs, meter.fsyncs)
        tally.paused.append(meter.paused)
        copied, base = meter.copied, meter.bytes["base.raw"]
        if what == "failover":
            for k, val in (getattr(vm, "failover_phases", None) or {}).items():
                tally.phases.setdefault(k, []).append(val)
        await store.close()
        shutil.rmtree(path)
    if not tally.spent:
        return
    detail = (f"{moved} blocks  base {base / MiB:.0f} MiB (copied in the kernel {copied / MiB:.0f})  "
              if what == "failover" else "")
    name = f"{what}, {mib} MiB buffered{' (cold)' if cold else ''}"
    print(tally.line(f"{name:<36}", detail), flush=True)
    if tally.phases:
        print("  phases (median ms): " + "  ".join(
            f"{k.removesuffix('_seconds')} {sorted(p)[len(p) // 2] * 1000:.1f}" for k, p in tally.phases.items()),
            flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", help="directory on the file system to measure (default: a temporary one)")
    p.add_argument("--mib", type=int, default=128, help="MiB ingested per row")
    p.add_argument("--group", type=int, default=4, help="MiB per apply_primary call (a session's merged group)")
    p.add_argument("--failover", type=int, default=256, help="MiB buffered before the failover")
    p.add_argument("--checkpoint", type=int, default=64, help="MiB buffered before the timed checkpoint")
    p.add_argument("--repeat", type=int, default=3, help="runs of each row (median [min-max] shown)")
    p.add_argument("--cold", action="store_true", help="evict hidden and active from the page cache before the failover")
    p.add_argument("--synced", action="store_true",
                   help="sync base and the layers and evict them before the failover (make bench's state)")
    p.add_argument("--chunk", type=int, default=0, help="MiB per failover step (default: the disk's)")
    p.add_argument("--only", choices=("all", "ingest", "checkpoint", "failover"), default="all", help="which rows to run")
    a = p.parse_args()
    work = tempfile.mkdtemp(prefix="colofs-ingest-", dir=a.dir)
    try:
        trio.run(run, work, a.mib, a.group, a.failover, a.repeat, a.only, a.cold, a.chunk, a.synced, a.checkpoint)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
