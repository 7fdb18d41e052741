"""One VM's worker killed or hung while fio writes to two other VMs: they never notice, and the VM comes back.

A pair mounted with ``--workers`` and three VMs. fio (libaio, O_DIRECT,
``verify=crc32c``) writes and verifies on the primary's vm1 and vm2, run
after run, for as long as the test goes on; meanwhile vm0's worker is killed
with SIGKILL on the primary, then on the secondary, then stopped with SIGSTOP
and continued. Every fio run passes, and some run of each was in flight at
each kill. vm0 comes back each time under a new worker: the primary's vm0
keeps every write it acknowledged and replicates again; the secondary's vm0
rolls back to its last checkpoint (a write the secondary's VM made after it
is gone) and then takes the primary's next checkpoint. A stopped worker is
``hung`` in the root's status and ``serving`` again once continued. After
``mountctl umount`` no mount and no process is left.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.many_vms import kill_worker
from tests.e2e.pair import MiB, read_file
from tests.waiting import wait_until_sync
from tests.workers.conftest import WorkersPair, nothing_left

SIZE = 64 * MiB
VMS = ["vm0", "vm1", "vm2"]
LIVENESS = {"COLOFS_HANG_KILL_AFTER": "0"}  # a stopped worker is reported, never killed here (15 s to report it)

# fio (its jobs as threads) dies with the thread that started it, even when the test run is killed outright.
ORPHAN_KILLED = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []

pytestmark = pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")


@dataclass
class Run:
    start: float
    end: float = 0.0
    returncode: int | None = None
    output: str = ""


class FioLoop:
    """fio with crc32c verification on one file, run after run until :meth:`stop`; each run writes, then reads
    back and checks, 16 MiB. The run in progress when stop is called finishes (with its verification)."""

    ARGS = ["--thread", "--ioengine=libaio", "--direct=1", "--iodepth=8", "--rw=randwrite", "--bs=16k", "--size=16M",
            "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--randrepeat=0", "--fallocate=none",
            "--allow_file_create=0", "--verify_state_save=0", "--output-format=terse"]

    def __init__(self, path: Path) -> None:
        self.path = path
        self.runs: list[Run] = []
        self._stop = threading.Event()
        self._proc: subprocess.Popen[str] | None = None
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            run = Run(time.monotonic())
            self.runs.append(run)
            self._proc = subprocess.Popen([*ORPHAN_KILLED, "fio", "--name=w", f"--filename={self.path}", *self.ARGS],
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                run.output, _ = self._proc.communicate(timeout=240)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                run.output, _ = self._proc.communicate()
                run.output += "\n(fio ran for more than 240 s)"
            run.end = time.monotonic()
            run.returncode = self._proc.returncode
            if run.returncode != 0 or "verify:" in run.output:
                return  # a failed run ends the loop: the test reports it

    def start(self) -> FioLoop:
        self._thread.start()
        wait_until_sync(lambda: self._proc is not None, 60, f"fio on {self.path} to start")
        return self

    def running(self) -> bool:
        """A run is in flight (started and not finished)."""
        return bool(self.runs) and self.runs[-1].returncode is None and self._thread.is_alive()

    def spans(self, t: float) -> bool:
        """Some run was in flight at time ``t``."""
        return any(r.start <= t <= (r.end or float("inf")) for r in self.runs)

    def stop(self, timeout: float = 300) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def kill(self) -> None:
        """End the run in progress at once (cleanup after a failure)."""
        self._stop.set()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self._thread.join(60)

    def failures(self) -> list[str]:
        return [r.output for r in self.runs if r.returncode not in (0, None) or "verify:" in r.output]


def _write(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _mounts_at(path: Path) -> int:
    """How many mounts sit at ``path``: one live VM mount, never a dead one stacked under it."""
    where = str(path.resolve())
    return sum(1 for line in Path("/proc/mounts").read_text().splitlines() if line.split()[1] == where)


def _root_workers(node: object) -> dict[str, int]:
    return dict(node.read_status().get("workers") or {})  # type: ignore[attr-defined]


def test_a_killed_or_hung_worker_leaves_the_other_vms_writing(wpair: WorkersPair,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in LIVENESS.items():
        monkeypatch.setenv(name, value)
    pair = wpair.start()
    pri, sec = pair.pri, pair.sec
    for vm in VMS:
        pri.create(vm, SIZE, "d0")
    for vm in VMS:
        pair.wait_disk(vm, "d0", SIZE, timeout=120)
    root = pri.read_status()
    assert root["process_model"] == "workers" and root["workers"]["serving"] == 3, root

    # vm0: a first image, checkpointed; then a write after the checkpoint (the primary keeps it).
    _write(pair.pfile("vm0"), 0, b"A" * MiB)
    at_checkpoint = pair.checkpoint("vm0")
    image = read_file(pair.pfile("vm0"))
    assert read_file(pair.sfile("vm0")) == image

    loops = [FioLoop(pair.pfile(vm)).start() for vm in ("vm1", "vm2")]
    times: dict[str, float] = {}
    kills: list[float] = []
    stopped: list[int] = []
    try:
        # -- kill -9 of the primary's vm0 worker ----------------------------------------------------------
        _write(pair.pfile("vm0"), 2 * MiB, b"B" * MiB)
        image = read_file(pair.pfile("vm0"))
        old = pair.worker_pid(pri, "vm0")
        assert all(loop.running() for loop in loops), "fio is not writing when the worker is killed"
        kills.append(time.monotonic())
        got = kill_worker(pri, "vm0", wait=wait_until_sync)
        pair.tracker.remember()
        times["primary kill -> detected"] = got["detected_s"]
        times["primary kill -> serving"] = got["serving_s"]
        w = pair.worker(pri, "vm0")
        assert w["state"] == "serving" and w["restarts"] == 1 and int(w["pid"]) != old, w
        assert pri.status("vm0")["worker"]["restarts"] == 1  # what `mountctl status P vm0 --json` prints
        assert _mounts_at(pri.path("vm0")) == 1, "the dead worker's mount was not detached"
        assert f"worker {old} died (killed by SIGKILL)" in pri.log(), "the supervisor did not log the death"
        assert read_file(pair.pfile("vm0")) == image, "the primary lost a write it had acknowledged"
        # It replicates again: a write and a checkpoint after the restart reach the secondary.
        _write(pair.pfile("vm0"), 4 * MiB, b"C" * MiB)
        at_checkpoint = pair.checkpoint("vm0", timeout=60)
        image = read_file(pair.pfile("vm0"))
        assert read_file(pair.sfile("vm0")) == image

        # -- kill -9 of the secondary's vm0 worker ---------------------------------------------------------
        _write(pair.pfile("vm0"), 6 * MiB, b"D" * MiB)  # after the checkpoint: not on the secondary's image yet
        with open(pair.sfile("vm0"), "r+b") as s:  # the secondary's VM writes too; a crash drops it
            s.write(b"svm write that the crash loses")
        assert all(loop.running() for loop in loops), "fio is not writing when the worker is killed"
        kills.append(time.monotonic())
        got = kill_worker(sec, "vm0", wait=wait_until_sync)
        pair.tracker.remember()
        times["secondary kill -> detected"] = got["detected_s"]
        times["secondary kill -> serving"] = got["serving_s"]
        w = pair.worker(sec, "vm0")
        assert w["state"] == "serving" and w["restarts"] == 1, w
        assert _mounts_at(sec.path("vm0")) == 1, "the dead worker's mount was not detached"
        assert f"worker {got['old_pid']} died (killed by SIGKILL)" in sec.log()
        rec = pair.vm_status(sec, "vm0")["recovery"]
        assert rec["action"] == "rolled-back" and rec["resume_seq"] == at_checkpoint["seq"], rec
        assert read_file(pair.sfile("vm0")) == image, "the secondary's vm0 is not its last checkpoint"
        after = pair.checkpoint("vm0", timeout=60)
        assert after["seq"] > at_checkpoint["seq"]
        assert read_file(pair.sfile("vm0")) == read_file(pair.pfile("vm0"))

        # -- a hung worker: SIGSTOP, reported, SIGCONT, serving -------------------------------------------
        # Only the root's status is read while it is stopped: a request to its mount would wait for it.
        hung = pair.worker_pid(pri, "vm0")
        assert all(loop.running() for loop in loops), "fio is not writing when the worker hangs"
        t0 = time.monotonic()
        os.kill(hung, signal.SIGSTOP)
        stopped.append(hung)
        kills.append(t0)
        wait_until_sync(lambda: _root_workers(pri).get("hung") == 1, 60, "the stopped worker to be reported hung")
        times["SIGSTOP -> hung"] = time.monotonic() - t0
        assert f"worker {hung} has not answered" in pri.log()
        assert _root_workers(pri).get("serving") == 2
        t1 = time.monotonic()
        os.kill(hung, signal.SIGCONT)
        stopped.remove(hung)
        wait_until_sync(lambda: _root_workers(pri).get("serving") == 3 and not _root_workers(pri).get("hung"),
                        60, "the continued worker to serve again")
        times["SIGCONT -> serving"] = time.monotonic() - t1
        w = pair.worker(pri, "vm0")
        assert int(w["pid"]) == hung and w["restarts"] == 1, w  # hung and back: not restarted

        for loop in loops:
            loop.stop()
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)  # a stopped worker would hang the cleanup's unmount
        for loop in loops:
            loop.kill()

    for loop in loops:
        assert not loop.failures(), loop.failures()[0]
        assert all(loop.spans(t) for t in kills), "a fio run was not in flight at every kill"
        assert len(loop.runs) >= 1 and all(r.returncode == 0 for r in loop.runs)
    # vm1 and vm2 replicated all along: a checkpoint of each gives the same image on both sides.
    for vm in ("vm1", "vm2"):
        pair.checkpoint(vm, timeout=60)
        assert read_file(pair.sfile(vm)) == read_file(pair.pfile(vm))
        assert pair.worker(pri, vm)["restarts"] == 0

    print("\n".join(f"{what}: {secs:.2f} s" for what, secs in times.items()))
    print(f"fio runs during the test: {[len(loop.runs) for loop in loops]}")
    pri.umount()
    sec.umount()
    nothing_left(pair)
