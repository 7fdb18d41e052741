"""fio: one job description for every system, its command line, and its JSON result.

The same :class:`FioJob` runs against a file (raw, the colofs mount, QEMU's
FUSE export) or an NBD URI (QEMU's copy-before-write export), so the only
difference between two systems' measurements is the target.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from bench.host import StepError, fio_job, run


@dataclass(frozen=True)
class FioJob:
    """One fio workload; ``runtime`` set means time-based, else it writes ``io_size`` (or ``size``) once."""

    rw: str
    bs: str
    engine: str = "psync"
    direct: bool = False
    iodepth: int = 1
    size: int = 1 << 30
    offset: int = 0
    runtime: float | None = None
    io_size: int | None = None
    end_fsync: bool = False
    refill: bool = False

    @property
    def is_read(self) -> bool:
        return "read" in self.rw

    def with_(self, **changes: object) -> FioJob:
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class FioResult:
    bytes: int
    bw_bytes: float
    iops: float
    runtime_s: float
    wall_s: float

    @property
    def mb_s(self) -> float:
        return self.bw_bytes / 1e6


def argv(job: FioJob, *, filename: str | None = None, uri: str | None = None) -> list[str]:
    """The fio command line; exactly one of ``filename`` and ``uri`` (NBD) names the target."""
    args = [
        "fio", "--name=bench", f"--rw={job.rw}", f"--bs={job.bs}", f"--ioengine={job.engine}",
        f"--direct={int(job.direct)}", f"--iodepth={job.iodepth}", f"--size={job.size}",
        f"--offset={job.offset}", "--randrepeat=0", "--norandommap", "--output-format=json",
    ]
    if uri is not None:
        args.append(f"--uri={uri}")
    else:
        assert filename is not None
        args += [f"--filename={filename}", "--fallocate=none", "--allow_file_create=0", "--invalidate=1"]
    if job.runtime is not None:
        args += [f"--runtime={int(job.runtime * 1000)}ms", "--time_based"]
    if job.io_size is not None:
        args.append(f"--io_size={job.io_size}")
    if job.end_fsync:
        args.append("--end_fsync=1")
    if job.refill:
        args.append("--refill_buffers")  # incompressible data: the wire's lz4 gains nothing
    return args


def timeout_for(job: FioJob, slowest_bytes_per_s: float = 5e6) -> float:
    """A generous bound: time-based jobs end on their own; size-based ones at a very low rate."""
    if job.runtime is not None:
        return job.runtime * 4 + 120
    return (job.io_size or job.size) / slowest_bytes_per_s + 120


def parse(stdout: str, is_read: bool) -> tuple[int, float, float, float]:
    """(bytes, bw_bytes, iops, runtime_s) of the first job in fio's JSON."""
    side = fio_job(stdout).get("read" if is_read else "write")
    try:
        return int(side["io_bytes"]), float(side["bw_bytes"]), float(side["iops"]), float(side["runtime"]) / 1000
    except (ValueError, KeyError, TypeError) as e:
        raise StepError(f"fio JSON not understood: {e}") from None


def run_fio(job: FioJob, *, filename: str | None = None, uri: str | None = None) -> FioResult:
    """Run one fio job; a zero result is an error (the system did not do the work)."""
    t0 = time.monotonic()
    res = run(argv(job, filename=filename, uri=uri), timeout=timeout_for(job))
    wall = time.monotonic() - t0
    nbytes, bw, iops, runtime = parse(res.stdout, job.is_read)
    if nbytes <= 0 or bw <= 0:
        raise StepError(f"fio moved no data ({nbytes} bytes)")
    return FioResult(nbytes, bw, iops, runtime, wall)
