#!/usr/bin/env python3
"""The secondary's 4K random O_DIRECT read over FUSE and over NBD, for two source trees side by side.

Issue 13's read rows: the SVM file and the ``VM/disk`` NBD export of one
secondary, 4K random reads at queue depth 1 and 16. To compare a change
with what it replaces on a shared, loaded machine, every tree given with
``--tree LABEL=DIR`` gets a secondary daemon of its own (its mountctl and
daemon run with ``PYTHONPATH=DIR``), each importing the same seed image,
and the runs alternate between the trees within every repetition:

* FUSE: fio ``libaio`` (``psync`` at depth 1) with ``--direct=1`` on the
  SVM file; NBD: fio's ``nbd`` engine on the daemon's unix socket;
* before each run the VM is checkpointed (active and hidden empty, as in
  ``bench.compare``) and, unless ``--warm``, the store's files are dropped
  from the page cache with ``POSIX_FADV_DONTNEED`` (only this store's pages,
  not the whole machine's as ``drop_caches`` would);
* each run reports IOPS and the daemon's CPU per read (user + system, all
  its threads and child processes), which is less noisy than IOPS under load.

With ``--floor`` the pyfuse3 floor (``bench/floor_fs.py`` over a copy of
the seed, as in ``bench.compare``) runs the FUSE workloads in the same
rotation: on a loaded machine the CPU per read of colofs against the floor's,
measured minutes apart at most, is the steadiest figure there is.

With ``--profile DIR`` one more run of each workload per tree is sampled
with ``py-spy record`` (``--idle`` off) and its top functions are printed.

    sudo .venv/bin/python bench/read_path.py --tree before=/tmp/before --tree after=. [--reps 3]

Needs root (FUSE) and fio with its nbd engine; py-spy only for ``--profile``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `bench` importable

from bench.compare.floor import FloorMount
from bench.host import cpu_seconds, fio_job, require_root, sh
from bench.primary_path import top
from mountctl.pair import Node, PairError

VM = "vm"
WORKLOADS = ("fuse-qd1", "fuse-qd16", "nbd-qd1", "nbd-qd16")


class TreeNode(Node):
    """A secondary mount whose mountctl and daemon import colofs from one source tree."""

    def __init__(self, work: Path, label: str, tree: Path) -> None:
        super().__init__(work, label, "secondary")
        self.tree = tree

    def mountctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = str(self.tree)
        try:
            return super().mountctl(*args, timeout=timeout)
        finally:
            if old is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = old


@dataclass
class Side:
    label: str
    node: TreeNode | None  # None for the floor
    sock: Path
    floor: FloorMount | None = None
    results: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # workload: (IOPS, CPU us/read)

    def runs(self, workload: str) -> bool:
        """The floor has no NBD export."""
        return self.floor is None or workload.startswith("fuse")


def uncache(store: Path) -> None:
    """Drop this store's files from the page cache (the next reads go to the device)."""
    for root, _, files in os.walk(store):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def fio_args(side: Side, workload: str, size: int, runtime: float) -> list[str]:
    depth = 1 if workload.endswith("qd1") else 16
    args = ["fio", "--name=r", "--rw=randread", "--bs=4k", f"--iodepth={depth}", f"--size={size}",
            f"--runtime={runtime}", "--time_based", "--randrepeat=0", "--norandommap", "--output-format=json"]
    if workload.startswith("nbd"):
        return [*args, "--ioengine=nbd", f"--uri=nbd+unix:///{VM}/disk?socket={side.sock}"]
    path = side.floor.file if side.floor is not None else side.node.file(VM) if side.node is not None else ""
    return [*args, f"--ioengine={'psync' if depth == 1 else 'libaio'}", "--direct=1",
            f"--filename={path}", "--allow_file_create=0", "--fallocate=none", "--invalidate=1"]


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its descendants (with a process per VM, the reads are a worker's)."""
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parent[int(name)] = int(f.read().rsplit(") ", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += cpu_seconds(p)
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        todo += [c for c, pp in parent.items() if pp == p]
    return total


def run_once(side: Side, workload: str, size: int, runtime: float, warm: bool) -> tuple[float, float]:
    """(IOPS, daemon CPU µs per read) of one fio run."""
    if side.floor is not None:
        if not warm:
            uncache(Path(side.floor.dir))
        pid = side.floor.pid
    else:
        assert side.node is not None
        side.node.control(VM, "checkpoint")
        if not warm:
            uncache(side.node.store)
        pid = side.node.pid
    assert pid is not None
    c0 = tree_cpu(pid)
    out = sh(*fio_args(side, workload, size, runtime))
    cpu = tree_cpu(pid) - c0
    read = fio_job(out)["read"]
    iops, n = float(read["iops"]), int(read["total_ios"])
    return iops, cpu * 1e6 / max(n, 1)


def profile(side: Side, workload: str, size: int, runtime: float, warm: bool, out_dir: Path) -> None:
    pid = side.floor.pid if side.floor is not None else side.node.pid if side.node is not None else None
    assert pid is not None
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / f"{side.label}-{workload}.txt"
    spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pid), "-r", "250",
                            "-f", "raw", "-o", str(raw), "-d", str(int(runtime) + 2)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)  # let py-spy attach before the load starts
        iops, us = run_once(side, workload, size, runtime, warm)
    finally:
        spy.wait(timeout=120)
    print(f"\nprofile {side.label} {workload}: {iops:.0f} IOPS, {us:.0f} us CPU/read (sampled), {raw}")
    own, incl = top(raw, 18)
    print("  own %   function")
    for f, s in own:
        print(f"  {s:5.1f}   {f}")
    print("  incl %  function")
    for f, s in incl:
        if s < 99:
            print(f"  {s:5.1f}   {f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", required=True, help="LABEL=DIR: a colofs source tree to run")
    ap.add_argument("--size", default="512M", help="disk size (default 512M)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per fio run (default 5)")
    ap.add_argument("--only", default=",".join(WORKLOADS), help="workloads, comma-separated")
    ap.add_argument("--warm", action="store_true", help="keep the page cache (CPU of the path alone)")
    ap.add_argument("--profile", type=Path, help="also sample each workload with py-spy, writing here")
    ap.add_argument("--dir", default="/var/tmp", help="where the stores live")
    ap.add_argument("--floor", action="store_true", help="also run the FUSE workloads on the pyfuse3 floor")
    args = ap.parse_args()
    require_root("fio", "fusermount3")
    workloads = [w for w in args.only.split(",") if w]
    work = Path(tempfile.mkdtemp(prefix="colofs-read-path-", dir=args.dir))
    sides: list[Side] = []
    try:
        seed = work / "seed.img"
        sh("fio", "--name=seed", f"--filename={seed}", "--rw=write", "--bs=1m", f"--size={args.size}",
           "--refill_buffers", "--output-format=terse")
        size = seed.stat().st_size
        for spec in args.tree:
            label, _, tree = spec.partition("=")
            node = TreeNode(work, label, Path(tree).resolve())
            side = Side(label, node, work / f"{label}.nbd")
            sides.append(side)
            node.mount("--nbd-socket", str(side.sock))
            node.import_(VM, seed)
        if args.floor:
            floor = FloorMount(str(work / "floor"), str(seed))
            sides.append(Side("floor", None, work / "floor.nbd", floor))
            floor.start()
        for rep in range(args.reps):
            for w in workloads:
                for side in (sides if rep % 2 == 0 else sides[::-1]):
                    if not side.runs(w):
                        continue
                    r = run_once(side, w, size, args.runtime, args.warm)
                    side.results.setdefault(w, []).append(r)
                    print(f"rep {rep + 1} {w:9s} {side.label:8s} {r[0]:8.0f} IOPS {r[1]:6.0f} us CPU/read  "
                          f"load {os.getloadavg()[0]:.1f}", flush=True)
        print(f"\nmedians of {args.reps} ({'warm page cache' if args.warm else 'store uncached before each run'})")
        print("| workload | " + " | ".join(f"{s.label} IOPS | {s.label} CPU us/read" for s in sides) + " |")
        print("|---|" + "---|---|" * len(sides))
        for w in workloads:
            cells = []
            for s in sides:
                rs = s.results.get(w, [])
                cells += ([f"{statistics.median(r[0] for r in rs):.0f}", f"{statistics.median(r[1] for r in rs):.0f}"]
                          if rs else ["-", "-"])
            print(f"| {w} | " + " | ".join(cells) + " |")
        if args.profile:
            for side in sides:
                for w in workloads:
                    if not side.runs(w):
                        continue
                    profile(side, w, size, args.runtime, args.warm, args.profile)
    except PairError as e:
        raise SystemExit(str(e)) from None
    finally:
        for side in sides:
            if side.floor is not None:
                side.floor.stop()
            elif side.node is not None:
                side.node.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
