#!/usr/bin/env python3
"""1M ingest from a colofs primary into its secondary, trees alternated in one run, with both workers' CPU.

The ``ingest-seq-qd16`` row of ``python -m bench.compare`` (fio, 1M sequential
O_DIRECT writes at depth 16 into the primary's file, timed until the
secondary applied the last one) without QEMU, for one or more source trees
(git worktrees of colofs at the commits to compare). Each tree gets its own
pair, set up once in a child process that runs that tree's code
(``PYTHONPATH=TREE``); the parent then asks the children in turn, the order
rotated every repetition, so load from elsewhere falls on every tree alike.
Per measurement: MB/s, the CPU seconds per MiB of the primary's and the
secondary's process serving the VM (their worker with a process per VM,
from ``/proc/PID/stat``) and of its main thread alone (the trio loop; the
rest is worker threads: encoding, spilling, syncs, reads the page cache
lacks), and the MiB per group the secondary applied (one
``fdatasync`` of hidden each), all over the measurement.

    sudo .venv/bin/python bench/ingest_1m.py --tree /tmp/a --tree /tmp/b [--size 512] [--reps 5]

Needs root (FUSE, drop_caches), fio and fusermount3.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MiB = 1 << 20
VM = "pvm"


def cpu_seconds(pid: int, thread: bool = False) -> float:
    """utime + stime of every thread of ``pid`` (or of its main thread only, which runs the loop)."""
    path = f"/proc/{pid}/task/{pid}/stat" if thread else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_now(pids: tuple[int, int]) -> list[float]:
    """Both processes' CPU seconds, then their loops' (main threads')."""
    return [cpu_seconds(p) for p in pids] + [cpu_seconds(p, thread=True) for p in pids]


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


# -- the child: one pair on one tree ----------------------------------------------------------


def serving_pid(node: Any) -> int:
    """The VM's worker (a process per VM), or the daemon itself."""
    pid = ((node.vm_status(VM) or {}).get("worker") or {}).get("pid")
    return pid if isinstance(pid, int) else node.pid


def applies(node: Any) -> tuple[int, int]:
    """(groups applied, bytes in them) of the secondary's session, as its status counts them."""
    peer = (node.vm_status(VM) or {}).get("peer") or {}
    return int(peer.get("applies", 0)), int(peer.get("bytes", 0))


def child(work: str, seed: str, size: int) -> None:
    """Set up a pair, then per ``run`` line on stdin measure once and print a JSON line."""
    from mountctl.pair import Pair  # this tree's

    pair = Pair(work)
    try:
        pair.mount_secondary()
        pair.mount_primary()
        pair.primary.import_(VM, seed)
        pair.wait_disk(VM, timeout=120)
        pair.wait_acked(VM, timeout=600)
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            if line.strip() != "run":
                break
            pair.checkpoint(VM)
            pair.wait(lambda: pair.secondary.buffered(VM) == (0, 0), 60, "the checkpoint")
            ppid, spid = serving_pid(pair.primary), serving_pid(pair.secondary)
            drop_caches()
            c0 = cpu_now((ppid, spid))
            g0 = applies(pair.secondary)
            t0 = time.monotonic()
            subprocess.run(["fio", "--name=ingest", f"--filename={pair.primary.file(VM)}", "--rw=write",
                            "--bs=1m", "--ioengine=libaio", "--direct=1", "--iodepth=16", f"--size={size}",
                            "--end_fsync=1", "--refill_buffers", "--buffer_compress_percentage=50",
                            "--allow_file_create=0", "--output-format=json"],
                           check=True, capture_output=True, timeout=900)
            t_fio = time.monotonic()
            t_end = pair.wait_applied(VM, timeout=600)
            c1 = cpu_now((ppid, spid))
            g1 = applies(pair.secondary)
            groups = g1[0] - g0[0]
            mib = size / MiB
            ms = [(b - a) / mib * 1e3 for a, b in zip(c0, c1, strict=True)]
            print(json.dumps({"mb_s": size / (t_end - t0) / 1e6, "lag_s": t_end - t_fio,
                              "pri_cpu_ms_mib": ms[0], "sec_cpu_ms_mib": ms[1],
                              "pri_loop_ms_mib": ms[2], "sec_loop_ms_mib": ms[3],
                              "group_mib": (g1[1] - g0[1]) / groups / MiB if groups else 0.0}), flush=True)
    finally:
        pair.cleanup()


# -- the parent ---------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", action="append", required=True,
                    help="a colofs source tree (repeat); TREE,DIR puts DIR on the path after it")
    ap.add_argument("--size", type=int, default=512, help="MiB written per measurement (and the disk's size)")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--child", nargs=2, metavar=("WORK", "SEED"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    size = a.size * MiB
    if a.child:
        child(a.child[0], a.child[1], size)
        return
    top = tempfile.mkdtemp(prefix="ingest1m-", dir=a.dir)
    seed = os.path.join(top, "seed.raw")
    with open(seed, "wb") as f:
        for _ in range(a.size):
            f.write(os.urandom(MiB // 2) * 2)
    kids: list[subprocess.Popen[str]] = []
    try:
        for i, tree in enumerate(a.tree):
            work = os.path.join(top, f"t{i}")
            os.mkdir(work)
            tree, _, extra = tree.partition(",")  # TREE,DIR: DIR (another pyfuse3, say) follows the tree's code
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(os.path.abspath(p) for p in (tree, extra) if p))
            kids.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--size", str(a.size),
                                          "--tree", tree, "--child", work, seed],
                                         cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True))
            if "ready" not in json.loads(kids[-1].stdout.readline() or "{}"):
                raise SystemExit(f"tree {tree}: setup failed")
        results: dict[int, list[dict[str, float]]] = {i: [] for i in range(len(a.tree))}
        for rep in range(a.reps):
            order = [(rep + k) % len(a.tree) for k in range(len(a.tree))]
            for i in order:
                kid = kids[i]
                assert kid.stdin is not None and kid.stdout is not None
                kid.stdin.write("run\n")
                kid.stdin.flush()
                r = json.loads(kid.stdout.readline())
                results[i].append(r)
                print(f"rep {rep} {a.tree[i]}: {r['mb_s']:.0f} MB/s, ms CPU/MiB primary {r['pri_cpu_ms_mib']:.1f} "
                      f"(loop {r['pri_loop_ms_mib']:.1f}), secondary {r['sec_cpu_ms_mib']:.1f} "
                      f"(loop {r['sec_loop_ms_mib']:.1f}), lag {r['lag_s']:.2f} s, "
                      f"{r['group_mib']:.2f} MiB per applied group", flush=True)
        print(f"\nmedian [min-max] of {a.reps}, {a.size} MiB, load {os.getloadavg()[0]:.1f}")
        for i, tree in enumerate(a.tree):
            cols = []
            for key in ("mb_s", "pri_cpu_ms_mib", "pri_loop_ms_mib", "sec_cpu_ms_mib", "sec_loop_ms_mib", "group_mib"):
                v = [r[key] for r in results[i]]
                cols.append(f"{key} {statistics.median(v):.1f} [{min(v):.1f}-{max(v):.1f}]")
            print(f"{tree}: " + ", ".join(cols))
    finally:
        for kid in kids:
            if kid.stdin is not None:
                kid.stdin.close()
        for kid in kids:
            kid.wait(timeout=300)
        subprocess.run(["rm", "-rf", top], check=False)


if __name__ == "__main__":
    main()
