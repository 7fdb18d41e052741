#!/usr/bin/env python3
"""Many VMs on one pair with a worker process per VM: create times, memory per process, a killed worker's return.

A secondary and a primary mounted with ``--workers`` on 127.0.0.1. For each
of N VMs (default 64): ``mountctl create P vmNN/d0 --size SIZE`` (each timed:
the command, interpreter start-up included, as an operator sees it), then 8
MiB written into each disk (eight 1 MiB pieces spread over the whole disk,
so that sparse maps are touched far apart) and a checkpoint of each. One disk
is compared on both sides, ``mountctl status --json`` runs once, and then the
RSS, PSS and USS (private) of every process under each supervisor are read
from /proc (:mod:`colofs.workers.memory`): the supervisor, its zygote and a
worker per VM. PSS splits a page shared by the workers (the code they
inherited from the zygote) among them; USS is what one more VM costs.

With ``--kill`` (default on), one primary worker is killed with SIGKILL and
the time until the supervisor reports it (the VM's state leaves ``serving``
or its worker PID changes) and until a new worker serves it is printed.

    python -m bench.many_vms --vms 64 --size 1T [--dir /var/tmp] [--no-kill]

Needs root (FUSE) and fusermount3. The functions here are also what the
tests in ``tests/workers`` drive their pairs with.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `bench` importable

from colofs.workers.memory import MEMORY_KEYS, memory_of, process_tree
from mountctl.pair import Node, Pair, PairError, alive, detach, poll
from mountctl.units import parse_size

MiB = 1 << 20
WRITE = 8 * MiB
PIECE = MiB
DISK = "d0"
WORKERS = "--workers"


def vm_names(count: int) -> list[str]:
    return [f"vm{i:02d}" for i in range(count)]


def pattern(vm: str, index: int) -> bytes:
    """The bytes of one written piece: different per VM and piece, the same on every call."""
    return random.Random(f"{vm}/{index}").randbytes(PIECE)


def offsets(size: int, total: int = WRITE) -> list[int]:
    """Where the pieces go: spread evenly over the disk, 1 MiB aligned (all at the start of a small disk)."""
    count = total // PIECE
    step = (size // count) // PIECE * PIECE
    return [i * step for i in range(count)] if step >= PIECE else [i * PIECE for i in range(count)]


# -- the processes of a node ------------------------------------------------------------------------


def worker_of(node: Node, vm: str) -> dict[str, Any]:
    """The ``worker`` part of the VM's status (state, pid, restarts, ...); {} while unreadable."""
    try:
        return dict((node.read_status(vm) or {}).get("worker") or {})
    except (PairError, OSError):
        return {}


def processes(node: Node, vms: Iterable[str]) -> dict[str, int]:
    """Every process under the node's supervisor by role: ``supervisor``, ``zygote``, and one per VM.

    The zygote is the supervisor's child that the workers are children of. A
    process in the tree that no VM's status names (a worker being replaced, a
    helper) is listed as ``other-PID``.
    """
    sup = node.pid
    if sup is None:
        return {}
    tree = process_tree(sup)
    by_pid = {int(w["pid"]): vm for vm in vms if (w := worker_of(node, vm)).get("pid")}
    parents = {_ppid(p) for p in by_pid}
    named: dict[str, int] = {"supervisor": sup}
    for p in tree[1:]:
        if p in by_pid:
            continue
        zygote = "zygote" not in named and _ppid(p) == sup and (p in parents or not by_pid)
        named["zygote" if zygote else f"other-{p}"] = p
    named.update({vm: p for p, vm in sorted(by_pid.items(), key=lambda kv: kv[1]) if p in tree})
    return named


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat[stat.rfind(")") + 2 :].split()[1])


def memory_table(node: Node, vms: Iterable[str]) -> dict[str, dict[str, int]]:
    """RSS, PSS, USS, swap PSS in bytes of each process of :func:`processes` (those alive when read)."""
    out: dict[str, dict[str, int]] = {}
    for name, pid in processes(node, vms).items():
        try:
            out[name] = memory_of(pid) | {"pid": pid}
        except ProcessLookupError:
            continue
    return out


def totals(table: dict[str, dict[str, int]]) -> dict[str, int]:
    return {k: sum(row[k] for row in table.values()) for k in MEMORY_KEYS}


def worker_rows(table: dict[str, dict[str, int]]) -> list[dict[str, int]]:
    return [row for name, row in table.items() if name not in ("supervisor", "zygote") and not name.startswith("other-")]


# -- a pair of supervisors --------------------------------------------------------------------------


class Tracker:
    """Remembers every process seen under a pair's supervisors, so that a cleanup can end the workers a
    supervisor that died left behind (they are the zygote's children, not the supervisor's)."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.seen: set[int] = set()

    def remember(self) -> set[int]:
        for node in (self.pair.primary, self.pair.secondary):
            for pid in node.pids:
                self.seen.update(process_tree(pid))
        return self.seen

    def leftovers(self) -> list[int]:
        """Remembered processes that still run colofs code."""
        return [p for p in sorted(self.seen) if alive(p) and b"colofs" in _cmdline(p)]

    def end_leftovers(self, timeout: float = 30) -> list[int]:
        """SIGKILL the remembered processes still running; those it killed."""
        left = self.leftovers()
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while any(alive(p) for p in left) and time.monotonic() < deadline:
            time.sleep(0.05)  # a killed process's exit: nothing to block on for a non-child
        return left


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def mounts_under(base: Path) -> list[str]:
    """Mount points at or under ``base`` (deepest first), from /proc/mounts."""
    root = str(base.resolve())
    found = []
    for line in Path("/proc/mounts").read_text().splitlines():
        where = line.split()[1].replace("\\040", " ")
        if where == root or where.startswith(root + "/"):
            found.append(where)
    return sorted(found, key=len, reverse=True)


def detach_all(base: Path) -> list[str]:
    """Lazily detach every mount left under ``base``, outermost first (that takes the VM mounts on a root
    with it: a dead root cannot be entered to detach what sits on it); those it found."""
    found = mounts_under(base)
    for _ in range(len(found)):
        left = mounts_under(base)
        if not left:
            break
        detach(min(left, key=len))
    return found


def start(pair: Pair, *options: str) -> None:
    """Mount the secondary, then the primary, both with a worker per VM."""
    pair.mount_secondary(WORKERS, *options)
    pair.mount_primary(WORKERS, *options)


# -- the run ----------------------------------------------------------------------------------------


@dataclass
class Figures:
    vms: int
    size: int
    create_s: list[float] = field(default_factory=list)
    checkpoint_s: list[float] = field(default_factory=list)
    status_s: float = 0.0
    status: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # side -> process -> figures
    memory_idle: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # the same, before any write
    kill: dict[str, float] = field(default_factory=dict)


def run(pair: Pair, names: list[str], size: int, *, wait: Callable[[Callable[[], Any], float, str], Any],
        compare: str | None = None) -> Figures:
    """Create, write, checkpoint every VM; compare one; status --json; read memory. Raises on any failure."""
    fig = Figures(len(names), size)
    for vm in names:
        t0 = time.monotonic()
        pair.primary.create(vm, size, DISK)
        fig.create_s.append(time.monotonic() - t0)
    for vm in names:
        f = pair.secondary.file(vm, DISK)
        wait(lambda f=f: _has_size(f, size), 120, f"{vm}/{DISK} on the secondary")
    for vm in names:
        wait(lambda vm=vm: _connected(pair.primary, vm), 120, f"{vm}'s link to the secondary")
    for side, node in (("primary", pair.primary), ("secondary", pair.secondary)):
        fig.memory_idle[side] = memory_table(node, names)
    spots = offsets(size)
    for vm in names:
        fd = os.open(pair.primary.file(vm, DISK), os.O_WRONLY)
        try:
            for i, off in enumerate(spots):
                os.pwrite(fd, pattern(vm, i), off)
            os.fsync(fd)
        finally:
            os.close(fd)
    for vm in names:
        t0 = time.monotonic()
        pair.checkpoint(vm)
        fig.checkpoint_s.append(time.monotonic() - t0)
    check_same(pair, compare or names[0], size)
    t0 = time.monotonic()
    res = pair.primary.mountctl("status", str(pair.primary.mnt), "--json", timeout=300)
    fig.status_s = time.monotonic() - t0
    fig.status = json.loads(res.stdout)
    for side, node in (("primary", pair.primary), ("secondary", pair.secondary)):
        fig.memory[side] = memory_table(node, names)
    return fig


def _has_size(path: Path, size: int) -> bool:
    """The file is there with that size (a VM whose worker is still starting answers EAGAIN: not yet)."""
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _connected(node: Node, vm: str) -> bool:
    try:
        return ((node.read_status(vm) or {}).get("peer") or {}).get("state") == "connected"
    except (PairError, OSError):
        return False


def check_same(pair: Pair, vm: str, size: int) -> None:
    """The VM's written pieces, and a stretch never written, read the same on both sides (and as written)."""
    spots = offsets(size)
    holes = [spots[0] + PIECE, size - PIECE] if size > 2 * WRITE else []
    with open(pair.primary.file(vm, DISK), "rb") as p, open(pair.secondary.file(vm, DISK), "rb") as s:
        for i, off in enumerate(spots):
            p.seek(off)
            s.seek(off)
            a, b = p.read(PIECE), s.read(PIECE)
            if not a == b == pattern(vm, i):
                raise PairError(f"{vm} differs at {off}: primary {'ok' if a == pattern(vm, i) else 'wrong'}, "
                                f"secondary {'ok' if b == pattern(vm, i) else 'wrong'}")
        for off in holes:
            if off in spots:
                continue
            p.seek(off)
            s.seek(off)
            if not p.read(PIECE) == s.read(PIECE) == bytes(PIECE):
                raise PairError(f"{vm}: an unwritten stretch at {off} is not zeros on both sides")


def kill_worker(node: Node, vm: str, *, wait: Callable[[Callable[[], Any], float, str], Any],
                timeout: float = 120) -> dict[str, float]:
    """SIGKILL the VM's worker; seconds until the supervisor shows it (not serving, or a new PID) and until a
    new worker serves the VM. The new worker's status is returned under ``worker``."""
    before = worker_of(node, vm)
    old = int(before["pid"])
    t0 = time.monotonic()
    os.kill(old, signal.SIGKILL)
    seen: dict[str, Any] = {}

    def noticed() -> bool:
        w = worker_of(node, vm)
        seen.update(w)
        return bool(w) and (w.get("state") != "serving" or int(w.get("pid", old)) != old)

    wait(noticed, timeout, f"the supervisor to notice that {vm}'s worker {old} died")
    detected = time.monotonic() - t0

    def serving() -> dict[str, Any] | None:
        w = worker_of(node, vm)
        return w if w.get("state") == "serving" and int(w.get("pid", old)) != old else None

    new = wait(serving, timeout, f"a new worker to serve {vm}")
    return {"detected_s": detected, "serving_s": time.monotonic() - t0, "old_pid": old, "worker": new,
            "state_seen": seen.get("state")}


# -- printing ----------------------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / MiB:8.1f}"


def describe(fig: Figures) -> str:
    """The figures as an operator reads them: times, then memory per process and per side."""
    lines = [f"{fig.vms} VMs x {fig.size / (1 << 30):g} GiB, {WRITE // MiB} MiB written into each, workers on"]
    c = fig.create_s
    lines.append(f"create (mountctl, each): min {min(c):.2f} s, median {statistics.median(c):.2f} s, "
                 f"max {max(c):.2f} s, total {sum(c):.1f} s")
    lines.append("  each: " + " ".join(f"{t:.2f}" for t in c))
    k = fig.checkpoint_s
    lines.append(f"checkpoint (each): median {statistics.median(k) * 1000:.0f} ms, max {max(k) * 1000:.0f} ms")
    lines.append(f"mountctl status --json: {fig.status_s:.2f} s")
    for side, table in fig.memory.items():
        lines.append(f"{side}: {'process':<12} {'pid':>7} {'RSS MiB':>8} {'PSS MiB':>8} {'USS MiB':>8}")
        workers = worker_rows(table)
        shown = [n for n in table if table[n] not in workers] + [n for n in table if table[n] in workers][:3]
        for name in shown:  # every process but the workers past the third; those are summarised below
            row = table[name]
            lines.append(f"{'':{len(side) + 1}} {name:<12} {row['pid']:>7} {_mib(row['rss'])} {_mib(row['pss'])} "
                         f"{_mib(row['uss'])}")
        if workers:
            for key in ("rss", "pss", "uss"):
                vals = [w[key] for w in workers]
                lines.append(f"{'':{len(side) + 1}} workers {key.upper()}: min {_mib(min(vals)).strip()} "
                             f"median {_mib(statistics.median(vals)).strip()} max {_mib(max(vals)).strip()} MiB")
        t = totals(table)
        lines.append(f"{'':{len(side) + 1}} total: RSS {_mib(t['rss']).strip()} PSS {_mib(t['pss']).strip()} "
                     f"USS {_mib(t['uss']).strip()} MiB over {len(table)} processes "
                     f"(bound for USS: {_mib(uss_bound(fig.vms)).strip()} MiB)")
    for side, table in fig.memory_idle.items():
        t = totals(table)
        med = statistics.median(w["pss"] for w in worker_rows(table)) if worker_rows(table) else 0
        lines.append(f"{side} before any write: total RSS {_mib(t['rss']).strip()} PSS {_mib(t['pss']).strip()} "
                     f"USS {_mib(t['uss']).strip()} MiB, worker PSS median {_mib(med).strip()} MiB")
    if fig.kill:
        lines.append(f"kill -9 of a primary worker: detected after {fig.kill['detected_s']:.2f} s, "
                     f"serving again after {fig.kill['serving_s']:.2f} s")
    return "\n".join(lines)


def uss_bound(vms: int) -> int:
    """The issue's bound on a primary's private memory: 64 MiB plus 16 MiB per VM."""
    return 64 * MiB + 16 * MiB * vms


def _poll(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    return poll(pred, timeout, what, interval=0.02)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vms", type=int, default=64)
    ap.add_argument("--size", type=parse_size, default=parse_size("1T"))
    ap.add_argument("--dir", default=None, help="where the stores go (default: a temporary directory)")
    ap.add_argument("--no-kill", dest="kill", action="store_false", help="skip the killed-worker timing")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON as well")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (FUSE mounts)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="colofs-many-vms-", dir=args.dir) as tmp:
        pair = Pair(tmp)
        tracker = Tracker(pair)
        try:
            start(pair)
            names = vm_names(args.vms)
            fig = run(pair, names, args.size, wait=_poll)
            tracker.remember()
            if args.kill:
                fig.kill = kill_worker(pair.primary, names[-1], wait=_poll)
                tracker.remember()
            print(describe(fig))
            if args.json:
                print(json.dumps({k: v for k, v in fig.__dict__.items() if k != "status"}, indent=1, default=str))
            pair.primary.umount()
            pair.secondary.umount()
        except PairError as e:
            print(f"failed: {e}", file=sys.stderr)
            return 1
        finally:
            tracker.remember()
            pair.cleanup()
            tracker.end_leftovers()
            detach_all(Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
