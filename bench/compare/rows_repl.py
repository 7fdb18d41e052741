"""Rows of the replicated VM's writes: the protected VM's disk on the primary, and ingest into the secondary."""

from __future__ import annotations

import os
import shutil
import time
from functools import partial

from bench.compare.fio import run_fio
from bench.compare.report import Cell
from bench.compare.state import ING, PVM, BenchState
from bench.compare.workloads import Row
from bench.host import StepError, drop_caches, run


class ReplicationRows(BenchState):
    """``run_primary`` and ``run_ingest``."""

    # -- the protected VM's disk on the primary --------------------------------------------

    def run_primary(self) -> None:
        rows = [r for r in self.rows if r.group == "primary"]
        if not rows:
            return
        if self.pair is not None and self.pair.replication:
            for row in rows:
                for system in ("colofs", "nbd"):
                    self.result(row).cells[system].skip(f"replication not available: {self.pair.replication}")
        try:
            for row in rows:
                for rep in range(self.s.reps):
                    for system in row.systems:
                        self.measure(row, system, rep, partial(self._primary_once, row, system))
        finally:
            if self.pvm_mode != "async" and self.pair is not None and self.pair.has_primary:
                try:
                    self._set_mode("async")  # the later rows replicate in the default mode
                except StepError as e:
                    self.notes.append(f"the replicated VM stayed in {self.pvm_mode} mode after the primary rows: {e}")

    def _set_mode(self, mode: str) -> None:
        assert self.pair is not None
        self.pair.primary.control(PVM, "mode", mode.encode())
        self.pvm_mode = mode

    def _primary_once(self, row: Row, system: str, cell: Cell) -> str:
        assert row.job is not None
        quorum, job, uri = None, row.job, None
        if system in ("colofs", "nbd"):
            pair = self.pair
            assert pair is not None and pair.has_primary
            if pair.replication:
                raise StepError(f"replication stopped earlier in this run: {pair.replication}")
            mode = row.id.split("-")[1]
            if mode != self.pvm_mode:
                self._set_mode(mode)
            pair.checkpoint_timed(PVM)
            path = str(pair.primary.file(PVM))
            if system == "nbd":  # the same disk over the primary's NBD socket, at the row's queue depth
                job, uri = job.with_(engine="nbd", direct=False), self.nbd_uri(f"{PVM}/disk", primary=True)
        elif system == "qemu":
            assert self.chain is not None
            if self.qemu_primary is None:
                raise StepError("QEMU's quorum primary was not set up")
            self.chain.checkpoint()
            quorum = self.qemu_primary
            quorum.start()
            path = quorum.file
        else:
            path = self.raw_file
        try:
            drop_caches()
            r = run_fio(job, filename=None if uri else path, uri=uri)
        finally:
            if quorum is not None:
                self.memory.sample()  # the quorum daemon lives only for this measurement
                quorum.stop()
        detail: dict[str, object] = {}
        if system in ("colofs", "nbd"):
            assert self.pair is not None
            t0 = time.monotonic()
            try:
                self.pair.wait_applied(PVM, timeout=120 + r.bytes / 5e6)
            except StepError as e:
                self.pair.replication = f"stalled: {e}"
                raise
            detail["drain_s"] = round(time.monotonic() - t0, 3)
        small = row.small_blocks
        cell.add(r.mb_s, r.iops if small else None, **detail)
        return f"{r.mb_s:.0f} MB/s" + (f" ({r.iops / 1000:.1f}k IOPS)" if small else "")

    # -- ingest: the primary's writes into the secondary -----------------------------------

    def run_ingest(self) -> None:
        rows = [r for r in self.rows if r.group == "ingest"]
        if not rows:
            return
        if self.pair is not None and self.pair.replication:
            for row in rows:
                self.result(row).cells["colofs"].skip(f"replication not available: {self.pair.replication}")
        for row in rows:
            if row.id == "ingest-seq-nbdcopy":
                self.notes.append("ingest-seq-nbdcopy: nbdcopy into QEMU's NBD export; into the colofs primary's "
                                  "file and the raw file through nbdkit's file plugin")
                missing = [t for t in ("nbdcopy", "nbdkit") if shutil.which(t) is None]
                for name, cell in self.result(row).cells.items():
                    if "nbdcopy" in missing or (name != "qemu" and missing):
                        cell.skip(f"{' and '.join(missing)} not installed (Debian: libnbd-bin, nbdkit)")
        for row in rows:
            for rep in range(self.s.reps):
                for system in row.systems:
                    self.measure(row, system, rep, partial(self._ingest_once, row, system))

    def _ingest_once(self, row: Row, system: str, cell: Cell) -> str:
        dest = ""
        uri = None
        job = row.job
        quorum = None
        if system == "nbd":  # QEMU's quorum primary feeding colofs's ingest export
            assert self.pair is not None and job is not None
            if self.ingest_quorum is None:
                raise StepError("QEMU's quorum primary was not set up")
            self.pair.secondary.control(ING, "checkpoint")  # the primary is drained: nothing runs yet
            quorum = self.ingest_quorum
            quorum.start()
            uri = quorum.uri
            job = job.with_(engine="nbd", direct=False)
        elif system == "colofs":
            assert self.pair is not None and self.pair.has_primary
            if self.pair.replication:
                raise StepError(f"replication stopped earlier in this run: {self.pair.replication}")
            self.pair.checkpoint_timed(PVM)
            dest = str(self.pair.primary.file(PVM))
        elif system == "qemu":
            assert self.chain is not None
            self.chain.checkpoint()
            uri = self.chain.nbd_uri
            if job is not None:
                job = job.with_(engine="nbd", direct=False)
        else:
            dest = self.raw_file
        drop_caches()
        t0 = time.monotonic()
        if job is None:  # nbdcopy of the whole image, flushed at the end
            src = os.path.join(self.dir, "ingest.raw")
            if not os.path.exists(src):
                self.fill_random(src, self.s.size)
                drop_caches()
                t0 = time.monotonic()
            # A file destination goes through nbdkit's file plugin: nbdcopy truncates a file it writes
            # directly, and a colofs disk refuses that (fixed size); raw gets the same path.
            target = [uri] if uri else ["--", "[", "nbdkit", "file", dest, "]"]
            run(["nbdcopy", "--flush", src, *target], timeout=600)
            nbytes = self.s.size
        else:
            try:
                nbytes = run_fio(job, filename=dest or None, uri=uri).bytes
            finally:
                if quorum is not None:
                    self.memory.sample()  # the quorum daemon lives only for this measurement
                    quorum.stop()
        t_written = time.monotonic()
        t_end = t_written
        if system == "colofs":
            assert self.pair is not None
            try:
                t_end = self.pair.wait_applied(PVM, timeout=60 + nbytes / 5e6)
            except StepError as e:
                self.pair.replication = f"stalled: {e}"  # the later colofs ingest measurements fail at once
                raise
        seconds = t_end - t0
        mb_s = nbytes / seconds / 1e6
        iops = nbytes / 4096 / seconds if row.small_blocks else None
        detail: dict[str, object] = {"seconds": round(seconds, 4), "bytes": nbytes}
        if system == "colofs":
            assert self.pair is not None
            detail["replication_lag_s"] = round(t_end - t_written, 4)
            detail["hidden_bytes_after"] = self.pair.secondary.buffered(PVM)[0]
        elif system == "qemu":
            assert self.chain is not None
            detail["hidden_bytes_after"] = self.chain.overlay_bytes()[0]
        elif system == "nbd":
            assert self.pair is not None
            detail["hidden_bytes_after"] = self.pair.secondary.buffered(ING)[0]
        cell.add(mb_s, iops, **detail)
        return f"{mb_s:.0f} MB/s" + (f" ({iops / 1000:.1f}k IOPS)" if iops else "") + f" in {seconds:.2f} s"

