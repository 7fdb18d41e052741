"""A few VMs on a pair with a worker per VM: after 8 MiB written and a checkpoint in each, the
primary's processes hold at most the issue's 64 MiB + 16 MiB per VM of private memory, and no
primary worker more than its 16 MiB (a worker's malloc arenas kept 8 to 12 MiB of freed writes).

The figures are printed (each worker's USS), so a run shows what one VM's worker costs;
``VMS=16`` in the environment runs that many VMs instead of 4.
"""

from __future__ import annotations

import os

from bench.many_vms import describe, run, totals, uss_bound, vm_names, worker_rows
from colofs.workers.malloc import limit_arenas, trim
from tests.waiting import wait_until_sync
from tests.workers.conftest import WorkersPair, nothing_left

MiB = 1 << 20
GiB = 1 << 30
PER_VM = 16 * MiB


def test_glibc_calls_apply_here() -> None:
    """The calls the zygote and the workers make work on this C library (glibc: the test machine's)."""
    assert limit_arenas(8)  # this test process's own setting; 8 is glibc's usual cap on 2 cores
    trim()


def test_a_few_vms_stay_within_the_bound(wpair: WorkersPair) -> None:
    vms = int(os.environ.get("VMS", "4"))
    wpair.start()
    names = vm_names(vms)
    fig = run(wpair, names, GiB, wait=wait_until_sync)
    wpair.tracker.remember()
    print(describe(fig))
    primary = fig.memory["primary"]
    assert len(worker_rows(primary)) == vms, sorted(primary)
    print("primary workers' USS (MiB):", " ".join(f"{w['uss'] / MiB:.1f}" for w in worker_rows(primary)))
    assert totals(primary)["uss"] <= uss_bound(vms), totals(primary)
    worst = max(worker_rows(primary), key=lambda w: w["uss"])
    assert worst["uss"] <= PER_VM, f"a primary worker holds {worst['uss'] / MiB:.1f} MiB private"
    wpair.pri.umount()
    wpair.sec.umount()
    nothing_left(wpair)
