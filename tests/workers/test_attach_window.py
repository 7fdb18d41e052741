"""A secondary's VM that the primary attached is usable as soon as its directory is listed.

On a secondary the primary's ATTACH starts the VM's worker, and the VM's
directory is listed from then on; what is inside can be served only once the
worker has opened the VM. A lookup inside in that moment waits for the
worker instead of failing with ``EAGAIN``. The test holds the worker back by
stopping the secondary's zygote (which forks it) while the primary creates the VM.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from bench.many_vms import processes
from tests.waiting import wait_until_sync
from tests.workers.conftest import WorkersPair

MiB = 1 << 20
STAT_CALLS = {"4", "6", "262", "332"}  # stat, lstat, newfstatat, statx (x86_64)


def _in_stat(pid: int) -> bool:
    """``pid`` is blocked in a stat system call (an answer from the mount is pending)."""
    try:
        return Path(f"/proc/{pid}/syscall").read_text().split()[0] in STAT_CALLS
    except (OSError, IndexError):
        return False


def test_a_lookup_in_an_attached_vm_waits_for_its_worker(wpair: WorkersPair) -> None:
    pair = wpair.start()
    zygote = processes(pair.sec, [])["zygote"]
    os.kill(zygote, signal.SIGSTOP)
    stat = None
    try:
        pair.pri.create("vm1", MiB, "d0")
        wait_until_sync(lambda: "vm1" in os.listdir(pair.sec.mnt), 60, "vm1 listed on the secondary")
        stat = subprocess.Popen(["stat", "-c", "%s", str(pair.sfile("vm1", "d0"))], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        wait_until_sync(lambda: stat.poll() is not None or _in_stat(stat.pid), 60, "stat to ask the mount")
        assert stat.poll() is None, f"stat answered before vm1's worker opened it: {stat.communicate()}"
    finally:
        os.kill(zygote, signal.SIGCONT)
        if stat is not None and stat.poll() is None:
            out, err = stat.communicate(timeout=120)
            assert stat.returncode == 0 and out.strip() == str(MiB), (stat.returncode, out, err)
