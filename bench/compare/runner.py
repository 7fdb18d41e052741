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
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from bench.compare import colofs_pair, qemu_chain
from bench.compare.colofs_pair import ColofsMount, ColofsPair
from bench.compare.fio import FioJob, run_fio
from bench.compare.floor import FloorMount
from bench.compare.memory import MemorySampler
from bench.compare.proc import abort_fuse, mounts_under, progress
from bench.compare.qemu_chain import QSD, QemuChain, tool
from bench.compare.qemu_quorum import QuorumPrimary
from bench.compare.report import Cell, RowResult
from bench.compare.workloads import COLUMN_NOTES, LABELS, Row
from bench.host import GiB, MiB, StepError, drop_caches, run
from mountctl.pair import detach, free_port

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
PVM = "pvm"  # the replicated VM: created on the primary, attached by the secondary
SVM = "svm"  # the secondary-only VM the SVM rows run on
ING = "ing"  # the secondary VM that QEMU's quorum primary feeds through colofs's ingest export
MEMORY_TARGETS = {  # memory row side -> system -> the sampler's name for the daemon
    "secondary": {"colofs": "colofs-secondary", "floor": "floor", "qemu": "qemu-chain"},
    "primary": {"colofs": "colofs-primary", "qemu": "qemu-primary"},
}
DEPENDS = {"nbd": "colofs"}  # a system served by another one's daemon goes down with it


@dataclass(frozen=True)
class Settings:
    size: int
    runtime: float
    reps: int
    sparse_writes: int
    quick: bool
    qemu_bin: str | None = None  # directory of the QEMU programs (an unpacked newer QEMU); None: PATH


class Bench:
    """Holds the systems and the results of one run; :meth:`cleanup` undoes everything it started."""

    def __init__(self, settings: Settings, rows: list[Row], workdir: str) -> None:
        self.s = settings
        self.rows = rows
        self.dir = workdir
        self.results = [RowResult(r, {name: Cell() for name in r.systems}) for r in rows]
        groups = {r.group for r in rows}
        self.notes: list[str] = [note for where, note in METHOD if where & groups]
        self.notes += [note for name, note in COLUMN_NOTES.items() if self.uses(name)]
        self.down: dict[str, tuple[str, str]] = {}  # system -> (skipped|failed, why)
        self.pair: ColofsPair | None = None
        self.chain: QemuChain | None = None
        self.ingest_quorum: QuorumPrimary | None = None  # QEMU's primary feeding colofs's ingest export
        self.floor: FloorMount | None = None  # the pyfuse3 floor
        self.qemu_primary: QuorumPrimary | None = None  # QEMU's COLO primary over the chain
        self.pvm_mode = "async"
        self.memory = MemorySampler()
        self.memory.watch("colofs-secondary", lambda: self.pair.secondary.pid if self.pair else None)
        self.memory.watch("colofs-primary", lambda: self.pair.primary.pid if self.pair else None)
        self.memory.watch("floor", lambda: self.floor.pid if self.floor else None)
        self.memory.watch("qemu-chain", lambda: self.chain.pid if self.chain else None)
        self.memory.watch("qemu-primary", lambda: self.qemu_primary.pid if self.qemu_primary else None)
        self.extra_mounts: list[ColofsMount] = []
        self.seed = os.path.join(workdir, "seed.raw")
        self.raw_file = os.path.join(workdir, "raw", "disk.raw")
        self.svm_file = ""
        self.nbd_sock = os.path.join(workdir, "colofs.nbd")  # the colofs secondary's NBD socket

    # -- helpers ---------------------------------------------------------------------------

    def uses(self, system: str, *groups: str) -> bool:
        return any(system in r.systems and (not groups or r.group in groups) for r in self.rows)

    def result(self, row: Row) -> RowResult:
        return next(r for r in self.results if r.row.id == row.id)

    def set_down(self, system: str, kind: str, why: str) -> None:
        """``system`` cannot be measured in this run (``kind`` skipped or failed), nor what it serves."""
        for name in (system, *(s for s, host in DEPENDS.items() if host == system)):
            self.down.setdefault(name, (kind, why))

    def nbd_uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.nbd_sock}"

    def health(self, system: str) -> str | None:
        """Why ``system`` cannot take a measurement now, or None."""
        if system in self.down:
            return self.down[system][1]
        if system == "floor" and self.floor is not None:
            return self.floor.healthy()
        if system == "nbd":
            return self.health("colofs") or (None if os.path.exists(self.nbd_sock) else
                                             f"colofs's NBD socket {self.nbd_sock} is missing")
        if system == "colofs" and self.pair is not None:
            return self.pair.secondary.healthy()
        if system == "qemu" and self.chain is not None and (self.chain.proc is None or
                                                            self.chain.proc.poll() is not None):
            return "qemu-storage-daemon is not running (see qemu/qsd.log)"
        return None

    def measure(self, row: Row, system: str, rep: int, fn: Callable[[Cell], str]) -> None:
        """Run one measurement into the row's cell; a failure marks the cell and the run goes on."""
        cell = self.result(row).cells[system]
        if cell.status == "skipped" or system in self.down:
            return  # finish_cells() gives these cells the system's reason
        why = self.health(system)
        tag = f"{row.id} {system}" if row.group == "memory" else f"{row.id} rep {rep + 1}/{self.s.reps} {system}"
        if why is not None:
            cell.fail(why)
            progress(f"{tag}: FAILED: {why}")
            return
        try:
            shown = fn(cell)
            progress(f"{tag}: {shown}")
        except StepError as e:
            cell.fail(str(e))
            progress(f"{tag}: FAILED: {e}")

    def fill_random(self, path: str, size: int) -> None:
        """A file of ``size`` incompressible bytes, written by fio (fast, and no two blocks alike)."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "ab").close()
        os.truncate(path, size)
        run_fio(FioJob(rw="write", bs="1m", engine="libaio", direct=True, iodepth=8, size=size, refill=True),
                filename=path)

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
            self.pair.mount_secondary(*(("--nbd-socket", self.nbd_sock) if self.uses("nbd") else ()))
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
            self.pair.mount_primary()
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

    # -- the protected VM's disk on the primary --------------------------------------------

    def run_primary(self) -> None:
        rows = [r for r in self.rows if r.group == "primary"]
        if not rows:
            return
        if self.pair is not None and self.pair.replication:
            for row in rows:
                self.result(row).cells["colofs"].skip(f"replication not available: {self.pair.replication}")
        try:
            for row in rows:
                for rep in range(self.s.reps):
                    for system in row.systems:
                        self.measure(row, system, rep, partial(self._primary_once, row, system))
        finally:
            if self.pvm_mode != "async" and self.pair is not None and self.pair.has_primary:
                self._set_mode("async")  # the later rows replicate in the default mode

    def _set_mode(self, mode: str) -> None:
        assert self.pair is not None
        self.pair.primary.control(PVM, "mode", mode.encode())
        self.pvm_mode = mode

    def _primary_once(self, row: Row, system: str, cell: Cell) -> str:
        assert row.job is not None
        quorum = None
        if system == "colofs":
            pair = self.pair
            assert pair is not None and pair.has_primary
            if pair.replication:
                raise StepError(f"replication stopped earlier in this run: {pair.replication}")
            mode = row.id.split("-")[1]
            if mode != self.pvm_mode:
                self._set_mode(mode)
            pair.checkpoint_timed(PVM)
            path = str(pair.primary.file(PVM))
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
            r = run_fio(row.job, filename=path)
        finally:
            if quorum is not None:
                self.memory.sample()  # the quorum daemon lives only for this measurement
                quorum.stop()
        detail: dict[str, object] = {}
        if system == "colofs":
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
                detail = {"blocks_committed": res.get("blocks_committed")}
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
        return f"{kind.upper()} {kib / 1024:.1f} MiB ({len(per_process)} process(es))"

    def _sparse(self, row: Row, cell: Cell) -> str:
        """RSS of a fresh colofs daemon serving a 1 TiB sparse disk, after random 4 KiB writes all over it."""
        assert row.job is not None
        m = ColofsMount(self.dir, "sparse", "secondary")
        self.extra_mounts.append(m)
        m.mount()
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
