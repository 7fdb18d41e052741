"""A worker mounts its VM even while a root command holds the root's inode lock.

The kernel holds the root directory's lock through a ``setxattr`` on it (a
``mountctl create``), for as long as the supervisor takes to answer, and the
supervisor waits for the VM's worker. A worker that starts meanwhile (here:
one restarted after ``kill -9``) must still mount its VM and serve.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

from mountctl.mounting import alive
from tests.waiting import wait_until_sync
from tests.workers.test_supervisor import Node, _mountctl, _serving, node  # noqa: F401 (the fixture)

SETXATTR_SYSCALLS = {188, 189, 190}  # setxattr, lsetxattr, fsetxattr on x86_64


def _in_setxattr(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/syscall") as f:
            return int(f.read().split()[0]) in SETXATTR_SYSCALLS
    except (OSError, ValueError, IndexError):
        return False


def test_a_restarted_worker_mounts_while_a_root_command_waits(node: Node) -> None:  # noqa: F811
    res = _mountctl("mount", "--workers", "--role", "primary", "--store", str(node.store), str(node.mnt))
    assert res.returncode == 0, res.stderr
    node.remember()
    for vm in ("vm0", "vm1"):
        os.mkdir(node.mnt / vm)
    for vm in ("vm0", "vm1"):
        wait_until_sync(lambda vm=vm: _serving(node.mnt / vm), 60, f"{vm} serving", catch=(OSError,))
    node.remember()
    stuck = _serving(node.mnt / "vm0")
    old = _serving(node.mnt / "vm1")
    assert stuck is not None and old is not None
    os.kill(int(stuck["pid"]), signal.SIGSTOP)  # vm0's worker answers nothing now
    create: subprocess.Popen[str] | None = None
    try:
        create = subprocess.Popen([sys.executable, "-m", "mountctl.cli", "create", str(node.mnt), "vm0/d1",
                                   "--size", "1G"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until_sync(lambda: _in_setxattr(create.pid), 60, "mountctl create inside its setxattr on the root")
        os.kill(int(old["pid"]), signal.SIGKILL)

        def restarted() -> dict[str, Any] | None:
            w = _serving(node.mnt / "vm1")
            return w if w and w["pid"] != old["pid"] else None

        wait_until_sync(restarted, 60, "vm1 served by its restarted worker while the create waits",
                        catch=(OSError,))
        assert create.poll() is None and _in_setxattr(create.pid)  # the root command was still waiting
        assert (node.mnt / "vm1").is_dir()
    finally:
        if alive(int(stuck["pid"])):
            os.kill(int(stuck["pid"]), signal.SIGCONT)
        if create is not None:
            create.wait(timeout=120)  # answered once vm0's worker runs again
        node.remember()
