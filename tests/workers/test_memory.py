"""colofs.workers.memory against this test process and children it starts: figures and trees that can be checked."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from colofs.workers import memory
from colofs.workers.memory import memory_of, process_tree, total
from tests.waiting import wait_until_sync

MiB = 1 << 20

# A child that holds 64 MiB of private, touched memory, starts a grandchild, prints both PIDs and waits.
CHILD = """
import mmap, os, subprocess, sys
buf = mmap.mmap(-1, 64 << 20)
for off in range(0, 64 << 20, 4096):
    buf[off] = 1
grand = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
print(os.getpid(), grand.pid, flush=True)
sys.stdin.read()
grand.stdin.close()
grand.wait()
"""


@pytest.fixture
def child() -> Iterator[tuple[subprocess.Popen[str], int]]:
    """The child above and its grandchild's PID; both end when the child's stdin closes (killed if not)."""
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        pid, grand = map(int, p.stdout.readline().split())
        assert pid == p.pid
        yield p, grand
    finally:
        if p.stdin is not None:
            p.stdin.close()
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def test_figures_of_this_process_are_ordered_and_in_bytes() -> None:
    m = memory_of(os.getpid())
    assert set(m) == set(memory.MEMORY_KEYS)
    # An interpreter with pytest loaded holds megabytes; kB not converted would be a thousand times less.
    assert m["rss"] > 8 * MiB
    assert m["rss"] >= m["pss"] >= m["uss"] > 0
    assert m["swap_pss"] >= 0


def test_private_memory_touched_shows_in_uss() -> None:
    before = memory_of(os.getpid())["uss"]
    with mmap.mmap(-1, 32 * MiB) as buf:
        for off in range(0, 32 * MiB, 4096):
            buf[off] = 1
        during = memory_of(os.getpid())["uss"]
    assert during - before >= 30 * MiB, (before, during)


def test_a_child_figures_and_its_tree(child: tuple[subprocess.Popen[str], int]) -> None:
    p, grand = child
    m = memory_of(p.pid)
    assert m["uss"] >= 60 * MiB, m  # the 64 MiB it touched are its own
    tree = process_tree(p.pid)
    assert tree[0] == p.pid and grand in tree and len(tree) == 2, tree
    assert p.pid in process_tree(os.getpid())
    assert total(tree, "uss") >= m["uss"]
    assert total(tree, "rss") >= memory_of(grand)["rss"] + m["rss"] - MiB  # both counted (figures move a little)


def test_a_process_that_is_gone() -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    with pytest.raises(ProcessLookupError):
        memory_of(p.pid)
    assert process_tree(p.pid) == []
    assert total([p.pid], "rss") == 0


def test_unknown_figure_is_refused() -> None:
    with pytest.raises(ValueError):
        total([os.getpid()], "vsz")


def _fake_proc(root: Path, procs: dict[int, int], smaps: dict[int, str], rollup: bool, children: bool) -> Path:
    """A /proc-like tree: PID -> PPID, with smaps text; with or without smaps_rollup and task/*/children."""
    for pid, ppid in procs.items():
        d = root / str(pid)
        (d / "task" / str(pid)).mkdir(parents=True)
        (d / "stat").write_text(f"{pid} (a (strange) name) S {ppid} 1 1 0\n")
        (d / ("smaps_rollup" if rollup else "smaps")).write_text(smaps.get(pid, ""))
        if children:
            kids = " ".join(str(c) for c, pp in procs.items() if pp == pid)
            (d / "task" / str(pid) / "children").write_text(kids + (" " if kids else ""))
    (root / "self").mkdir()
    return root


SMAPS = """7f00-7f10 r-xp 0 00:00 0 /usr/lib/x
Rss:                 100 kB
Pss:                  50 kB
Private_Clean:        10 kB
Private_Dirty:        20 kB
SwapPss:               4 kB
7f20-7f30 rw-p 0 00:00 0
Rss:                   8 kB
Pss:                   8 kB
Private_Clean:         0 kB
Private_Dirty:         8 kB
SwapPss:               0 kB
Swap:                100 kB
"""


@pytest.mark.parametrize("rollup", [True, False], ids=["smaps_rollup", "smaps"])
@pytest.mark.parametrize("children", [True, False], ids=["children-files", "ppid-scan"])
def test_both_sources_of_each_figure(tmp_path: Path, rollup: bool, children: bool) -> None:
    # 1 -> 2 -> {3, 4}; 5 is someone else's. Without children files, the tree comes from the PPIDs.
    proc = _fake_proc(tmp_path, {1: 0, 2: 1, 3: 2, 4: 2, 5: 0}, {2: SMAPS}, rollup, children)
    assert memory_of(2, proc) == {"rss": 108 * 1024, "pss": 58 * 1024, "uss": 38 * 1024, "swap_pss": 4 * 1024}
    assert process_tree(1, proc) == [1, 2, 3, 4]
    assert process_tree(2, proc) == [2, 3, 4]
    assert process_tree(5, proc) == [5]
    assert process_tree(9, proc) == []
    with pytest.raises(ProcessLookupError):
        memory_of(9, proc)


def test_tree_of_a_process_with_many_children(tmp_path: Path) -> None:
    """The zygote's shape: one parent, many workers; each listed once."""
    procs = {10: 0, 11: 10} | {100 + i: 11 for i in range(64)}
    proc = _fake_proc(tmp_path, procs, {}, rollup=True, children=False)
    tree = process_tree(10, proc)
    assert tree[:2] == [10, 11] and sorted(tree[2:]) == [100 + i for i in range(64)] and len(set(tree)) == 66


def test_children_that_exit_are_waited_for_elsewhere() -> None:
    """process_tree reflects the moment: a child that exits drops out of it."""
    p = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        wait_until_sync(lambda: p.pid in process_tree(os.getpid()), 60, "the child in the tree")
    finally:
        assert p.stdin is not None
        p.stdin.close()
        p.wait(timeout=60)
    assert p.pid not in process_tree(os.getpid())
