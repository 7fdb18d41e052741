"""QEMU's COLO primary under qemu-storage-daemon: a quorum of the local raw file and an NBD child on a secondary.

This is the disk layout of QEMU's ``docs/COLO-FT.txt``: the primary VM's
writes go to a ``quorum`` node (``vote-threshold=1``) whose first child is
the primary's own image and whose second child is an NBD client into the
secondary, so a write completes once both children have it. The benchmark
uses it two ways:

* feeding colofs (ingest): the NBD child is colofs's ``VM/DISK:ingest``
  export, and the quorum is exported over NBD for fio's nbd engine;
* as the protected VM's disk on the primary: the NBD child is the QEMU
  chain's copy-before-write export, and the quorum is exported over FUSE so
  fio drives it like colofs's primary file.

The daemon is started per measurement and stopped after it: a QEMU chain
checkpoint re-creates its NBD export, which an open client would hold.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

from bench.compare.proc import mounts_under
from bench.host import StepError
from mountctl.pair import alive, detach


class QuorumPrimary:
    """One quorum daemon at a time over ``local.raw`` in ``workdir``; stopped by its own PID."""

    def __init__(self, workdir: str, qsd: str, child: str, export: str, local_from: str) -> None:
        """``child``: the NBD blockdev options of the second child; ``export``: ``nbd`` or ``fuse``."""
        assert export in ("nbd", "fuse")
        self.dir = workdir
        self.qsd = qsd
        self.child = child
        self.export = export
        self.local_from = local_from
        self.proc: subprocess.Popen[bytes] | None = None
        os.makedirs(workdir, exist_ok=True)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    @property
    def sock(self) -> str:
        return self.path("quorum.sock")

    @property
    def uri(self) -> str:
        """The quorum's NBD export (``export == "nbd"``)."""
        return f"nbd+unix:///disk?socket={self.sock}"

    @property
    def file(self) -> str:
        """The quorum's FUSE export (``export == "fuse"``)."""
        return self.path("disk.raw")

    def start(self) -> None:
        """Start the daemon (the local image copied from ``local_from`` the first time); ready when exported."""
        if self.proc is not None:
            raise StepError("the quorum primary is already running")
        local = self.path("local.raw")
        if not os.path.exists(local):
            shutil.copyfile(self.local_from, local)
        argv = [
            self.qsd,
            "--blockdev", f"driver=file,node-name=pfile,filename={local},cache.direct=off",
            "--blockdev", "driver=raw,node-name=plocal,file=pfile",
            "--blockdev", f"driver=nbd,node-name=rnbd,{self.child}",
            "--blockdev", "driver=raw,node-name=rraw,file=rnbd",
            "--blockdev", "driver=quorum,node-name=colo,children.0=plocal,children.1=rraw,vote-threshold=1,"
                          "read-pattern=fifo",
        ]
        if self.export == "nbd":
            if os.path.exists(self.sock):
                os.unlink(self.sock)
            argv += ["--nbd-server", f"addr.type=unix,addr.path={self.sock}",
                     "--export", "type=nbd,id=e0,node-name=colo,writable=on,name=disk"]
        else:
            if not os.path.exists(self.file):
                open(self.file, "w").close()  # a FUSE export's mountpoint is an existing regular file
            argv += ["--export", f"type=fuse,id=f0,node-name=colo,mountpoint={self.file},writable=on"]
        with open(self.path("qsd.log"), "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        deadline = time.monotonic() + 30
        while not self._ready():
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                raise StepError(f"the quorum qemu-storage-daemon exited {code}: {self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise StepError("the quorum qemu-storage-daemon did not export its disk within 30 s")
            time.sleep(0.02)

    def _ready(self) -> bool:
        if self.export == "nbd":
            return os.path.exists(self.sock)
        return self.file in mounts_under(self.dir)

    def _log_tail(self) -> str:
        try:
            with open(self.path("qsd.log"), errors="replace") as f:
                return " | ".join(f.read().strip().splitlines()[-3:])
        except OSError:
            return ""

    @property
    def pid(self) -> int | None:
        """The running daemon (the memory sampler follows it)."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def stop(self) -> None:
        """SIGTERM (the daemon flushes and exits), then SIGKILL, by our own PID; detach a left-over export."""
        proc, self.proc = self.proc, None
        if proc is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if alive(proc.pid):
                    try:
                        proc.send_signal(sig)
                    except ProcessLookupError:
                        pass
                try:
                    proc.wait(timeout=30)
                    break
                except subprocess.TimeoutExpired:
                    continue
        for point in mounts_under(self.dir):
            detach(point)
