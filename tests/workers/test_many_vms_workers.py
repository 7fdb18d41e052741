"""64 VMs of 1 TiB on a pair with a worker process per VM: every step works, and memory has a bound.

Each VM is created with ``mountctl create`` (each create is timed and the
times printed; no time is asserted), gets 8 MiB written across its disk and a
checkpoint; one disk is compared on both sides; ``mountctl status --json``
and ``mountctl umount`` work. Then the memory of every process (supervisor,
zygote, one worker per VM, on both sides) is read from /proc: the primary's
private memory (USS) in total stays within 64 MiB + 16 MiB per VM. A smaller
run, 8 VMs of 1 GiB then 8 of 1 TiB, shows each process's PSS the same
within 10 %: memory does not grow with a disk's size.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.many_vms import Figures, describe, run, totals, uss_bound, vm_names, worker_rows
from tests.waiting import wait_until_sync
from tests.workers.conftest import WorkersPair, nothing_left

GiB = 1 << 30
TiB = 1 << 40


def _run_pair(pair: WorkersPair, vms: int, size: int) -> Figures:
    """Start the pair, run the steps over ``vms`` VMs of ``size``, check what every run must show, unmount."""
    pair.start()
    names = vm_names(vms)
    fig = run(pair, names, size, wait=wait_until_sync)
    pair.tracker.remember()
    print(describe(fig))

    assert sorted(fig.status["vms"]) == names
    for vm in names:
        detail: dict[str, Any] = fig.status["vms"][vm]
        assert detail["disks"]["d0"]["size"] == size, detail["disks"]
        assert detail["worker"]["state"] == "serving" and detail["worker"]["restarts"] == 0, detail["worker"]
    human = pair.pri.mountctl("status", str(pair.pri.mnt)).stdout
    assert all(f"{vm} role:primary" in human for vm in names), human[:2000]
    for node in (pair.pri, pair.sec):
        root = node.read_status()
        assert root["process_model"] == "workers" and root["workers"]["serving"] == vms, root
        assert root["vm_count"] == vms
    for side, table in fig.memory.items():
        assert set(names) <= set(table), f"{side}: no worker found for {sorted(set(names) - set(table))}"
        assert "supervisor" in table and "zygote" in table, sorted(table)
        assert len({row["pid"] for row in table.values()}) == len(table)
    pair.pri.umount()
    pair.sec.umount()
    nothing_left(pair)
    return fig


def test_64_vms_of_1tib_each_with_its_worker(wpair: WorkersPair) -> None:
    vms = 64
    fig = _run_pair(wpair, vms, TiB)
    primary = totals(fig.memory["primary"])
    assert primary["uss"] <= uss_bound(vms), (
        f"the primary holds {primary['uss'] >> 20} MiB of private memory over {len(fig.memory['primary'])} "
        f"processes, more than {uss_bound(vms) >> 20} MiB")


def _per_process_pss(memory: dict[str, dict[str, dict[str, int]]]) -> dict[str, float]:
    """What is compared between two runs: each side's supervisor, zygote and median worker PSS."""
    out: dict[str, float] = {}
    for side, table in memory.items():
        out[f"{side} supervisor"] = table["supervisor"]["pss"]
        out[f"{side} zygote"] = table["zygote"]["pss"]
        out[f"{side} worker (median)"] = statistics.median(w["pss"] for w in worker_rows(table))
    return out


def _differ(small: dict[str, float], large: dict[str, float], slack: float = 0.0) -> dict[str, tuple[float, float]]:
    return {k: (small[k], large[k]) for k in small
            if abs(large[k] - small[k]) > 0.10 * max(small[k], large[k]) + slack}


def test_memory_per_process_does_not_grow_with_disk_size(tmp_path: Path) -> None:
    """Each process's PSS, with every VM created and linked and nothing written yet, is the same within 10 %
    for 1 GiB and 1 TiB disks; after 8 MiB written and checkpointed in each it is the same within 10 % plus
    8 MiB per worker (the buffers a worker's allocator keeps after passing on the data vary run to run;
    a map sized by the disk would cost hundreds of MiB at 1 TiB)."""
    idle: dict[int, dict[str, float]] = {}
    end: dict[int, dict[str, float]] = {}
    for size in (GiB, TiB):
        work = tmp_path / f"{size >> 30}g"
        work.mkdir()
        pair = WorkersPair(work)
        try:
            fig = _run_pair(pair, 8, size)
            idle[size], end[size] = _per_process_pss(fig.memory_idle), _per_process_pss(fig.memory)
        finally:
            pair.cleanup()
    for when, figs in (("before any write", idle), ("after the writes", end)):
        print("\n".join(f"{when}, {k}: PSS {figs[GiB][k] / (1 << 20):.1f} MiB with 1 GiB disks, "
                        f"{figs[TiB][k] / (1 << 20):.1f} MiB with 1 TiB disks" for k in figs[GiB]))
    grown = _differ(idle[GiB], idle[TiB])
    assert not grown, f"PSS before any write differs by more than 10 % between 1 GiB and 1 TiB disks: {grown}"
    grown = _differ(end[GiB], end[TiB], slack=8 << 20)
    assert not grown, f"PSS after the writes differs by more than 10 % + 8 MiB between 1 GiB and 1 TiB: {grown}"
