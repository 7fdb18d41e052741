"""Smoke test of ``python -m bench.compare``: one small row end to end, the JSON's shape, and the cleanup.

Runs one O_DIRECT row on a 64 MiB working size with 1 s of fio per system,
so it stays well under a minute; QEMU's chain joins when
qemu-storage-daemon is installed and must then be measured too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.compare.proc import Hung, call_with_timeout
from bench.compare.report import Cell, RowResult, render
from bench.compare.workloads import all_rows, select
from tests.mountable import mount_skip_reason

REPO = Path(__file__).resolve().parent.parent
HAVE_QEMU = shutil.which("qemu-storage-daemon") is not None and shutil.which("qemu-img") is not None

_MOUNT_SKIP = mount_skip_reason(("fusermount3", "fio"))
needs_root_tools = pytest.mark.skipif(_MOUNT_SKIP is not None, reason=f"mount test {_MOUNT_SKIP}")


def _mounts_under(root: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p.startswith(str(root))]


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{pid}: {cmd}")
    return found


def test_select_patterns():
    rows = all_rows(1 << 30, 5.0, 1 << 30)
    assert len([r for r in rows if r.group == "svm"]) == 12
    assert [r.id for r in select(rows, "direct-seq-*")] == ["direct-seq-write", "direct-seq-read"]
    assert [r.id for r in select(rows, "checkpoint-64m, rss-peak-primary")] == ["checkpoint-64m", "rss-peak-primary"]
    assert select(rows, "nothing-like-this") == []


def test_render_marks_failures_and_ratios():
    row = select(all_rows(1 << 30, 5.0, 1 << 30), "aio16-rand-read")[0]
    good, ref, bad = Cell(), Cell(), Cell()
    good.add(100.0, 25600.0)
    ref.add(50.0, 12800.0)
    bad.fail("the daemon died")
    res = RowResult(row, {"colofs": good, "qemu": ref, "raw": bad})
    assert res.ratio("qemu") == 2.0 and res.ratio("raw") is None
    text = render([res], "header")
    assert "| 100 (25.6k) | 50 (12.8k) | FAILED | 2.00 | - |" in text
    assert "aio16-rand-read / raw file: failed: the daemon died" in text


def test_ratios_above_one_mean_colofs_wins_for_times_too():
    row = select(all_rows(1 << 30, 5.0, 1 << 30), "failover-256m")[0]
    assert not row.higher_is_better
    fast, slow = Cell(), Cell()
    fast.add(400.0)
    slow.add(800.0)
    assert RowResult(row, {"colofs": fast, "qemu": slow}).ratio("qemu") == 2.0
    assert RowResult(row, {"colofs": slow, "qemu": fast}).ratio("qemu") == 0.5


@needs_root_tools
def test_quick_run_one_row(tmp_path: Path):
    out = tmp_path / "result.json"
    res = subprocess.run(
        [sys.executable, "-m", "bench.compare", "--quick", "--only", "direct-seq-write", "--size", "64M",
         "--runtime", "1", "--dir", str(tmp_path), "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    try:
        assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
        doc = json.loads(out.read_text())
        assert doc["schema"] == "colofs-bench-compare/2"
        for key in ("date", "cpus", "kernel", "qemu", "fio"):
            assert doc["machine"][key], key
        assert doc["settings"]["reps"] == 1 and doc["settings"]["size"] == 64 << 20
        assert [r["id"] for r in doc["rows"]] == ["direct-seq-write"]
        row = doc["rows"][0]
        assert row["unit"] == "MB/s" and row["better"] == "higher" and row["group"] == "svm"
        expected = ["colofs", "nbd", "floor", "raw"] + (["qemu"] if HAVE_QEMU else [])
        for name in expected:
            cell = row["systems"][name]
            assert cell["status"] == "ok", cell
            assert cell["median"] > 0 and cell["min"] <= cell["median"] <= cell["max"]
            assert all(x > 0 for x in cell["samples"])
        if not HAVE_QEMU:
            assert row["systems"]["qemu"]["status"] == "skipped" and row["systems"]["qemu"]["reason"]
        assert row["ratios"]["vs_raw"] > 0 and row["ratios"]["vs_floor"] > 0
        if HAVE_QEMU:
            assert row["ratios"]["vs_qemu"] > 0 and row["ratios"]["nbd_vs_qemu"] > 0
        assert "direct-seq-write" in res.stderr  # a progress line per measurement
        assert "| O_DIRECT psync seq write 1M | MB/s |" in res.stdout
    finally:
        # Nothing it started may outlive it: no mounts, no daemons, no work directory.
        assert _mounts_under(tmp_path) == []
        assert _processes_mentioning(str(tmp_path)) == []
        assert not list(tmp_path.glob("colofs-compare-*"))


def test_a_call_that_never_returns_is_reported():
    with pytest.raises(Hung, match="did not return within"):
        call_with_timeout(lambda: time.sleep(5), 0.1, "a stuck call")  # the workload: a call stuck for 5 s
    assert call_with_timeout(lambda: 42, 5, "a quick call") == 42


def _cell(*values: float) -> Cell:
    c = Cell()
    for v in values:
        c.add(v)
    return c


def test_nbd_column_and_its_ratio_appear_only_where_measured():
    rows = {r.id: r for r in all_rows(1 << 30, 5.0, 1 << 30)}
    assert "nbd" not in rows["buffered-seq-write"].systems  # NBD has no page cache: no buffered cell
    assert "nbd" in rows["aio16-rand-write"].systems and "nbd" in rows["direct-rand-read"].systems
    with_nbd = RowResult(rows["aio16-seq-write"], {"colofs": _cell(100.0), "nbd": _cell(300.0),
                                                   "qemu": _cell(200.0), "raw": _cell(400.0)})
    without = RowResult(rows["buffered-seq-write"], {"colofs": _cell(100.0), "qemu": _cell(200.0),
                                                     "raw": _cell(400.0)})
    text = render([with_nbd, without], "header")
    assert "| row | unit | colofs | colofs NBD | QEMU | raw file | vs QEMU | NBD vs QEMU | vs raw |" in text
    assert "| O_DIRECT libaio qd16 seq write 1M | MB/s | 100 | 300 | 200 | 400 | 0.50 | 1.50 | 0.25 |" in text
    assert "| buffered psync seq write 1M | MB/s | 100 | n/a | 200 | 400 | 0.50 | - | 0.25 |" in text
    assert with_nbd.as_json()["ratios"]["nbd_vs_qemu"] == 1.5
    assert "NBD" not in render([without], "header")  # no NBD cell anywhere: no NBD columns


def test_ingest_rows_carry_the_quorum_primary_in_the_nbd_column():
    rows = all_rows(1 << 30, 5.0, 1 << 30)
    for row in select(rows, "ingest-seq-qd16,ingest-rand-qd16"):
        assert row.systems == ("colofs", "nbd", "qemu", "raw")
    assert "nbd" not in select(rows, "ingest-seq-nbdcopy")[0].systems
    assert all("nbd" not in r.systems and "floor" not in r.systems for r in rows if r.group in ("checkpoint",
                                                                                                  "failover"))


def test_floor_column_marks_the_rows_bound_by_the_floor():
    rows = {r.id: r for r in all_rows(1 << 30, 5.0, 1 << 30)}
    assert all("floor" in r.systems for r in rows.values() if r.group == "svm")

    def result(row_id: str, colofs: float, floor: float, qemu: float) -> RowResult:
        return RowResult(rows[row_id], {"colofs": _cell(colofs), "floor": _cell(floor), "qemu": _cell(qemu),
                                        "raw": _cell(1000.0)})

    near_floor_below_qemu = result("aio16-rand-write", 90.0, 100.0, 200.0)
    far_below_floor = result("aio16-rand-read", 50.0, 100.0, 200.0)
    floor_above_qemu = result("direct-rand-write", 90.0, 300.0, 200.0)
    well_above_floor = result("aio16-seq-write", 200.0, 100.0, 300.0)
    assert near_floor_below_qemu.floor_bound is True
    assert far_below_floor.floor_bound is False  # colofs's own handlers cost: not the floor
    assert floor_above_qemu.floor_bound is False  # the floor itself would pass QEMU
    assert well_above_floor.floor_bound is False
    no_floor = RowResult(rows["ingest-rand-qd16"], {"colofs": _cell(1.0), "qemu": _cell(2.0)})
    assert no_floor.floor_bound is None
    text = render([near_floor_below_qemu, far_below_floor, no_floor], "header")
    assert "| colofs | pyfuse3 floor | QEMU | raw file | vs QEMU | vs floor | vs raw |" in text
    assert "| O_DIRECT libaio qd16 rand write 4K | MB/s | 90 | 100 | 200 | 1000 | 0.45 | 0.90 bound | 0.09 |" in text
    assert "| O_DIRECT libaio qd16 rand read 4K | MB/s | 50 | 100 | 200 | 1000 | 0.25 | 0.50 | 0.05 |" in text
    assert near_floor_below_qemu.as_json()["floor_bound"] is True
    assert near_floor_below_qemu.as_json()["ratios"]["vs_floor"] == 0.9


def test_primary_rows_cover_both_modes_and_the_three_writes():
    rows = select(all_rows(1 << 30, 5.0, 1 << 30), "primary-*")
    assert [r.id for r in rows] == [f"primary-{m}-{op}" for m in ("async", "sync")
                                    for op in ("seq-write", "rand-write", "aio16-rand-write")]
    for r in rows:
        assert r.group == "primary" and r.systems == ("colofs", "nbd", "qemu", "raw") and r.default
        assert r.job is not None and r.job.direct and not r.job.is_read
    assert [(r.job.bs, r.job.iodepth) for r in rows[:3] if r.job] == [("1m", 1), ("4k", 1), ("4k", 16)]


def test_memory_rows_compare_each_daemon_with_qemu_storage_daemon():
    rows = {r.id: r for r in select(all_rows(1 << 30, 5.0, 1 << 30), "rss-peak-*,pss-peak-*")}
    assert set(rows) == {"rss-peak-secondary", "pss-peak-secondary", "rss-peak-primary", "pss-peak-primary"}
    assert rows["pss-peak-secondary"].systems == ("colofs", "floor", "qemu")
    assert rows["pss-peak-primary"].systems == ("colofs", "qemu")
    res = RowResult(rows["pss-peak-secondary"], {"colofs": _cell(64.0), "floor": _cell(16.0), "qemu": _cell(8.0)})
    assert res.ratio("qemu") == 0.125  # lower is better: QEMU's 8 MiB over colofs's 64
    assert res.floor_bound is None  # the floor is a memory reference here, not a bound
    assert "| peak PSS (sampled), secondary daemon | MiB | 64.0 | 16.0 | 8.0 | n/a | 0.12 | 0.25 | - |" in \
        render([res], "header")


def test_memory_sampler_follows_a_process_and_its_children(tmp_path: Path):
    from bench.compare.memory import MemorySampler

    # A parent that starts a child: both are sampled under the parent's name.
    proc = subprocess.Popen([sys.executable, "-c",
                             "import subprocess, sys; c = subprocess.Popen([sys.executable, '-c', "
                             "'import sys; sys.stdin.read()'], stdin=subprocess.PIPE); print(c.pid, flush=True); "
                             "sys.stdin.read(); c.stdin.close(); c.wait()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        child = int(proc.stdout.readline())
        sampler = MemorySampler()
        sampler.watch("tree", lambda: proc.pid)
        sampler.watch("absent", lambda: None)
        sampler.sample()
        peaks = sampler.peaks("tree")
        assert {k.rsplit("[", 1)[1].rstrip("]") for k in peaks.rss} == {str(proc.pid), str(child)}
        assert sorted(k.split()[0] for k in peaks.rss) == ["child", "daemon"]
        assert set(peaks.pss) == set(peaks.rss) and peaks.highest("pss") > 0
        assert peaks.highest("rss") >= peaks.highest("pss")
        assert sampler.peaks("absent").highest("rss") == 0
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=60)
