#!/usr/bin/env python3
"""What snapshots cost: creation time, and 4 KiB random-write IOPS on a disk that has one.

1. Creation on a primary, through the mount: a disk with ``--size`` written
   (1 GiB by default), snapshot by ``setxattr`` on the disk file and on the VM
   directory, a clone, each ``--repeat`` times (deleted in between).
2. Creation on a secondary with ``--hidden`` (64 MiB) buffered in hidden:
   the snapshot copies hidden, so this is its worst case. Measured on the core
   API in this process, because without a replication peer nothing fills
   hidden through a mount.
3. fio 4 KiB random writes on the mounted primary disk file, O_DIRECT and
   buffered (``end_fsync``), first without a snapshot and then with one, each
   run on its own quarter of the disk, with fio's random map: every write is
   the first to its block since the fill, so with a snapshot each one pays
   the copy-before-write (read the old block, append it to the snapshot's
   log, fdatasync, then write). A last run writes at random in 32 MiB that a
   sequential pass copied first (second touch: no copy left to do). IOPS are
   writes divided by the wall time of the fio run, its final fsync included.

    sudo .venv/bin/python bench/snapshot_bench.py [--size 1G] [--runtime 6] [--dir /var/tmp]

Needs root (drop_caches, FUSE), fio and fusermount3. About 2 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `bench` importable

from bench.host import MiB, drop_caches, fio_job, require_root, sh
from colofs.core.store import Store
from colofs.core.vm import PrimaryWrite
from mountctl.pair import Node
from mountctl.units import parse_size

P = "user.colofs."


@dataclass
class Timing:
    name: str
    seconds: list[float]
    detail: str = ""

    def row(self) -> str:
        ms = [s * 1000 for s in self.seconds]
        return (f"| {self.name} | {statistics.median(ms):.1f} | {min(ms):.1f} | {max(ms):.1f} | "
                f"{self.detail} |")


def timed(fn: Callable[[], object], repeat: int, between: Callable[[int], object]) -> list[float]:
    out = []
    for i in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
        between(i)
    return out


# -- 1. creation on a primary, through the mount ----------------------------------------------


def primary_creation(mnt: Path, repeat: int) -> list[Timing]:
    vm, disk = mnt / "vm", mnt / "vm" / "disk.raw"
    names = iter(range(10**6))
    out = []
    outcomes: list[dict] = []

    def snap_disk() -> None:
        os.setxattr(disk, P + "snapshot", f"s{next(names)}".encode())

    def delete_last(_: int) -> None:
        outcomes.append(json.loads(os.getxattr(disk, P + "last_result")))  # of the creation just timed
        snaps = json.loads(os.getxattr(disk, P + "snapshots"))
        os.removexattr(mnt / "vm" / snaps[-1]["file"], P + "snapshot")

    # With dirty pages waiting in the kernel, as a running VM would leave them.
    fd = os.open(disk, os.O_RDWR)
    try:
        def dirty_then_snap() -> None:
            for i in range(256):
                os.pwrite(fd, os.urandom(4096), i * 3 * 4096)
            snap_disk()

        secs = timed(snap_disk, repeat, delete_last)
        out.append(Timing("snapshot of one disk (setxattr on DISK.raw), clean cache", secs,
                          _split(outcomes[-repeat:])))
        secs = timed(dirty_then_snap, repeat, delete_last)
        out.append(Timing("snapshot of one disk, 1 MiB dirty in 256 pages (writes included)", secs,
                          _split(outcomes[-repeat:])))
    finally:
        os.close(fd)

    def snap_vm() -> None:
        os.setxattr(vm, P + "snapshot", f"v{next(names)}".encode())

    secs = timed(snap_vm, repeat, delete_last)
    out.append(Timing("snapshot of the VM (setxattr on VM dir, fsync write-back)", secs,
                      _split(outcomes[-repeat:])))

    def clone() -> None:
        os.setxattr(disk, P + "clone", f"c{next(names)}".encode())

    out.append(Timing("writable clone of the disk", timed(clone, repeat, delete_last)))
    return out


def _split(outcomes: list[dict]) -> str:
    """The daemon's median split of a creation into write-back and core time."""
    wb = statistics.median(o["writeback_seconds"] for o in outcomes) * 1000
    core = statistics.median(o["snapshot_seconds"] for o in outcomes) * 1000
    return f"daemon: write-back {wb:.1f} ms, core {core:.1f} ms"


# -- 2. creation on a secondary with hidden full, core API ---------------------------------------


async def secondary_creation(work: Path, size: int, hidden: int, repeat: int) -> Timing:
    store = await Store.open(str(work / "core-store"), role="secondary", create=True)
    try:
        vm = await store.create_vm("vm")
        disk = await vm.add_disk("disk", size)
        chunk = MiB
        step = max(chunk, size // (hidden // chunk))  # spread over the disk
        seq = 1
        for off in range(0, hidden // chunk * step, step):
            seq = await vm.apply_primary(seq, [PrimaryWrite("disk", off, os.urandom(chunk))]) + 1
        assert disk.hidden.data_bytes == hidden, disk.hidden.data_bytes
        secs = []
        for i in range(repeat):
            t0 = time.perf_counter()
            await vm.snapshot(f"s{i}")
            secs.append(time.perf_counter() - t0)
            await vm.delete_snapshot("disk", f"s{i}")
        return Timing(f"snapshot on a secondary, {hidden // MiB} MiB in hidden (core API)", secs,
                      "copies hidden into the snapshot with the disk locked")
    finally:
        await store.close()


# -- 3. IOPS with and without a snapshot ------------------------------------------------------------


def fio_iops(path: Path, direct: bool, offset: int, length: int, runtime: int, *, first_touch: bool = True) -> float:
    """4 KiB random writes; with ``first_touch`` every block at most once (fio's random map). IOPS over wall time."""
    drop_caches()
    args = [
        "fio", "--name=snap", f"--filename={path}", "--rw=randwrite", "--bs=4k", "--ioengine=psync",
        f"--direct={int(direct)}", f"--offset={offset}", f"--size={length}", f"--runtime={runtime}",
        "--randrepeat=0", "--fallocate=none", "--allow_file_create=0", "--output-format=json",
    ]
    if not first_touch:
        args += ["--norandommap", "--time_based"]
    if not direct:
        args.append("--end_fsync=1")
    t0 = time.monotonic()
    out = sh(*args, timeout=runtime * 20 + 120)
    wall = time.monotonic() - t0
    return fio_job(out)["write"]["io_bytes"] / 4096 / wall


def iops_runs(mnt: Path, size: int, runtime: int) -> list[tuple[str, float, float, float]]:
    disk = mnt / "vm" / "disk.raw"
    q = size // 4
    print("  fio: no snapshot, O_DIRECT ...", flush=True)
    no_direct = fio_iops(disk, True, 0, q, runtime)
    print("  fio: no snapshot, buffered ...", flush=True)
    no_buffered = fio_iops(disk, False, q, q, runtime)
    os.setxattr(disk, P + "snapshot", b"bench")
    print("  fio: with a snapshot, O_DIRECT ...", flush=True)
    snap_direct = fio_iops(disk, True, 2 * q, q, runtime)
    print("  fio: with a snapshot, buffered ...", flush=True)
    snap_buffered = fio_iops(disk, False, 3 * q, q, runtime)
    print("  fio: with a snapshot, O_DIRECT, second touch ...", flush=True)
    sh("fio", "--name=copy", f"--filename={disk}", "--rw=write", "--bs=1m", "--size=32m", "--direct=1",
       "--ioengine=psync", "--fallocate=none", "--allow_file_create=0", "--output-format=terse")
    again = fio_iops(disk, True, 0, 32 * MiB, runtime, first_touch=False)
    saved = json.loads(os.getxattr(mnt / "vm" / "disk@bench.raw", P + "status"))["bytes"]
    print(f"  the snapshot holds {saved / MiB:.0f} MiB of copied blocks", flush=True)
    return [
        ("4K random write, O_DIRECT (psync qd1), first touch", no_direct, snap_direct, snap_direct / no_direct),
        ("4K random write, buffered + end_fsync, first touch", no_buffered, snap_buffered,
         snap_buffered / no_buffered),
        ("4K random write, O_DIRECT, second touch (blocks already copied)", no_direct, again, again / no_direct),
    ]


# -- the run ----------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="disk size, all written before measuring (default 1G)")
    ap.add_argument("--hidden", default="64M", help="bytes in hidden for the secondary case (default 64M)")
    ap.add_argument("--runtime", type=int, default=6, help="seconds per fio run at most (default 6)")
    ap.add_argument("--repeat", type=int, default=5, help="creations per case (default 5)")
    ap.add_argument("--dir", default="/var/tmp", help="where the stores live")
    args = ap.parse_args()
    require_root("fio", "fusermount3")
    size, hidden = parse_size(args.size), parse_size(args.hidden)
    work = Path(tempfile.mkdtemp(prefix="colofs-snapbench-", dir=args.dir))
    node = Node(work, "primary", "primary")
    mnt = node.mnt
    try:
        node.mount()
        node.create("vm", size)
        disk = mnt / "vm" / "disk.raw"
        print(f"writing {size / MiB:.0f} MiB to the mounted primary disk ...", flush=True)
        sh("fio", "--name=fill", f"--filename={disk}", "--rw=write", "--bs=1m", f"--size={size}", "--direct=1",
           "--ioengine=libaio", "--iodepth=8", "--refill_buffers", "--fallocate=none", "--allow_file_create=0",
           "--output-format=terse")
        print("snapshot creation on the primary ...", flush=True)
        timings = primary_creation(mnt, args.repeat)
        print(f"snapshot creation on a secondary with {hidden / MiB:.0f} MiB in hidden ...", flush=True)
        timings.append(trio.run(secondary_creation, work, size, hidden, args.repeat))
        print("4 KiB random-write IOPS without and with a snapshot ...", flush=True)
        rows = iops_runs(mnt, size, args.runtime)
    finally:
        node.cleanup()
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{platform.node()}: {os.cpu_count()} CPUs, Linux {platform.release()}, stores under {args.dir}; "
          f"disk {size / MiB:.0f} MiB, fully written")
    print()
    print(f"Snapshot creation ({args.repeat} each; wall time of the setxattr as the caller sees it)")
    print()
    print("| case | median ms | min ms | max ms | note |")
    print("|---|---|---|---|---|")
    for t in timings:
        print(t.row())
    print()
    print(f"4 KiB random writes on the mounted primary disk, fio psync qd1, {args.runtime} s per run at most")
    print()
    print("| workload | no snapshot IOPS | with snapshot IOPS | ratio |")
    print("|---|---|---|---|")
    for name, without, with_snap, ratio in rows:
        print(f"| {name} | {without:.0f} | {with_snap:.0f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
