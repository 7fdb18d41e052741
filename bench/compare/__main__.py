"""``python -m bench.compare``: colofs beside QEMU's replication chain and a raw file, in one run.

    sudo .venv/bin/python -m bench.compare [--quick] [--reps N] [--only ROWS] [--size 1G]

Exit status: 0 when every selected cell was measured or skipped for a stated
reason, 1 when a measurement failed (the table and JSON say which and why),
2 on a usage error, 130 when interrupted (after cleaning up).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from types import FrameType

from bench.compare import qemu_chain
from bench.compare.proc import progress
from bench.compare.report import machine_info, render, write_json
from bench.compare.runner import Bench, Settings
from bench.compare.workloads import all_rows, select
from bench.host import GiB, MiB
from mountctl.units import parse_size

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_JSON = os.path.join(REPO, "bench", "results", "latest.json")


def size_arg(text: str) -> int:
    """A working size: mountctl's size syntax, a whole number of MiB, at least 16M."""
    try:
        value = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value < 16 * MiB or value % MiB:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of MiB, at least 16M")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 rep, 1.5 s per fio run (about 3 minutes)")
    p.add_argument("--reps", type=int, help="repetitions per row (default 3; 1 with --quick)")
    p.add_argument("--runtime", type=float, help="seconds per time-based fio run (default 3; 1.5 with --quick)")
    p.add_argument("--only", metavar="ROWS", help="comma-separated row ids or patterns, e.g. 'direct-*,checkpoint-64m'")
    p.add_argument("--size", type=size_arg, default=GiB, help="working size of every file (default 1G)")
    p.add_argument("--sparse-writes", type=size_arg,
                   help="random 4K writes into the 1 TiB disk (default 1G; 128M with --quick)")
    p.add_argument("--dir", default="/var/tmp", help="where the temporary work directory goes (default /var/tmp)")
    p.add_argument("--json", default=DEFAULT_JSON, help="result file (default bench/results/latest.json)")
    p.add_argument("--qemu-bin", metavar="DIR",
                   help="directory of qemu-storage-daemon and qemu-img to compare with (e.g. QEMU 10.0.2 unpacked "
                        "by `make bench-qemu10`); default: the ones on PATH")
    p.add_argument("--single-process", dest="workers", action="store_false",
                   help="mount colofs with --single-process (one process for every VM) instead of a process per "
                        "VM (the default, whose memory rows show the highest process and the JSON each one)")
    p.add_argument("--list", action="store_true", help="list the row ids and exit")
    return p


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quick = args.quick
    settings = Settings(
        size=args.size,
        runtime=args.runtime if args.runtime is not None else (1.5 if quick else 3.0),
        reps=args.reps if args.reps is not None else (1 if quick else 3),
        sparse_writes=args.sparse_writes if args.sparse_writes is not None else (128 * MiB if quick else GiB),
        quick=quick,
        qemu_bin=args.qemu_bin,
        workers=args.workers,
    )
    if settings.reps < 1 or settings.runtime <= 0:
        parser.error("--reps must be at least 1 and --runtime positive")
    rows = select(all_rows(settings.size, settings.runtime, settings.sparse_writes), args.only)
    if args.list:
        listed = rows if args.only else all_rows(settings.size, settings.runtime, settings.sparse_writes)
        print("\n".join(f"{r.id:22s} {r.title}{'' if r.default else '  (only with --only)'}" for r in listed))
        return 0
    if not rows:
        parser.error(f"--only {args.only!r} matches no row (see --list)")
    if os.geteuid() != 0:
        parser.error("run as root: it drops page caches and mounts FUSE file systems")
    if shutil.which("fio") is None:
        parser.error("fio is not installed (Debian: fio); every row needs it")
    if not os.path.isdir(args.dir):
        parser.error(f"--dir {args.dir}: no such directory")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    workdir = tempfile.mkdtemp(prefix="colofs-compare-", dir=args.dir)
    bench = Bench(settings, rows, workdir)
    started = time.monotonic()
    interrupted = False
    try:
        bench.run()
    except KeyboardInterrupt:
        interrupted = True
        progress("interrupted")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        try:
            machine = machine_info(workdir, args.qemu_bin)
        finally:
            bench.cleanup()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    took = time.monotonic() - started
    bench.finish_cells(interrupted)
    if interrupted:
        bench.notes.append("the run was interrupted: rows without samples were not measured")
    header = (f"colofs vs QEMU {qemu_chain.version(args.qemu_bin)} vs raw file: fio on the first {settings.size // MiB} MiB, "
              f"{settings.runtime:g} s per time-based run, median [min-max] of {settings.reps} interleaved "
              f"rep(s), caches dropped before each; MB/s (IOPS for 4K), ms, MiB; run took {took / 60:.1f} min")
    print(render(bench.results, header))
    bench.notes.append(f"colofs and the floor ran on {pyfuse3_build()}")
    for note in bench.notes:
        print(f"note: {note}")
    write_json(args.json, bench.results, machine, {
        "size": settings.size, "runtime_s": settings.runtime, "reps": settings.reps,
        "sparse_writes": settings.sparse_writes, "quick": quick, "only": args.only,
        "seconds": round(took, 1), "interrupted": interrupted, "qemu_bin": args.qemu_bin, "workers": args.workers,
        "qemu_version": qemu_chain.version(args.qemu_bin), "pyfuse3": pyfuse3_build(),
    }, bench.notes)
    print(f"results: {args.json}")
    if interrupted:
        return 130
    return 1 if any(c.status == "failed" for r in bench.results for c in r.cells.values()) else 0


def pyfuse3_build() -> str:
    """Which pyfuse3 the venv holds: its version and session loop (patches/pyfuse3 or stock)."""
    try:
        import pyfuse3
    except ImportError as e:
        return f"no importable pyfuse3 ({e})"
    loop = ("the non-blocking session loop (patches/pyfuse3)" if getattr(pyfuse3, "NONBLOCKING_SESSION_LOOP", False)
            else "its stock session loop")
    return f"pyfuse3 {getattr(pyfuse3, '__version__', '?')} with {loop}"


if __name__ == "__main__":
    sys.exit(main())
