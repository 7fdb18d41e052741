"""A single-node ``--workers`` mount, end to end: mkdir, create, I/O, a killed worker, status, umount.

Real processes and FUSE mounts through ``mountctl``. Cleanup stops every
process of the mount's tree (supervisor, zygote, workers) and detaches any
mount left under the test's directory, even when the test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from colofs.fs.mountpoint import fuse_unmount
from mountctl.mounting import alive
from tests.waiting import wait_until_sync

MiB = 1 << 20


def _mountctl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mountctl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def _status(path: Path) -> dict[str, Any]:
    return json.loads(os.getxattr(path, "user.colofs.status"))


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(") ", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _tree(pid: int) -> set[int]:
    seen = {pid}
    todo = [pid]
    while todo:
        for child in _children(todo.pop()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def _mounts_under(base: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    return sorted((p for p in points if p.startswith(str(base) + "/")), key=len, reverse=True)


class Node:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.store = base / "store"
        self.mnt = base / "mnt"
        self.mnt.mkdir()
        self.pids: set[int] = set()

    def remember(self) -> None:
        try:
            self.pids |= _tree(int(_status(self.mnt)["pid"]))
        except (OSError, ValueError, KeyError):
            pass

    def cleanup(self) -> None:
        self.remember()
        if os.path.ismount(self.mnt):
            _mountctl("umount", str(self.mnt), timeout=120)
        for pid in self.pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        for path in _mounts_under(self.base):
            fuse_unmount(path, lazy=True)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    try:
        yield n
    finally:
        n.cleanup()


def _serving(path: Path) -> dict[str, Any] | None:
    w = _status(path).get("worker") or {}
    return w if w.get("state") == "serving" and _status(path).get("role") else None


def test_a_workers_mount_from_mkdir_to_umount(node: Node) -> None:
    res = _mountctl("mount", "--workers", "--role", "primary", "--store", str(node.store), str(node.mnt))
    assert res.returncode == 0, res.stderr
    node.remember()
    root = _status(node.mnt)
    assert root["process_model"] == "workers" and root["vm_count"] == 0
    assert root["workers"] == {"serving": 0, "starting": 0, "crashed": 0, "hung": 0, "failed": 0}

    os.mkdir(node.mnt / "vm0")  # returns before the worker mounts; the worker's mount then covers it
    wait_until_sync(lambda: _serving(node.mnt / "vm0"), 60, "vm0's worker serving its mount", catch=(OSError,))

    started = time.monotonic()
    res = _mountctl("create", str(node.mnt), "vm1/d0", "--size", "1T")
    took = time.monotonic() - started
    assert res.returncode == 0, res.stderr
    assert took < 30, took
    disk = node.mnt / "vm1" / "d0.raw"
    assert disk.stat().st_size == 1 << 40
    data = os.urandom(MiB)
    fd = os.open(disk, os.O_RDWR)
    try:
        os.pwrite(fd, data, 5 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    node.remember()

    root = _status(node.mnt)
    assert root["vm_count"] == 2 and root["vms"] == ["vm0", "vm1"]
    assert root["workers"]["serving"] == 2
    assert json.loads(os.getxattr(node.mnt, "user.colofs.vms.0"))["vms"] == ["vm0", "vm1"]

    # kill -9 of vm1's worker: vm0 keeps serving, vm1 comes back under a new worker with its data.
    old = _serving(node.mnt / "vm1")
    assert old is not None
    os.kill(int(old["pid"]), signal.SIGKILL)

    def restarted() -> dict[str, Any] | None:
        w = _serving(node.mnt / "vm1")
        return w if w and w["pid"] != old["pid"] and w["restarts"] == 1 else None

    wait_until_sync(restarted, 60, "vm1 served by a restarted worker", catch=(OSError,))
    node.remember()
    with open(disk, "rb") as f:
        f.seek(5 * MiB)
        assert f.read(MiB) == data
    assert _serving(node.mnt / "vm0")
    assert sum(1 for p in _mounts_under(node.base) if p.endswith("/vm1")) == 1  # the dead mount was detached

    res = _mountctl("umount", str(node.mnt))
    assert res.returncode == 0, res.stderr
    assert "closed cleanly" in res.stdout
    assert _mounts_under(node.base) == [] and not os.path.ismount(node.mnt)
    wait_until_sync(lambda: not [p for p in node.pids if alive(p)], 60, "every process of the mount gone")


def test_umount_refuses_a_busy_mount_and_lazy_finishes_when_the_disk_is_closed(node: Node) -> None:
    res = _mountctl("mount", "--workers", "--role", "primary", "--store", str(node.store), str(node.mnt))
    assert res.returncode == 0, res.stderr
    node.remember()
    assert _mountctl("create", str(node.mnt), "vm0/d0", "--size", "16M").returncode == 0
    assert _mountctl("create", str(node.mnt), "vm1/d0", "--size", "16M").returncode == 0
    node.remember()
    supervisor = int(_status(node.mnt)["pid"])
    disk = open(node.mnt / "vm0" / "d0.raw", "r+b")  # held open across the umounts
    try:
        res = _mountctl("umount", str(node.mnt))
        assert res.returncode != 0 and "busy" in res.stderr, (res.stdout, res.stderr)
        assert _serving(node.mnt / "vm0") and _serving(node.mnt / "vm1")  # nothing was stopped

        res = _mountctl("umount", "--lazy", str(node.mnt))
        assert res.returncode == 0, res.stderr
        wait_until_sync(lambda: not os.path.ismount(node.mnt / "vm1"), 60, "vm1 unmounted")
        disk.write(b"still served")  # the detached VM keeps serving its open file
        disk.flush()
        assert alive(supervisor)
    finally:
        disk.close()
    wait_until_sync(lambda: not alive(supervisor), 60, "the supervisor to exit once the disk is closed")
    assert _mounts_under(node.base) == []
    wait_until_sync(lambda: not [p for p in node.pids if alive(p)], 60, "every process of the mount gone")


def test_a_new_supervisor_waits_for_the_workers_a_killed_one_left(node: Node) -> None:
    res = _mountctl("mount", "--workers", "--role", "primary", "--store", str(node.store), str(node.mnt))
    assert res.returncode == 0, res.stderr
    assert _mountctl("create", str(node.mnt), "vm0/d0", "--size", "16M").returncode == 0
    node.remember()
    supervisor = int(_status(node.mnt)["pid"])
    # Stands for a worker of the killed supervisor still serving an open disk: same command line.
    old = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", "-m", "colofs.fs.daemon",
                            "--store", str(node.store), "--workers"], stdin=subprocess.PIPE)  # lives until killed
    node.pids.add(old.pid)
    try:
        os.kill(supervisor, signal.SIGKILL)
        wait_until_sync(lambda: not alive(supervisor), 60, "the supervisor killed")
        wait_until_sync(lambda: not [p for p in node.pids if alive(p) and p != old.pid], 60,
                        "the killed supervisor's own workers to end")
        res = _mountctl("mount", "--workers", "--role", "primary", "--store", str(node.store), str(node.mnt))
        assert res.returncode != 0
        assert "workers of an earlier supervisor" in res.stderr and str(old.pid) in res.stderr, res.stderr
    finally:
        old.kill()
        old.wait()
    res = _mountctl("mount", "--workers", "--role", "primary", "--store", str(node.store), str(node.mnt))
    assert res.returncode == 0, res.stderr
    node.remember()
    wait_until_sync(lambda: _serving(node.mnt / "vm0"), 60, "vm0 served again", catch=(OSError,))


def test_mountctl_events_report_a_new_vm_a_worker_crash_and_its_restart(node: Node) -> None:
    """``mountctl events`` (the supervisor's socket) says when a VM was made, its worker died, and serves again."""
    from tests.ops.test_events import Follower

    res = _mountctl("mount", "--workers", "--role", "primary", "--store", str(node.store), str(node.mnt))
    assert res.returncode == 0, res.stderr
    node.remember()
    assert _mountctl("create", str(node.mnt), "vm0/d0", "--size", "4M").returncode == 0
    wait_until_sync(lambda: _serving(node.mnt / "vm0"), 60, "vm0's worker serving", catch=(OSError,))
    follower = Follower(node.mnt)
    try:
        follower.wait("exists", vm="vm0")  # the greeting: the listener is in
        os.mkdir(node.mnt / "vm9")
        assert follower.wait("vm-created", vm="vm9")["role"] == "primary"
        pid = int(_serving(node.mnt / "vm0")["pid"])  # type: ignore[index]
        os.kill(pid, signal.SIGKILL)
        crashed = follower.wait("worker-crashed", vm="vm0")
        assert crashed.get("pid") == pid, crashed
        restarted = follower.wait("worker-restarted", vm="vm0")
        assert restarted.get("restarts") == 1 and restarted.get("pid") != pid, restarted
    finally:
        follower.stop()
    node.remember()
