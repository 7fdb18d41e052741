#!/usr/bin/env python3
"""The primary daemon's memory while a VM writes, and what the writes cost meanwhile.

Issue 13 asks for every colofs process within 64 MiB under the benchmark; a
busy primary peaked at 216 MiB. This mounts a loopback pair, then on the
primary's file runs fio 1M sequential writes at queue depth 8 over the whole
disk (the fill: the retained log's worst case between checkpoints) and then
4K random writes at queue depth 1, each without a checkpoint, while a thread
samples the primary daemon's ``/proc/PID/smaps_rollup`` every 0.2 s. It
prints, per phase, the throughput, the daemon's CPU per MiB, the peak RSS
(``VmHWM``) and the peak sampled PSS, and the retained log's bytes (all,
and resident in memory).

    sudo .venv/bin/python bench/primary_memory.py [--size 256M] [--runtime 8]

Needs root (FUSE) and fio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `bench` importable

from bench import tracehigh
from bench.host import cpu_seconds, fio_job, require_root, sh
from bench.primary_path import serving_pid
from mountctl.pair import Pair, PairError
from mountctl.units import parse_size

VM = "vm"
MiB = 1 << 20
FUSECTL = "/sys/fs/fuse/connections"


class Sampler:
    """Samples a process's PSS (and RSS) until stopped; keeps the peaks."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_pss = 0
        self.peak_rss = 0
        self.at_peak: dict[str, int] = {}
        """Where the resident memory was at the highest RSS sampled (:func:`breakdown`)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):  # the sampling pace, not a wait for an outcome
            try:
                text = Path(f"/proc/{self.pid}/smaps_rollup").read_text()
            except OSError:
                return
            fields = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in text.splitlines()[1:])}
            self.peak_pss = max(self.peak_pss, fields["Pss"])
            if fields["Rss"] > self.peak_rss:
                self.peak_rss = fields["Rss"]
                try:
                    self.at_peak = breakdown(self.pid)
                except OSError:
                    pass

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def breakdown(pid: int) -> dict[str, int]:
    """Resident KiB of ``pid`` by kind of mapping: the main heap, other anonymous memory, files.

    ``anon`` holds glibc's mmapped chunks (buffers of 128 KiB or more) and
    pymalloc's arenas; ``heap`` is the main malloc arena's brk heap.
    """
    out = {"heap": 0, "anon": 0, "file": 0, "stack": 0}
    kind = "file"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and not head[0].endswith(":"):
            name = head[5] if len(head) > 5 else ""
            kind = ("heap" if name == "[heap]" else "stack" if name.startswith("[stack") else
                    "anon" if not name or name.startswith("[anon") else "file")
        elif head and head[0] == "Rss:":
            out[kind] += int(head[1])
    return out


def shown(at_peak: dict[str, int]) -> str:
    return ", ".join(f"{k} {v / 1024:.1f}" for k, v in at_peak.items())


def hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def set_max_background(path: os.PathLike[str] | str, value: int) -> str:
    """Write the FUSE connection of the mount holding ``path``: max_background, and congestion_threshold at 3/4."""
    conn = Path(FUSECTL) / str(os.stat(path).st_dev)
    if not (conn / "max_background").exists():
        raise SystemExit(f"no {conn}/max_background: is fusectl mounted (mount -t fusectl none {FUSECTL})?")
    (conn / "max_background").write_text(f"{value}\n")
    (conn / "congestion_threshold").write_text(f"{max(1, value * 3 // 4)}\n")
    return ", ".join(f"{n} {(conn / n).read_text().strip()}" for n in ("max_background", "congestion_threshold"))


def retained(pair: Pair) -> str:
    peer = (pair.primary.vm_status(VM) or {}).get("peer") or {}
    held = int(peer.get("retained_bytes") or 0)
    resident = peer.get("retained_resident_bytes")
    return f"retained {held / MiB:.0f} MiB" + (f" ({int(resident) / MiB:.0f} MiB in memory)" if resident is not None else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="256M", help="disk size (default 256M)")
    ap.add_argument("--runtime", type=float, default=8.0, help="seconds of 4K writes (default 8)")
    ap.add_argument("--iodepth", type=int, default=8,
                    help="queue depth of the 1M fill (default 8; make bench's ingest row runs 16)")
    ap.add_argument("--max-background", type=int, default=None,
                    help="set the primary VM's FUSE connection's max_background (the kernel's bound on queued "
                         "asynchronous requests, 12 by default) through fusectl; needs it mounted on "
                         f"{FUSECTL}. The worker's own bound (colofs/fs/fuseconn.py) rewrites it at the "
                         "fill's first 1 MiB write: use this with a tree whose bound is off")
    ap.add_argument("--dir", default="/var/tmp", help="where the stores live")
    ap.add_argument("--trace", action="store_true",
                    help="also print the worker's top allocation sites at its highest traced point (bench/tracehigh.py)")
    args = ap.parse_args()
    size = parse_size(args.size)
    require_root("fio", "fusermount3")
    work = Path(tempfile.mkdtemp(prefix="colofs-primary-memory-", dir=args.dir))
    traced = tracehigh.install(work) if args.trace else None
    pair = Pair(work)
    try:
        pair.start()
        disk = pair.primary.create(VM, size)
        pair.wait_disk(VM)
        pid = serving_pid(pair.primary)  # the VM's worker under a process per VM
        if args.max_background is not None:
            print(f"primary's FUSE connection: {set_max_background(disk, args.max_background)}")
        idle = hwm_kib(pid)
        with Sampler(pid) as s:
            c0, t0 = cpu_seconds(pid), time.monotonic()
            out = sh("fio", "--name=fill", f"--filename={disk}", "--rw=write", "--bs=1m", "--ioengine=libaio",
                     f"--iodepth={args.iodepth}", "--direct=1", f"--size={size}", "--allow_file_create=0", "--fallocate=none",
                     "--output-format=json")
            mbs = fio_job(out)["write"]["bw_bytes"] / 1e6
            pair.wait_acked(VM, timeout=600)
            cpu = (cpu_seconds(pid) - c0) / (size / MiB) * 1e3
            dt = time.monotonic() - t0
        print(f"idle: primary peak RSS {idle / 1024:.1f} MiB")
        print(f"fill 1M qd{args.iodepth}: {mbs:.0f} MB/s (acknowledged after {dt:.1f} s), primary CPU {cpu:.2f} ms/MiB, "
              f"peak RSS {hwm_kib(pid) / 1024:.1f} MiB, peak PSS {s.peak_pss / 1024:.1f} MiB, {retained(pair)}",
              flush=True)
        print(f"  at the peak (MiB): {shown(s.at_peak)}", flush=True)
        with Sampler(pid) as s:
            c0 = cpu_seconds(pid)
            out = sh("fio", "--name=r", f"--filename={disk}", "--rw=randwrite", "--bs=4k", "--ioengine=psync",
                     "--direct=1", f"--size={size}", f"--runtime={args.runtime}", "--time_based",
                     "--allow_file_create=0", "--fallocate=none", "--refill_buffers",
                     "--buffer_compress_percentage=50", "--randrepeat=0", "--norandommap", "--output-format=json")
            job = fio_job(out)["write"]
            pair.wait_acked(VM, timeout=600)
            ios = max(1, int(job["total_ios"]))
            cpu = (cpu_seconds(pid) - c0) / ios * 1e6
        print(f"4K randwrite qd1: {job['iops']:.0f} IOPS, primary CPU {cpu:.0f} us/write, "
              f"peak RSS {hwm_kib(pid) / 1024:.1f} MiB, peak PSS {s.peak_pss / 1024:.1f} MiB (in this phase), "
              f"{retained(pair)}", flush=True)
        print(f"  at the peak (MiB): {shown(s.at_peak)}", flush=True)
        if traced is not None:
            print(tracehigh.report(traced, pid))
    except PairError as e:
        raise SystemExit(str(e)) from None
    finally:
        pair.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
