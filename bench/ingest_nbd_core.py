"""The NBD ingest export in one process: what the server spends per write, with fio's ``nbd`` engine as client.

:mod:`bench.ingest_nbd` measures the export through a mounted daemon,
where FUSE, the worker and the machine's load all move the figure. Here a
secondary :class:`~colofs.core.store.Store` and its NBD
:class:`~colofs.nbd.service.Server` run in this process on a Unix socket
(no mount), fio runs in its own process, and each row reports what load
inflates least: this process's CPU per MiB (the server's loop and its
threads), ``fdatasync`` calls per MiB, bytes written per byte ingested
(base, hidden) and the writes per applied group, beside the rate.

Each repetition runs every ``--rw``/``--bs`` row into ``VM/DISK:ingest`` of
a disk whose base holds data (unless ``--fresh``), after a checkpoint.
``--profile FILE`` writes a cProfile of the server's loop for the last
repetition of the first row.

Usage: ``python -m bench.ingest_nbd_core [--dir DIR] [--size MiB] [--rows randwrite:4k,write:1M]
[--iodepth 16] [--runtime S] [--reps N] [--fresh] [--sync-delay MS] [--profile FILE]
[--bounds 16:16,8:8] [--trace]``.

``--bounds GROUP:QUEUE,...`` (MiB) runs every row once per pair of
:data:`colofs.nbd.ingest.GROUP_BYTES` and :data:`~colofs.nbd.ingest.QUEUE_BYTES`,
alternated within each repetition, and reports this process's peak RSS
during the row (``VmHWM``, reset before it through ``/proc/self/clear_refs``)
beside its RSS before it: what the bounds let the export hold, measured
where the load does not move it. ``--trace`` adds the peak of what Python
allocated (tracemalloc; it slows the loop, so its rates are not comparable).

``--dir /dev/shm --sync-delay 1`` takes the device and its load out of the
figure: every ``fdatasync`` costs the same 1 ms, so what is left is the
server's own CPU and how its groups overlap that wait.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import random
import shutil
import statistics
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Sequence

import trio

from bench.compare.fio import FioJob, argv
from bench.ingest_core import Meter, cpu
from colofs.core.fileio import Buffer
from colofs.core.store import Store
from colofs.nbd import ingest
from colofs.nbd.exports import Exports
from colofs.nbd.service import Server, bind_unix

MiB = 1 << 20
VM = "ing"


class GroupSizes:
    """Writes per applied ingest group, counted at :meth:`colofs.nbd.ingest.IngestImage.apply`."""

    def __init__(self) -> None:
        self.sizes: Counter[int] = Counter()
        self._orig = ingest.IngestImage.apply

    def install(self) -> None:
        orig, sizes = self._orig, self.sizes

        async def apply(image: ingest.IngestImage, extents: Sequence[tuple[int, Buffer]]) -> None:
            sizes[len(extents)] += 1
            await orig(image, extents)

        ingest.IngestImage.apply = apply  # type: ignore[method-assign]

    def uninstall(self) -> None:
        ingest.IngestImage.apply = self._orig  # type: ignore[method-assign]

    def summary(self) -> str:
        n = sum(self.sizes.values())
        if not n:
            return "no groups"
        mean = sum(k * v for k, v in self.sizes.items()) / n
        return f"{n} groups, {mean:.1f} writes each"


async def serve(server: Server, sock_path: str, nursery: trio.Nursery) -> None:
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(bind_unix(sock_path)))
    await nursery.start(server.serve, [(listener, None)])


async def fio(job: FioJob, uri: str) -> tuple[float, float]:
    """Run fio; its (MB/s, seconds) as it measured them."""
    proc = await trio.run_process(argv(job, uri=uri), capture_stdout=True, capture_stderr=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"fio failed: {proc.stderr.decode()[-2000:]}")
    out = proc.stdout.decode()
    data = json.loads(out[out.index("{"):])
    w = data["jobs"][0]["write"]
    return w["bw_bytes"] / 1e6, w["runtime"] / 1000


async def core_row(image: ingest.IngestImage, size: int, group: int, mib: int, rng: random.Random) -> float:
    """4 KiB random writes applied in process in groups of ``group`` writes, no NBD; CPU ms per MiB."""
    data = rng.randbytes(4096)
    n = mib * MiB // 4096
    c0 = cpu()
    for i in range(0, n, group):
        await image.apply([(rng.randrange(size // 4096) * 4096, data) for _ in range(min(group, n - i))])
    return (cpu() - c0) * 1000 / mib


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field, in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> None:
    """Start ``VmHWM`` again from the current RSS (Linux's ``clear_refs`` value 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def set_bounds(group_mib: int, queue_mib: int) -> None:
    """The ingest bounds the server reads at each write (module globals, read when used)."""
    ingest.GROUP_BYTES = group_mib * MiB
    ingest.QUEUE_BYTES = queue_mib * MiB


async def run(a: argparse.Namespace, work: str) -> None:
    size = a.size * MiB
    rows = [tuple(r.split(":")) for r in a.rows.split(",")]
    meter = Meter()
    groups = GroupSizes()
    bounds = [tuple(int(x) for x in b.split(":")) for b in a.bounds.split(",")] if a.bounds \
        else [(ingest.GROUP_BYTES // MiB, ingest.QUEUE_BYTES // MiB)]
    results: dict[str, list[tuple[float, ...]]] = {
        f"{rw} {bs} {g}:{q}": [] for rw, bs in rows for g, q in bounds}
    store = await Store.open(os.path.join(work, "store"), role="secondary", create=True)
    sock = os.path.join(work, "nbd.sock")
    uri = f"nbd+unix:///{VM}/disk:ingest?socket={sock}"
    try:
        await store.create_disk(VM, "disk", size)
        vm = store.vm(VM)
        exports = Exports(store)
        server = Server(exports)
        image = exports.resolve(f"{VM}/disk:ingest").image
        assert isinstance(image, ingest.IngestImage)
        rng = random.Random(13)
        async with trio.open_nursery() as nursery:
            await serve(server, sock, nursery)
            if not a.fresh:
                await fio(FioJob("write", "1M", engine="nbd", iodepth=4, size=size), uri)
            if a.sync_delay:  # a model of a device whose cache flush takes this long (use with --dir /dev/shm)
                real_sync = os.fdatasync

                def slow_sync(fd: int) -> None:
                    real_sync(fd)
                    time.sleep(a.sync_delay / 1000)

                os.fdatasync = slow_sync
                meter = Meter()  # takes the slowed fdatasync as the one it counts and restores
            meter.install()
            groups.install()
            try:
                for rep in range(a.reps):
                    for i, (rw, bs, (gmib, qmib)) in enumerate(
                            (rw, bs, b) for rw, bs in rows for b in (bounds if rep % 2 == 0 else bounds[::-1])):
                        set_bounds(gmib, qmib)
                        await vm.checkpoint()
                        job = FioJob(rw, bs, engine="nbd", iodepth=a.iodepth, size=size, runtime=a.runtime)
                        prof = cProfile.Profile() if a.profile and i == 0 and rep == a.reps - 1 else None
                        meter.reset()
                        groups.sizes.clear()
                        rss0 = status_kib("VmRSS")
                        reset_peak()
                        if a.trace:
                            tracemalloc.reset_peak()
                        c0, t0 = cpu(), time.perf_counter()
                        if prof:
                            prof.enable()
                        mb_s, secs = await fio(job, uri)
                        if prof:
                            prof.disable()
                            prof.dump_stats(a.profile)
                        spent = cpu() - c0
                        hwm = status_kib("VmHWM")
                        traced = tracemalloc.get_traced_memory()[1] / MiB if a.trace else 0.0
                        meter.freeze()
                        mib = mb_s * 1e6 * secs / MiB
                        b = meter.bytes
                        total = mib * MiB
                        row = (mb_s, spent * 1000 / mib, meter.syncs / mib, b["hidden.log"] / total,
                               hwm / 1024, rss0 / 1024)
                        results[f"{rw} {bs} {gmib}:{qmib}"].append(row)
                        mem = f"  peak {hwm / 1024:5.1f} MiB (from {rss0 / 1024:5.1f})"
                        if a.trace:
                            mem += f"  traced peak {traced:5.1f} MiB"
                        print(f"rep {rep} {rw:>9} {bs:>3} {gmib:>2}:{qmib:<2} {mb_s:7.1f} MB/s  "
                              f"cpu {row[1]:6.2f} ms/MiB  "
                              f"fdatasync {row[2]:6.2f}/MiB  base {b['base.raw'] / total:4.2f}  hidden {row[3]:5.3f}  "
                              f"{groups.summary()}{mem}  wall {time.perf_counter() - t0:.1f}s", flush=True)
                        if a.core and bs == "4k" and groups.sizes:
                            g = round(sum(k * v for k, v in groups.sizes.items()) / sum(groups.sizes.values()))
                            await vm.checkpoint()
                            meter.reset()
                            core_ms = await core_row(image, size, g, a.core, rng)
                            meter.freeze()
                            print(f"rep {rep} same writes in process, groups of {g}: cpu {core_ms:6.2f} ms/MiB  "
                                  f"fdatasync {meter.syncs / a.core:6.2f}/MiB", flush=True)
            finally:
                groups.uninstall()
                meter.uninstall()
                nursery.cancel_scope.cancel()
    finally:
        await store.close()
    for name, rs in results.items():
        if rs:
            print(f"median {name:>19}  {statistics.median(r[0] for r in rs):7.1f} MB/s  "
                  f"cpu {statistics.median(r[1] for r in rs):6.2f} ms/MiB  "
                  f"fdatasync {statistics.median(r[2] for r in rs):6.2f}/MiB  "
                  f"peak {statistics.median(r[4] for r in rs):5.1f} MiB (max {max(r[4] for r in rs):5.1f}, "
                  f"from {statistics.median(r[5] for r in rs):5.1f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--size", type=int, default=256, help="disk size in MiB")
    ap.add_argument("--rows", default="randwrite:4k,write:1M", help="rw:bs pairs, comma separated")
    ap.add_argument("--iodepth", type=int, default=16)
    ap.add_argument("--runtime", type=float, default=4.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fresh", action="store_true", help="leave base as holes (ZERO records in hidden)")
    ap.add_argument("--core", type=int, default=0,
                    help="after each 4k row, MiB of 4 KiB writes applied in process in groups of the size seen")
    ap.add_argument("--sync-delay", type=float, default=0.0,
                    help="ms added to every fdatasync: a device's flush latency, modelled on a RAM file system")
    ap.add_argument("--profile", help="cProfile of the last repetition of the first row, to this file")
    ap.add_argument("--bounds", default="",
                    help="GROUP:QUEUE MiB pairs, comma separated: each row runs once per pair, alternated")
    ap.add_argument("--trace", action="store_true", help="also the peak of Python's allocations (tracemalloc)")
    a = ap.parse_args()
    if a.trace:
        tracemalloc.start()
    work = tempfile.mkdtemp(prefix="ingest-nbd-core-", dir=a.dir)
    try:
        trio.run(run, a, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
