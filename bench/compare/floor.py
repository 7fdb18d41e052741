"""The "pyfuse3 floor" column: ``bench/floor_fs.py`` mounted over a copy of the seed, in its own process.

The floor is a passthrough with nothing but pyfuse3's loop and trio's
scheduler between the kernel and ``os.pread``/``os.pwrite``. It is mounted
once per run, beside colofs and QEMU, and fio runs on its file with the same
jobs: where colofs over FUSE comes close to it, colofs is bound by the floor.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

from bench.compare.proc import (
    abort_fuse,
    call_with_timeout,
    mounts_under,
    wait_gone,
)
from bench.host import REPO, StepError
from mountctl.pair import alive, detach

SCRIPT = REPO / "bench" / "floor_fs.py"


class FloorMount:
    """One floor daemon over ``workdir/disk.src``; :meth:`stop` unmounts it, by its own PID if need be."""

    def __init__(self, workdir: str, source_from: str) -> None:
        self.dir = workdir
        self.source_from = source_from
        self.mnt = os.path.join(workdir, "mnt")
        self.proc: subprocess.Popen[str] | None = None

    @property
    def file(self) -> str:
        return os.path.join(self.mnt, "disk.raw")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def start(self) -> None:
        """Copy the seed, mount, and wait for the daemon's ``ready`` line (its loop is then serving)."""
        os.makedirs(self.mnt, exist_ok=True)
        src = os.path.join(self.dir, "disk.src")
        shutil.copyfile(self.source_from, src)
        log = open(os.path.join(self.dir, "floor.log"), "ab")
        try:
            self.proc = subprocess.Popen([sys.executable, str(SCRIPT), src, self.mnt], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
        finally:
            log.close()
        proc = self.proc
        assert proc.stdout is not None
        try:
            line = call_with_timeout(proc.stdout.readline, 60, "the pyfuse3 floor's ready line")
        except StepError:
            self.stop()
            raise
        if line.strip() != "ready" or not os.path.exists(self.file):
            code = proc.poll()
            self.stop()
            raise StepError(f"the pyfuse3 floor did not start (exit {code}); see {self.dir}/floor.log")

    def healthy(self) -> str | None:
        if self.pid is None:
            return f"the pyfuse3 floor's daemon is gone; see {self.dir}/floor.log"
        return None

    def stop(self) -> None:
        """SIGTERM (it unmounts and exits); if it does not, abort its FUSE connection and SIGKILL it."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if alive(proc.pid):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                abort_fuse(self.mnt)
                proc.kill()
                wait_gone(proc.pid, 10)
                proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
        for point in mounts_under(self.mnt):
            detach(point)
