"""One comparison run: set the systems up, measure every selected row, tear everything down.

Data placement (the same for colofs and QEMU): every file starts as the same
random image (``seed.raw``), which is the secondary's *base*: imported into
the colofs disk, copied to QEMU's ``base.raw``, copied to the raw file. Before
each measurement colofs and QEMU are checkpointed, so every write row starts
with empty buffers (as right after a COLO checkpoint) and every read row
reads base through empty active and hidden layers -- the SVM after a
checkpoint. Caches are dropped right before each measurement, and the
repetitions are interleaved (rep 1 of colofs, QEMU, raw; then rep 2 ...).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from functools import partial

from bench.compare import colofs_pair, qemu_chain
from bench.compare.colofs_pair import ColofsPair
from bench.compare.fio import run_fio
from bench.compare.floor import FloorMount
from bench.compare.proc import abort_fuse, mounts_under, progress
from bench.compare.qemu_chain import QSD, QemuChain, tool
from bench.compare.qemu_quorum import QuorumPrimary
from bench.compare.report import Cell
from bench.compare.rows_control import ControlRows
from bench.compare.rows_repl import ReplicationRows
from bench.compare.state import ING, PVM, SVM, Settings
from bench.compare.workloads import COLUMN_NOTES, Row
from bench.host import GiB, MiB, StepError, drop_caches
from mountctl.pair import detach, free_port

__all__ = ["Bench", "Settings"]

METHOD = [  # (groups the note applies to, the note)
    ({"svm"}, "data: every file starts as the same random image; colofs and QEMU hold it in base and are "
     "checkpointed before every measurement, so writes start with empty buffers and reads read base through "
     "empty layers"),
    ({"svm"}, "O_DIRECT on colofs and on QEMU's export ends in the host page cache of their files (colofs writes "
     "its store buffered, QEMU's nodes use cache.direct=off); on the raw file it reaches the device"),
    ({"svm", "ingest", "checkpoint"}, "QEMU checkpoint (no make_empty over QMP): empty qcow2 overlays swapped in "
     "with blockdev-snapshot + blockdev-reopen, the copy-before-write node and its NBD export re-created (fresh "
     "copy bitmap); timed from the first QMP command to the last reply, the empty qcow2 files made untimed "
     "beforehand"),
    ({"failover"}, "QEMU failover: NBD export and copy-before-write node removed, FUSE export detached (QEMU "
     "7.2's writable FUSE export holds RESIZE, which an active commit refuses), then block-commit of "
     "active+hidden into base timed to BLOCK_JOB_COMPLETED; detail.total_ms includes the export handling"),
    ({"primary"}, "primary rows: fio O_DIRECT on the colofs primary's file of the replicated VM in the row's mode "
     "(async: the COLO default; sync: a write completes once the secondary has it, like QEMU's quorum), "
     "checkpointed before each run and drained (secondary applied everything) after it, untimed; QEMU: a "
     "quorum primary (vote-threshold=1) over a local raw file and an NBD child into the chain's "
     "copy-before-write export, exported over FUSE, started after the chain's checkpoint; raw: the raw file"),
    ({"checkpoint", "failover"}, "colofs checkpoint/failover: the user.colofs.* setxattr that mountctl issues, "
     "timed in-process; raw: cp of the same amount + sync of the copy"),
    ({"ingest"}, "ingest: bytes / (writer start -> secondary applied the primary's last seq) for colofs, "
     "(writer start -> writer exit after its flush) for QEMU (fio's nbd engine into copy-before-write), colofs "
     "NBD (fio's nbd engine into QEMU's quorum primary, whose NBD child writes into colofs's VM/DISK:ingest; "
     "the secondary checkpointed locally before each run) and raw"),
]


class Bench(ReplicationRows, ControlRows):
    """Holds the systems and the results of one run; :meth:`cleanup` undoes everything it started."""

    def __init__(self, settings: Settings, rows: list[Row], workdir: str) -> None:
        super().__init__(settings, rows, workdir)
        groups = {r.group for r in rows}
        self.notes += [note for where, note in METHOD if where & groups]
        self.notes += [note for name, note in COLUMN_NOTES.items() if self.uses(name)]

    # -- setup -----------------------------------------------------------------------------

    def setup(self) -> None:
        progress(f"work directory {self.dir}")
        checks = (("colofs", colofs_pair.available), ("floor", colofs_pair.available),
                  ("qemu", partial(qemu_chain.available, self.s.qemu_bin)))
        for system, check in checks:
            why = check() if self.uses(system) else None
            if why:
                self.set_down(system, "skipped", f"not installed here: {why}")
                progress(f"{system}: SKIPPED, {why}")
        progress(f"writing the seed image: {self.s.size // MiB} MiB of random data")
        try:
            self.fill_random(self.seed, self.s.size)
            if self.uses("raw"):
                os.makedirs(os.path.dirname(self.raw_file), exist_ok=True)
                shutil.copyfile(self.seed, self.raw_file)
        except (StepError, OSError) as e:
            for system in ("colofs", "floor", "qemu", "raw"):
                self.set_down(system, "failed", f"setup: the seed image: {e}")
            progress(f"setup FAILED: {e}")
            return
        if self.uses("colofs") and "colofs" not in self.down:
            self._setup_colofs()
        if self.uses("floor") and "floor" not in self.down:
            try:
                progress("floor: mounting the pyfuse3 passthrough (bench/floor_fs.py) over a copy of the seed")
                self.floor = FloorMount(os.path.join(self.dir, "floor"), self.seed)
                self.floor.start()
            except (StepError, OSError) as e:
                self.set_down("floor", "failed", f"setup: {e}")
                progress(f"floor: setup FAILED: {e}")
        if self.uses("qemu") and "qemu" not in self.down:
            try:
                progress("qemu: starting qemu-storage-daemon with active -> hidden -> base (copy-before-write)")
                self.chain = QemuChain(os.path.join(self.dir, "qemu"), self.s.size, free_port(),
                                       base_from=self.seed, bindir=self.s.qemu_bin)
                self.chain.start()
            except (StepError, OSError) as e:
                self.set_down("qemu", "failed", f"setup: {e}")
                progress(f"qemu: setup FAILED: {e}")
        if self.uses("qemu", "primary") and self.chain is not None:
            self.qemu_primary = QuorumPrimary(
                os.path.join(self.dir, "quorum-primary"), tool(QSD, self.s.qemu_bin),
                f"server.type=inet,server.host=127.0.0.1,server.port={self.chain.port},export=cbw", "fuse",
                self.seed)
        if self.uses("colofs", "primary", "ingest", "checkpoint", "failover") and "colofs" not in self.down:
            self._setup_primary()

    def _setup_colofs(self) -> None:
        try:
            progress("colofs: mounting the secondary and importing the seed as its base")
            self.pair = ColofsPair(self.dir, free_port())
            nbd = ("--nbd-socket", self.nbd_sock) if self.uses("nbd") else ()
            self.pair.mount_secondary(*self.s.mount_options, *nbd)
            self.svm_file = str(self.pair.secondary.import_(SVM, self.seed))
        except (StepError, OSError) as e:
            self.set_down("colofs", "failed", f"setup: {e}")
            progress(f"colofs: setup FAILED: {e}")
            return
        if self.uses("nbd", "ingest"):
            self._setup_ingest_quorum()

    def _setup_ingest_quorum(self) -> None:
        """A secondary VM with the seed as base, and QEMU's quorum primary whose NBD child is its ingest export."""
        assert self.pair is not None
        cells = [self.result(r).cells["nbd"] for r in self.rows if r.group == "ingest" and "nbd" in r.systems]
        why = qemu_chain.available(self.s.qemu_bin)
        if why:
            for cell in cells:
                cell.skip(f"QEMU's quorum primary needs {why}")
            return
        try:
            progress(f"colofs: importing the seed as {ING} for QEMU's quorum primary to feed over NBD")
            self.pair.secondary.import_(ING, self.seed)
        except (StepError, OSError) as e:
            for cell in cells:
                cell.fail(f"setup: {e}")
            return
        self.ingest_quorum = QuorumPrimary(
            os.path.join(self.dir, "quorum-ingest"), tool(QSD, self.s.qemu_bin),
            f"server.type=unix,server.path={self.nbd_sock},export={ING}/disk:ingest", "nbd", self.seed)

    def _setup_primary(self) -> None:
        assert self.pair is not None
        try:
            progress("colofs: mounting a primary with --peer and probing replication")
            nbd = ("--nbd-socket", self.pnbd_sock) if self.uses("nbd", "primary") else ()
            self.pair.mount_primary(*self.s.mount_options, *nbd)
            why = self.pair.probe(PVM, self.seed, timeout=60 + 60 * self.s.size / GiB)
        except (StepError, OSError) as e:
            why = f"primary setup failed: {e}"
        self.pair.replication = why
        if why:
            progress(f"colofs: replication not available: {why}")
            self.notes.append(f"colofs replication not available: {why}")
        else:
            progress("colofs: replication works (the secondary applied the primary's write)")

    # -- the SVM's fio rows ----------------------------------------------------------------

    def run_svm(self) -> None:
        for row in (r for r in self.rows if r.group == "svm"):
            assert row.job is not None
            for rep in range(self.s.reps):
                for system in row.systems:
                    self.measure(row, system, rep, partial(self._svm_once, row, system))

    def _svm_once(self, row: Row, system: str, cell: Cell) -> str:
        assert row.job is not None
        job, path, uri = row.job, "", None
        if system in ("colofs", "nbd"):
            assert self.pair is not None
            self.pair.secondary.control(SVM, "checkpoint")
            path = self.svm_file
            if system == "nbd":  # the same disk, over colofs's NBD socket; queue depth as the row's
                job, uri = job.with_(engine="nbd", direct=False), self.nbd_uri(f"{SVM}/disk")
        elif system == "qemu":
            assert self.chain is not None
            self.chain.checkpoint()
            path = self.chain.file
        elif system == "floor":
            assert self.floor is not None
            path = self.floor.file
        else:
            path = self.raw_file
        drop_caches()
        r = run_fio(job, filename=None if uri else path, uri=uri)
        small = row.small_blocks
        cell.add(r.mb_s, r.iops if small else None)
        return f"{r.mb_s:.0f} MB/s" + (f" ({r.iops / 1000:.1f}k IOPS)" if small else "")

    # -- all of it -------------------------------------------------------------------------

    def run(self) -> None:
        self.memory.start()
        self.setup()
        self.run_svm()
        self.run_primary()
        self.run_ingest()
        self.run_control()
        self.run_memory()

    def finish_cells(self, interrupted: bool) -> None:
        """Cells of systems that never came up get the reason; untouched cells say why."""
        for res in self.results:
            for system, cell in res.cells.items():
                if system in self.down and not cell.samples:
                    kind, why = self.down[system]
                    if kind == "skipped":
                        cell.skip(why)
                    else:
                        cell.fail(why)
                elif cell.status == "ok" and not cell.samples:
                    if interrupted:
                        cell.skip("not measured: the run was interrupted")
                    else:
                        cell.fail("no measurement was taken")

    def cleanup(self) -> None:
        """Unmount colofs, stop the QEMU daemons (by PID), detach anything left, remove the work directory."""
        progress("cleaning up: unmounting colofs and the floor, stopping qemu-storage-daemon")
        self.memory.stop()
        for m in self.extra_mounts:
            _quietly(m.cleanup)
        if self.ingest_quorum is not None:
            _quietly(self.ingest_quorum.stop)
        if self.floor is not None:
            _quietly(self.floor.stop)
        if self.qemu_primary is not None:
            _quietly(self.qemu_primary.stop)
        if self.chain is not None:
            _quietly(self.chain.stop)
        if self.pair is not None:
            _quietly(self.pair.cleanup)
        for point in mounts_under(self.dir):  # only what a dead or stuck daemon left behind
            abort_fuse(point)
            detach(point)
        left = mounts_under(self.dir)
        if left:
            progress(f"WARNING: still mounted, work directory kept: {', '.join(left)}")
            return
        shutil.rmtree(self.dir, ignore_errors=True)


def _quietly(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception as e:  # cleanup goes on with the next daemon
        progress(f"cleanup step failed: {e}")

