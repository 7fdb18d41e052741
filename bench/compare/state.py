"""What one comparison run holds (its settings, systems and results) and the helpers every kind of row uses.

:class:`BenchState` is the base of :class:`bench.compare.runner.Bench`; the
rows are measured by mixins in ``rows_repl`` (the primary, ingest) and
``rows_control`` (checkpoint, failover, memory), each over this state.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from bench.compare.colofs_pair import ColofsMount, ColofsPair
from bench.compare.fio import FioJob, run_fio
from bench.compare.floor import FloorMount
from bench.compare.memory import MemorySampler
from bench.compare.proc import progress
from bench.compare.qemu_chain import QemuChain
from bench.compare.qemu_quorum import QuorumPrimary
from bench.compare.report import Cell, RowResult
from bench.compare.workloads import Row
from bench.host import StepError

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
    workers: bool = True  # a process per VM under a supervisor (the mount's default); False: --single-process

    @property
    def mount_options(self) -> tuple[str, ...]:
        """Options every colofs mount of the run gets."""
        return () if self.workers else ("--single-process",)


class BenchState:
    """The systems and the results of one run, and how a measurement goes into a cell."""

    def __init__(self, settings: Settings, rows: list[Row], workdir: str) -> None:
        self.s = settings
        self.rows = rows
        self.dir = workdir
        self.results = [RowResult(r, {name: Cell() for name in r.systems}) for r in rows]
        self.notes: list[str] = []
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
        self.pnbd_sock = os.path.join(workdir, "colofs-primary.nbd")  # the colofs primary's NBD socket

    # -- helpers ---------------------------------------------------------------------------

    def uses(self, system: str, *groups: str) -> bool:
        return any(system in r.systems and (not groups or r.group in groups) for r in self.rows)

    def result(self, row: Row) -> RowResult:
        return next(r for r in self.results if r.row.id == row.id)

    def set_down(self, system: str, kind: str, why: str) -> None:
        """``system`` cannot be measured in this run (``kind`` skipped or failed), nor what it serves."""
        for name in (system, *(s for s, host in DEPENDS.items() if host == system)):
            self.down.setdefault(name, (kind, why))

    def nbd_uri(self, export: str, primary: bool = False) -> str:
        """An export of the secondary's NBD socket, or of the primary's."""
        return f"nbd+unix:///{export}?socket={self.pnbd_sock if primary else self.nbd_sock}"

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

