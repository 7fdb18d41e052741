#!/usr/bin/env python3
"""fio through a replicating colofs pair on loopback, beside a raw file, in one run.

A secondary mount (``--listen``) and a primary mount (``--peer``) on
127.0.0.1 with a shared key; one 1 GiB disk on the primary, filled once and
checkpointed, so every measured write overwrites data and the secondary's
hidden buffer fills with copies of it (copy-before-write) as it would between
two COLO checkpoints. Per workload and replication mode (``async``, ``sync``):

* colofs MB/s: bytes written divided by the time from the start of fio to the
  moment the secondary acknowledged the last write (fio's ``end_fsync``
  included); ``lag`` is how long that took after fio returned;
* the checkpoint that follows, timed on its own (``mountctl checkpoint``'s
  xattr, in-process), with the hidden bytes it discarded;
* the same fio job on a raw file on the same file system, in the same run;
* the lz4 wire/raw ratio the primary's status reports (cumulative), and the
  CPU both daemons used.

Then the checkpoint latency with 64 MiB buffered on the secondary (median of
three). fio's buffers are refilled and 50 % compressible.

    sudo .venv/bin/python bench/pair_bench.py [--size 1G] [--rand-io 64M] [--dir /var/tmp]

Needs root (drop_caches, FUSE), fio and fusermount3; about 3-5 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MOUNTCTL = [sys.executable, "-m", "mountctl.cli"]
REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 1 << 20
XATTR = "user.colofs."


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str
    bs: str
    engine: str
    direct: int
    iodepth: int
    sequential: bool


WORKLOADS = (
    Workload("seq 1M O_DIRECT", "write", "1m", "psync", 1, 1, True),
    Workload("seq 1M buffered", "write", "1m", "psync", 0, 1, True),
    Workload("rand 4K O_DIRECT qd16", "randwrite", "4k", "libaio", 1, 16, False),
)


def sh(*cmd: str, timeout: float = 900) -> str:
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stdout}{res.stderr}")
    return res.stdout


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def fio(path: Path, w: Workload, size: int, io_bytes: int) -> tuple[int, float]:
    """Run one job; (bytes written, seconds fio took, its end_fsync included)."""
    t0 = time.monotonic()
    out = sh("fio", "--name=bench", f"--filename={path}", f"--rw={w.rw}", f"--bs={w.bs}",
             f"--ioengine={w.engine}", f"--direct={w.direct}", f"--iodepth={w.iodepth}", f"--size={size}",
             f"--io_size={io_bytes}", "--end_fsync=1", "--fallocate=none", "--allow_file_create=0",
             "--refill_buffers", "--buffer_compress_percentage=50", "--randrepeat=0", "--norandommap",
             "--invalidate=1", "--output-format=json")
    seconds = time.monotonic() - t0
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return int(job["write"]["io_bytes"]), seconds


class Mount:
    """One daemon of the pair; cleaned up by its own PID only."""

    def __init__(self, work: Path, name: str, role: str) -> None:
        self.store = work / f"{name}-store"
        self.mnt = work / f"{name}-mnt"
        self.mnt.mkdir()
        self.role = role
        self.pid: int | None = None

    def mount(self, *opts: str) -> None:
        sh(*MOUNTCTL, "mount", "--role", self.role, "--store", str(self.store), *opts, str(self.mnt))
        self.pid = int(self.status()["pid"])

    def status(self, vm: str | None = None) -> dict[str, Any]:
        st = json.loads(os.getxattr(self.mnt, XATTR + "status"))
        return st["vms"][vm] if vm else st

    def control(self, vm: str, name: str, value: bytes = b"") -> dict[str, Any]:
        """Set ``user.colofs.NAME`` on the VM directory, as mountctl does; the daemon's outcome."""
        path = self.mnt / vm
        try:
            os.setxattr(path, XATTR + name, value)
        except OSError as e:
            raise SystemExit(f"{name} on {path}: {os.getxattr(path, XATTR + 'last_error').decode()} ({e})") from None
        return json.loads(os.getxattr(path, XATTR + "last_result"))

    def cleanup(self) -> None:
        pid, self.pid = self.pid, None
        if pid is None:
            return
        res = subprocess.run([*MOUNTCTL, "umount", str(self.mnt)], capture_output=True, text=True, timeout=300,
                             check=False, cwd=REPO)
        if res.returncode != 0:
            print(res.stderr.strip(), file=sys.stderr)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True, timeout=30,
                           check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_acked(pri: Mount, vm: str, timeout: float = 600) -> float:
    """Poll until the secondary acknowledged every write of ``vm``; the time it did."""
    deadline = time.monotonic() + timeout
    while True:
        st = pri.status(vm)
        if st["peer"].get("state") == "connected" and st["peer"]["acked_seq"] >= st["last_applied"]:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise SystemExit(f"the secondary did not catch up: {st['peer']}")
        time.sleep(0.005)


@dataclass
class Row:
    workload: Workload
    mode: str
    colofs_mb: float
    fio_mb: float
    lag: float
    raw_mb: float
    checkpoint_ms: float
    hidden_mib: float
    lz4: float | None
    cpu_pri: float
    cpu_sec: float


def measure(pri: Mount, sec: Mount, w: Workload, mode: str, size: int, io_bytes: int,
            raw_mb: float) -> Row:
    disk = pri.mnt / "vm" / "disk.raw"
    drop_caches()
    assert pri.pid is not None and sec.pid is not None
    c0 = (cpu_seconds(pri.pid), cpu_seconds(sec.pid))
    t0 = time.monotonic()
    nbytes, fio_s = fio(disk, w, size, io_bytes)
    t_ack = wait_acked(pri, "vm")
    elapsed = t_ack - t0
    cpu = ((cpu_seconds(pri.pid) - c0[0]) / elapsed * 100, (cpu_seconds(sec.pid) - c0[1]) / elapsed * 100)
    hidden = sum(d["hidden_bytes"] for d in sec.status("vm")["disks"].values())
    lz4 = pri.status("vm")["peer"].get("lz4_ratio")
    t1 = time.monotonic()
    res = pri.control("vm", "checkpoint")
    ckpt = time.monotonic() - t1
    assert res.get("replicated"), res
    return Row(w, mode, nbytes / elapsed / 1e6, nbytes / fio_s / 1e6, t_ack - t0 - fio_s, raw_mb,
               ckpt * 1000, hidden / MiB, lz4, cpu[0], cpu[1])


def checkpoint_latency(pri: Mount, sec: Mount, buffered: int) -> tuple[float, float, float]:
    """Median (setxattr round trip, engine latency, secondary hidden MiB) of three checkpoints with ``buffered`` bytes."""
    disk = pri.mnt / "vm" / "disk.raw"
    totals, engine, hidden = [], [], []
    for i in range(3):
        sh("fio", "--name=fill", f"--filename={disk}", "--rw=write", "--bs=1m", f"--size={buffered}",
           f"--offset={i * buffered}", "--direct=1", "--ioengine=psync", "--refill_buffers",
           "--buffer_compress_percentage=50", "--allow_file_create=0", "--output-format=terse")
        wait_acked(pri, "vm")
        hidden.append(sum(d["hidden_bytes"] for d in sec.status("vm")["disks"].values()) / MiB)
        t0 = time.monotonic()
        res = pri.control("vm", "checkpoint")
        totals.append(time.monotonic() - t0)
        engine.append(float(res["latency_seconds"]))
    return statistics.median(totals) * 1000, statistics.median(engine) * 1000, statistics.median(hidden)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="disk size and sequential bytes per run (default 1G)")
    ap.add_argument("--rand-io", default="64M", help="bytes of 4 KiB random writes per run (default 64M)")
    ap.add_argument("--buffered", default="64M", help="buffered bytes for the checkpoint latency (default 64M)")
    ap.add_argument("--dir", default="/var/tmp", help="where the stores and the raw file live")
    args = ap.parse_args()
    size, rand_io, buffered = parse_size(args.size), parse_size(args.rand_io), parse_size(args.buffered)
    if os.geteuid() != 0:
        raise SystemExit("run as root: it drops page caches and mounts FUSE")
    for tool in ("fio", "fusermount3"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing")
    work = Path(tempfile.mkdtemp(prefix="colofs-pair-bench-", dir=args.dir))
    key = work / "colofs.key"
    key.write_bytes(secrets.token_bytes(32))
    key.chmod(0o600)
    port = free_port()
    sec, pri = Mount(work, "secondary", "secondary"), Mount(work, "primary", "primary")
    raw = work / "raw.raw"
    started = time.monotonic()
    try:
        sec.mount("--listen", f"127.0.0.1:{port}", "--key-file", str(key))
        pri.mount("--peer", f"127.0.0.1:{port}", "--key-file", str(key))
        sh(*MOUNTCTL, "create", str(pri.mnt), "vm/disk", "--size", str(size))
        disk = pri.mnt / "vm" / "disk.raw"
        print(f"filling the {size // MiB} MiB disk through the pair, and the raw file ...", flush=True)
        t0 = time.monotonic()
        fill = Workload("fill", "write", "1m", "libaio", 1, 8, True)
        fio(disk, fill, size, size)
        fill_rate = size / (wait_acked(pri, "vm") - t0) / 1e6
        pri.control("vm", "checkpoint")
        with open(raw, "wb") as f:
            f.truncate(size)
        fio(raw, fill, size, size)
        raw_rates: dict[str, float] = {}
        rows: list[Row] = []
        for mode in ("async", "sync"):
            pri.control("vm", "mode", mode.encode())
            for w in WORKLOADS:
                io_bytes = size if w.sequential else rand_io
                if w.name not in raw_rates:
                    drop_caches()
                    nbytes, seconds = fio(raw, w, size, io_bytes)
                    raw_rates[w.name] = nbytes / seconds / 1e6
                row = measure(pri, sec, w, mode, size, io_bytes, raw_rates[w.name])
                rows.append(row)
                print(f"  {mode:5s} {w.name:22s} colofs {row.colofs_mb:6.0f} MB/s (fio {row.fio_mb:.0f}, "
                      f"lag {row.lag:.2f} s)  raw {row.raw_mb:6.0f} MB/s  checkpoint {row.checkpoint_ms:.0f} ms "
                      f"({row.hidden_mib:.0f} MiB hidden)", flush=True)
        pri.control("vm", "mode", b"async")
        total_ms, engine_ms, hidden_mib = checkpoint_latency(pri, sec, buffered)
        lz4 = pri.status("vm")["peer"].get("lz4_ratio")
    finally:
        pri.cleanup()
        sec.cleanup()
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"colofs pair on 127.0.0.1 (2 daemons, shared key), {size // MiB} MiB disk, {os.cpu_count()} CPUs; "
          f"fio end_fsync=1, buffers 50% compressible; colofs MB/s until the secondary acknowledged")
    print(f"initial fill (1M O_DIRECT qd8, blocks new to the secondary): {fill_rate:.0f} MB/s")
    print()
    print("| workload | mode | colofs MB/s | (fio's own) | ack lag | raw file MB/s | colofs/raw | "
          "checkpoint after | hidden discarded | lz4 wire/raw | CPU pri/sec |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        extra = f" ({r.colofs_mb * 1e6 / 4096 / 1000:.1f}k IOPS)" if r.workload.bs == "4k" else ""
        print(f"| {r.workload.name} | {r.mode} | {r.colofs_mb:.0f}{extra} | {r.fio_mb:.0f} | {r.lag:.2f} s | "
              f"{r.raw_mb:.0f} | {r.colofs_mb / r.raw_mb:.2f} | {r.checkpoint_ms:.0f} ms | "
              f"{r.hidden_mib:.0f} MiB | {r.lz4 if r.lz4 is not None else '-'} | "
              f"{r.cpu_pri:.0f}%/{r.cpu_sec:.0f}% |")
    print()
    print(f"checkpoint with {hidden_mib:.0f} MiB buffered in hidden: {total_ms:.0f} ms (setxattr round trip), "
          f"{engine_ms:.0f} ms engine latency (median of 3); lz4 wire/raw overall {lz4}")
    print(f"took {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
