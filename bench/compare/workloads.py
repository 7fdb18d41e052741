"""The rows of the comparison: what each measures, in which unit, and which way is better.

Row ids are stable (``--only`` and the JSON use them): ``MODE-OP`` for the
SVM's fio rows (MODE ``buffered``, ``direct``, ``aio16``; OP ``seq-write``,
``seq-read``, ``rand-write``, ``rand-read``), ``primary-MODE-*`` for the protected
VM's disk on the primary, ``ingest-*`` for the primary's writes into the secondary, ``checkpoint-64m``/``failover-256m``, and
``rss-*`` for memory.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from bench.compare.fio import FioJob
from bench.host import MiB

SYSTEMS = ("colofs", "nbd", "floor", "qemu", "raw")  # also the order of the table's columns
BASE = ("colofs", "qemu", "raw")  # what a row measures unless it says otherwise
LABELS = {"colofs": "colofs", "nbd": "colofs NBD", "floor": "pyfuse3 floor", "qemu": "QEMU", "raw": "raw file"}
# What a column holds, by row group, where it is not what the label says.
COLUMN_NOTES = {
    "nbd": "colofs NBD: svm rows, fio's nbd engine on colofs's NBD unix socket (export VM/DISK); primary rows, "
           "the same on the colofs primary's NBD socket (the protected VM's disk, its writes forwarded as the "
           "file's are); ingest rows, QEMU's quorum primary (local raw + NBD child) feeding colofs's "
           "VM/DISK:ingest export",
    "floor": "pyfuse3 floor: bench/floor_fs.py, a pyfuse3 + trio passthrough (os.pread/os.pwrite on the loop, "
             "writeback cache) over a copy of the seed, same fio jobs; 'bound' in 'vs floor': colofs is within "
             "0.8x-1.25x of the floor and the floor itself is below QEMU, so no handler on pyfuse3's loop gets "
             "past QEMU",
    "qemu": "QEMU: svm rows, the secondary chain's FUSE export; ingest rows, fio's nbd engine into the chain's "
            "copy-before-write node; primary rows, QEMU's COLO primary (quorum of a local raw file and an NBD "
            "child into the chain) over FUSE; memory rows, qemu-storage-daemon",
}


@dataclass(frozen=True)
class Row:
    id: str
    group: str  # svm | primary | ingest | checkpoint | failover | memory
    title: str
    unit: str  # MB/s | ms | MiB
    higher_is_better: bool
    job: FioJob | None = None
    amount: int = 0  # bytes buffered before a checkpoint or failover
    systems: tuple[str, ...] = BASE
    default: bool = True  # False: only run when --only names it

    @property
    def small_blocks(self) -> bool:
        """4 KiB rows also report IOPS."""
        return self.job is not None and self.job.bs == "4k"


MODES = (
    ("buffered", "buffered psync", "psync", False, 1),
    ("direct", "O_DIRECT psync", "psync", True, 1),
    ("aio16", "O_DIRECT libaio qd16", "libaio", True, 16),
)
# NBD has no page cache of its own: its buffered row would repeat the O_DIRECT one.
MODE_SYSTEMS = {
    "buffered": ("colofs", "floor", "qemu", "raw"),
    "direct": ("colofs", "nbd", "floor", "qemu", "raw"),
    "aio16": ("colofs", "nbd", "floor", "qemu", "raw"),
}
FLOOR_BOUND = 0.8  # colofs within this factor of the floor (either way), the floor below QEMU: bound by it
OPS = (
    ("seq-write", "seq write 1M", "write", "1m"),
    ("seq-read", "seq read 1M", "read", "1m"),
    ("rand-write", "rand write 4K", "randwrite", "4k"),
    ("rand-read", "rand read 4K", "randread", "4k"),
)


def svm_rows(size: int, runtime: float) -> list[Row]:
    """fio on the first ``size`` bytes of the SVM's file: 3 modes x 4 operations."""
    rows = []
    for mode, mode_title, engine, direct, depth in MODES:
        for op, op_title, rw, bs in OPS:
            job = FioJob(rw=rw, bs=bs, engine=engine, direct=direct, iodepth=depth, size=size, runtime=runtime)
            rows.append(Row(f"{mode}-{op}", "svm", f"{mode_title} {op_title}", "MB/s", True, job,
                            systems=MODE_SYSTEMS[mode]))
    return rows


INGEST = ("colofs", "nbd", "qemu", "raw")  # nbd: QEMU's quorum primary feeding colofs's ingest export


def ingest_rows(size: int, runtime: float) -> list[Row]:
    """The primary's writes arriving at the secondary, hidden buffer filling from empty."""
    seq = FioJob(rw="write", bs="1m", engine="libaio", direct=True, iodepth=16, size=size, end_fsync=True,
                 refill=True)
    rand = FioJob(rw="randwrite", bs="4k", engine="libaio", direct=True, iodepth=16, size=size, runtime=runtime,
                  end_fsync=True, refill=True)
    return [
        # fio's nbd engine covers sequential ingest; nbdcopy is opt-in to keep the run short.
        Row("ingest-seq-nbdcopy", "ingest", f"ingest seq {size // MiB} MiB, nbdcopy --flush", "MB/s", True,
            default=False),
        Row("ingest-seq-qd16", "ingest", f"ingest seq write 1M qd16, {size // MiB} MiB", "MB/s", True, seq,
            systems=INGEST),
        Row("ingest-rand-qd16", "ingest", "ingest rand write 4K qd16", "MB/s", True, rand, systems=INGEST),
    ]


PRIMARY = ("colofs", "nbd", "qemu", "raw")  # nbd: the primary's disk over its own NBD socket, as QEMU attaches it
PRIMARY_OPS = (
    ("seq-write", "O_DIRECT seq write 1M", "write", "1m", "psync", 1),
    ("rand-write", "O_DIRECT rand write 4K qd1", "randwrite", "4k", "psync", 1),
    ("aio16-rand-write", "O_DIRECT libaio rand write 4K qd16", "randwrite", "4k", "libaio", 16),
)


def primary_rows(size: int, runtime: float) -> list[Row]:
    """The protected VM's disk on the primary: colofs's primary file (async and sync) beside QEMU's quorum primary."""
    rows = []
    for mode in ("async", "sync"):
        for op, title, rw, bs, engine, depth in PRIMARY_OPS:
            job = FioJob(rw=rw, bs=bs, engine=engine, direct=True, iodepth=depth, size=size, runtime=runtime,
                         refill=True)
            rows.append(Row(f"primary-{mode}-{op}", "primary", f"primary ({mode}) {title}", "MB/s", True, job,
                            systems=PRIMARY))
    return rows


def control_rows() -> list[Row]:
    return [
        Row("checkpoint-64m", "checkpoint", "checkpoint, 64 MiB buffered", "ms", False, amount=64 * MiB),
        Row("failover-256m", "failover", "failover commit, 256 MiB buffered", "ms", False, amount=256 * MiB),
    ]


def memory_rows(sparse_writes: int) -> list[Row]:
    return [
        Row("rss-1t-sparse", "memory",
            f"RSS, 1 TiB sparse disk after {sparse_writes // MiB} MiB of rand 4K writes", "MiB", False,
            FioJob(rw="randwrite", bs="4k", engine="libaio", direct=True, iodepth=16, size=1 << 40,
                   io_size=sparse_writes), systems=("colofs",)),
        # Per process, the highest of each daemon's processes: colofs's secondary and primary against the
        # qemu-storage-daemon in the same role (the chain; the quorum primary) and the floor's process.
        Row("rss-peak-secondary", "memory", "peak RSS (VmHWM), secondary daemon", "MiB", False,
            systems=("colofs", "floor", "qemu")),
        Row("pss-peak-secondary", "memory", "peak PSS (sampled), secondary daemon", "MiB", False,
            systems=("colofs", "floor", "qemu")),
        Row("rss-peak-primary", "memory", "peak RSS (VmHWM), primary daemon", "MiB", False,
            systems=("colofs", "qemu")),
        Row("pss-peak-primary", "memory", "peak PSS (sampled), primary daemon", "MiB", False,
            systems=("colofs", "qemu")),
    ]


def all_rows(size: int, runtime: float, sparse_writes: int) -> list[Row]:
    return [*svm_rows(size, runtime), *primary_rows(size, runtime), *ingest_rows(size, runtime), *control_rows(),
            *memory_rows(sparse_writes)]


def select(rows: list[Row], only: str | None) -> list[Row]:
    """Rows whose id matches one of the comma-separated patterns (exact, or fnmatch like ``direct-*``).

    Without patterns: the default rows.
    """
    if not only:
        return [r for r in rows if r.default]
    pats = [p.strip() for p in only.split(",") if p.strip()]
    return [r for r in rows if any(r.id == p or fnmatch.fnmatchcase(r.id, p) for p in pats)]
