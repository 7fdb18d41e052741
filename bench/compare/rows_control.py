"""Rows of checkpoint and failover with buffers, and the memory rows."""

from __future__ import annotations

import os
import time
from functools import partial

from bench.compare.colofs_pair import ColofsMount
from bench.compare.fio import FioJob, run_fio
from bench.compare.report import Cell
from bench.compare.state import MEMORY_TARGETS, PVM, SVM, BenchState
from bench.compare.workloads import LABELS, Row
from bench.host import MiB, drop_caches, run


class ControlRows(BenchState):
    """``run_control`` and ``run_memory``."""

    # -- checkpoint and failover with buffers ----------------------------------------------

    def _split(self, amount: int) -> tuple[int, int]:
        """(primary bytes, SVM bytes) that fill the buffers: half and half when colofs replicates, else all SVM."""
        if self.pair is not None and self.pair.has_primary and self.pair.replication is None:
            return amount // 2, amount - amount // 2
        return 0, amount

    def run_control(self) -> None:
        rows = [r for r in self.rows if r.group in ("checkpoint", "failover")]
        if not rows:
            return
        for row in rows:
            p, v = self._split(row.amount)  # fixed per row: colofs and QEMU get the same fill
            fill = (f"{p // MiB} MiB of primary writes (hidden) + {v // MiB} MiB of SVM writes (active)" if p
                    else f"{v // MiB} MiB of SVM writes (active): colofs replication not available")
            self.notes.append(f"{row.id}: buffers filled with {fill}, the same for colofs and QEMU")
            for rep in range(self.s.reps):
                for system in row.systems:
                    self.measure(row, system, rep, partial(self._control_once, row, system, rep, p, v))

    def _direct_write(self, amount: int, offset: int, *, filename: str | None = None, uri: str | None = None) -> None:
        if amount <= 0:
            return
        job = FioJob(rw="write", bs="1m", engine="nbd" if uri else "psync", direct=uri is None, size=amount,
                     offset=offset, refill=True)
        run_fio(job, filename=filename, uri=uri)

    def _control_once(self, row: Row, system: str, rep: int, p: int, v: int, cell: Cell) -> str:
        """One timed checkpoint or failover after ``p`` bytes of primary and ``v`` bytes of SVM writes."""
        p_off = self.s.size // 2  # primary writes and SVM writes touch different blocks
        if system == "raw":
            src = os.path.join(self.dir, f"cp-{row.amount // MiB}m.src")
            if not os.path.exists(src):
                self.fill_random(src, row.amount)
            dst = os.path.join(self.dir, "cp.dst")
            drop_caches()
            t0 = time.monotonic()
            run(["cp", src, dst], timeout=600)
            run(["sync", dst], timeout=600)
            seconds = time.monotonic() - t0
            os.unlink(dst)
            cell.add(seconds * 1000)
            return f"{seconds * 1000:.1f} ms (cp {row.amount // MiB} MiB + sync)"
        if system == "colofs":
            pair = self.pair
            assert pair is not None
            sec = pair.secondary
            if row.group == "checkpoint":
                vm = PVM if p else SVM
                pair.checkpoint_timed(vm)
            else:
                vm = f"fo{rep + 1}"
                if p:
                    pair.primary.create(vm, self.s.size)
                    self._wait_vm(vm)
                else:
                    sec.create(vm, self.s.size)
            if p:
                self._direct_write(p, p_off, filename=str(pair.primary.file(vm)))
                pair.wait_applied(vm, timeout=300)
            self._direct_write(v, 0, filename=str(sec.file(vm)))
            drop_caches()
            hidden, active = sec.buffered(vm)
            if row.group == "checkpoint":
                seconds, detail = pair.checkpoint_timed(vm)
            else:
                seconds, res = sec.timed_control(vm, "failover")
                # The daemon's phases: QEMU's row starts after its NBD export (the primary's input) is gone,
                # colofs's includes closing the primary's session (session_seconds).
                detail = {"blocks_committed": res.get("blocks_committed"),
                          **{k: v for k, v in res.items() if k.endswith("_seconds")}}
            cell.add(seconds * 1000, hidden_bytes=hidden, active_bytes=active, **detail)
            return f"{seconds * 1000:.1f} ms ({(hidden + active) / MiB:.0f} MiB buffered)"
        chain = self.chain
        assert chain is not None
        if row.group == "checkpoint":
            chain.checkpoint()
        else:
            chain.restart()  # the previous failover left base alone in the graph
        if p:
            self._direct_write(p, p_off, uri=chain.nbd_uri)
        self._direct_write(v, 0, filename=chain.file)
        drop_caches()
        hidden, active = chain.overlay_bytes()
        if row.group == "checkpoint":
            seconds = chain.checkpoint()
            cell.add(seconds * 1000, hidden_bytes=hidden, active_bytes=active)
        else:
            seconds, total = chain.failover()
            cell.add(seconds * 1000, hidden_bytes=hidden, active_bytes=active, total_ms=round(total * 1000, 2))
        return f"{seconds * 1000:.1f} ms ({(hidden + active) / MiB:.0f} MiB in the qcow2 files)"

    def _wait_vm(self, vm: str, timeout: float = 120) -> None:
        """Wait for the secondary to attach a VM the primary just created."""
        assert self.pair is not None
        sec = self.pair.secondary
        self.pair.wait(lambda: sec.vm_status(vm) is not None, timeout, f"VM {vm} (created on the primary) on the secondary")

    # -- memory ----------------------------------------------------------------------------

    def run_memory(self) -> None:
        for row in (r for r in self.rows if r.group == "memory"):
            if row.id == "rss-1t-sparse":
                self.notes.append(
                    "rss-1t-sparse: colofs only; QEMU's qcow2 allocating a cluster and L2 tables per write "
                    "across 1 TiB ran at ~1.4k IOPS on this machine (minutes for 1 GiB); its L2 cache is bounded")
                self.measure(row, "colofs", 0, partial(self._sparse, row))
            else:
                self.memory.sample()
                for system in row.systems:
                    self.measure(row, system, 0, partial(self._peak, row, system))

    def _peak(self, row: Row, system: str, cell: Cell) -> str:
        """The highest peak (RSS: VmHWM; PSS: sampled) of any one process of the daemon this cell stands for."""
        kind, side = row.id.split("-")[0], row.id.split("-")[-1]
        name = MEMORY_TARGETS[side][system]
        peaks = self.memory.peaks(name)
        kib = peaks.highest(kind)
        if kib <= 0:  # e.g. no row of this run needed a primary
            why = f"no {LABELS[system]} {side} daemon ran in this run"
            cell.skip(why)
            return f"skipped: {why}"
        per_process = peaks.rss if kind == "rss" else peaks.pss
        cell.add(kib / 1024, processes={k: round(v / 1024, 1) for k, v in per_process.items()})
        return f"{kind.upper()} {kib / 1024:.1f} MiB (the highest of {len(per_process)} process(es) seen)"

    def _sparse(self, row: Row, cell: Cell) -> str:
        """RSS of a fresh colofs daemon serving a 1 TiB sparse disk, after random 4 KiB writes all over it."""
        assert row.job is not None
        m = ColofsMount(self.dir, "sparse", "secondary")
        self.extra_mounts.append(m)
        m.mount(*self.s.mount_options)
        path = str(m.create("big", row.job.size))
        before = m.rss_kib()
        r = run_fio(row.job, filename=path)
        after = m.rss_kib()
        hwm = m.hwm_kib()
        m.cleanup()
        cell.add(after / 1024, rss_before_mib=round(before / 1024, 1), hwm_mib=round(hwm / 1024, 1),
                 write_iops=round(r.iops))
        return (f"VmRSS {before / 1024:.1f} -> {after / 1024:.1f} MiB (peak {hwm / 1024:.1f}) "
                f"at {r.iops / 1000:.1f}k IOPS")

