"""QEMU's secondary chain under qemu-storage-daemon, built as QEMU's block-replication driver builds it, plus QMP.

Graph: ``active`` (qcow2) -> ``hidden`` (qcow2) -> ``base`` (raw), with a
``copy-before-write`` node ``cbw`` over ``base`` whose target is ``hidden``;
the SVM's file is a FUSE export of ``active`` (its mountpoint an existing
regular file), the primary's writes go to an NBD export of ``cbw``. Every
file node uses ``cache.direct=off``.

Checkpoint: QMP exposes no ``make_empty``. The closest equivalent empties
both layers while the FUSE export stays mounted: ``blockdev-snapshot`` puts a
fresh empty qcow2 above ``active`` (the export follows it) and
``blockdev-reopen`` points it at a fresh empty hidden over ``base``; the
copy-before-write node is re-created on the new hidden (a fresh copy bitmap,
as the replication driver resets its own), with its NBD export; the old
nodes are deleted and their files unlinked. The empty qcow2 files are made
with ``qemu-img create`` before the clock starts.

Failover: as the replication driver does, stop the NBD export and drop the
copy-before-write node, then one active ``block-commit`` of active and hidden
into base, completed with ``block-job-complete`` and timed to its
``BLOCK_JOB_COMPLETED`` event. QEMU 7.2's writable FUSE export holds the
RESIZE permission for good, and an active commit refuses to share it, so the
export is detached for the commit and re-attached on base afterwards: the
commit is not online here, and that handling is timed separately.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

from bench.compare.proc import mounts_under, proc_status_kib
from bench.compare.qmp import QMP, QMPError
from bench.host import StepError, run
from mountctl.pair import alive, detach

QSD = "qemu-storage-daemon"


def tool(name: str, bindir: str | None) -> str:
    """A QEMU program: from ``bindir`` (an unpacked newer QEMU, see ``make bench-qemu10``) or from PATH."""
    return os.path.join(bindir, name) if bindir else name


def available(bindir: str | None = None) -> str | None:
    """Why the QEMU chain cannot run here, or None."""
    for name in (QSD, "qemu-img"):
        if shutil.which(tool(name, bindir)) is None:
            where = f"in {bindir}" if bindir else "(Debian: qemu-system-common / qemu-utils)"
            return f"{name} is not installed {where}"
    return None


def version(bindir: str | None = None) -> str:
    """``qemu-storage-daemon --version``'s number, e.g. ``10.0.2``, or ``?``."""
    try:
        out = subprocess.run([tool(QSD, bindir), "--version"], capture_output=True, text=True, timeout=20,
                             check=False).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out[2] if len(out) > 2 and out[1] == "version" else "?"


class QemuChain:
    """One qemu-storage-daemon serving the secondary chain; restartable, stopped by its own PID."""

    def __init__(self, workdir: str, size: int, port: int, base_from: str | None = None,
                 bindir: str | None = None) -> None:
        self.dir = workdir
        self.bindir = bindir
        self.size = size
        self.port = port
        self.base_from = base_from
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QMP | None = None
        self.gen = 0
        self.active = "active"
        self.hidden = "hidden"
        self.peak_kib = 0
        os.makedirs(workdir, exist_ok=True)

    # -- paths -----------------------------------------------------------------------------

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    @property
    def file(self) -> str:
        """What the SVM opens: the FUSE export of the active node."""
        return self.path("active.raw")

    @property
    def nbd_uri(self) -> str:
        """Where the primary's writes go: the NBD export of the copy-before-write node."""
        return f"nbd://127.0.0.1:{self.port}/cbw"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    # -- life cycle ------------------------------------------------------------------------

    def _new_overlay(self, name: str) -> str:
        path = self.path(name)
        if os.path.exists(path):
            os.unlink(path)
        run([tool("qemu-img", self.bindir), "create", "-q", "-f", "qcow2", path, str(self.size)], timeout=60)
        return path

    def start(self) -> None:
        """Create the files (base copied from ``base_from`` once) and start the daemon with the chain."""
        base = self.path("base.raw")
        if not os.path.exists(base):
            if self.base_from:
                shutil.copyfile(self.base_from, base)
            else:
                with open(base, "wb") as f:
                    f.truncate(self.size)
        self.gen = 0
        self.active, self.hidden = "active", "hidden"
        self._new_overlay("hidden.qcow2")
        self._new_overlay("active.qcow2")
        if not os.path.exists(self.file):
            open(self.file, "w").close()  # the FUSE export's mountpoint: an existing regular file
        sock = self.path("qmp.sock")
        if os.path.exists(sock):
            os.unlink(sock)
        f = "cache.direct=off"
        argv = [
            tool(QSD, self.bindir),
            "--blockdev", f"driver=file,node-name=base-file,filename={base},{f}",
            "--blockdev", "driver=raw,node-name=base,file=base-file",
            "--blockdev", f"driver=file,node-name=hidden-file,filename={self.path('hidden.qcow2')},{f}",
            "--blockdev", "driver=qcow2,node-name=hidden,file=hidden-file,backing=base",
            "--blockdev", "driver=copy-before-write,node-name=cbw,file=base,target=hidden",
            "--blockdev", f"driver=file,node-name=active-file,filename={self.path('active.qcow2')},{f}",
            "--blockdev", "driver=qcow2,node-name=active,file=active-file,backing=hidden",
            "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={self.port}",
            "--export", "type=nbd,id=n0,node-name=cbw,writable=on",
            "--export", f"type=fuse,id=f0,node-name=active,mountpoint={self.file},writable=on",
            "--chardev", f"socket,id=qmp0,path={sock},server=on,wait=off",
            "--monitor", "chardev=qmp0,mode=control",
        ]
        with open(self.path("qsd.log"), "ab") as log:
            # Own session: a Ctrl-C on the terminal reaches the harness, which stops the daemon itself.
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise StepError(f"qemu-storage-daemon exited {self.proc.returncode}: {self._log_tail()}")
            if os.path.exists(sock):
                try:
                    self.qmp = QMP(sock)
                    break
                except (OSError, QMPError):
                    pass
            if time.monotonic() > deadline:
                raise StepError("qemu-storage-daemon did not open its QMP socket within 30 s")
            time.sleep(0.05)
        if self.file not in mounts_under(self.dir):
            raise StepError(f"the FUSE export is not mounted on {self.file}")

    def _log_tail(self) -> str:
        try:
            with open(self.path("qsd.log"), errors="replace") as f:
                return " | ".join(f.read().strip().splitlines()[-3:])
        except OSError:
            return ""

    def hwm_kib(self) -> int:
        """Peak RSS over every daemon this chain has run (restarts included)."""
        if self.pid is not None:
            self.peak_kib = max(self.peak_kib, proc_status_kib(self.pid, "VmHWM") or 0)
        return self.peak_kib

    def stop(self) -> None:
        """``quit`` over QMP, then SIGTERM, then SIGKILL, by our own PID; detach a left-over export mount."""
        proc, self.proc = self.proc, None
        if proc is not None:
            self.peak_kib = max(self.peak_kib, proc_status_kib(proc.pid, "VmHWM") or 0)
            if self.qmp is not None:
                try:
                    self.qmp.cmd("quit", timeout=10)
                except (OSError, QMPError):
                    pass
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None and alive(proc.pid):
                    try:
                        proc.send_signal(sig)
                    except ProcessLookupError:
                        pass
                try:
                    proc.wait(timeout=15)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        for point in mounts_under(self.dir):
            detach(point)

    def restart(self) -> None:
        """A fresh chain (empty overlays) over the same base."""
        self.stop()
        self.start()

    # -- operations ------------------------------------------------------------------------

    def _q(self) -> QMP:
        if self.qmp is None or self.proc is None or self.proc.poll() is not None:
            raise StepError(f"qemu-storage-daemon is not running: {self._log_tail()}")
        return self.qmp

    def checkpoint(self) -> float:
        """Empty active and hidden (see the module doc); seconds of the QMP part, files unlinked included."""
        q = self._q()
        self.gen += 1
        na, nh = f"a{self.gen}", f"h{self.gen}"
        na_path = self._new_overlay(f"{na}.qcow2")
        nh_path = self._new_overlay(f"{nh}.qcow2")
        old_files = [self.path(f"{self.active}.qcow2"), self.path(f"{self.hidden}.qcow2")]
        nn = "node-name"
        try:
            t0 = time.monotonic()
            q.cmd("blockdev-add", driver="file", **{nn: na + "-file"}, filename=na_path, cache={"direct": False})
            q.cmd("blockdev-add", driver="qcow2", **{nn: na}, file=na + "-file", backing=None)
            q.cmd("blockdev-add", driver="file", **{nn: nh + "-file"}, filename=nh_path, cache={"direct": False})
            q.cmd("blockdev-add", driver="qcow2", **{nn: nh}, file=nh + "-file", backing="base")
            # The FUSE export moves up onto the empty overlay, which then skips the old layers.
            q.cmd("blockdev-snapshot", node=self.active, overlay=na)
            q.cmd("blockdev-reopen", options=[{"driver": "qcow2", nn: na, "file": na + "-file", "backing": nh}])
            q.cmd("blockdev-del", **{nn: self.active})
            q.cmd("blockdev-del", **{nn: self.active + "-file"})
            # A new copy-before-write node: a new target and a fresh copy bitmap (every cluster copied again).
            q.cmd("block-export-del", id="n0")
            q.wait_event("BLOCK_EXPORT_DELETED", lambda e: e.get("data", {}).get("id") == "n0")
            q.cmd("blockdev-del", **{nn: "cbw"})
            q.cmd("blockdev-del", **{nn: self.hidden})
            q.cmd("blockdev-del", **{nn: self.hidden + "-file"})
            q.cmd("blockdev-add", driver="copy-before-write", **{nn: "cbw"}, file="base", target=nh)
            q.cmd("block-export-add", type="nbd", id="n0", **{nn: "cbw"}, writable=True)
            for path in old_files:
                os.unlink(path)
            seconds = time.monotonic() - t0
        except QMPError as e:
            raise StepError(f"QEMU checkpoint (overlay swap) failed: {e}") from None
        self.active, self.hidden = na, nh
        return seconds

    def failover(self) -> tuple[float, float]:
        """(commit seconds, total seconds) of a failover; see the module doc for why the FUSE export is detached."""
        q = self._q()
        nn = "node-name"
        try:
            t0 = time.monotonic()
            q.cmd("block-export-del", id="n0")
            q.wait_event("BLOCK_EXPORT_DELETED", lambda e: e.get("data", {}).get("id") == "n0")
            q.cmd("blockdev-del", **{nn: "cbw"})
            # QEMU 7.2: a writable FUSE export holds RESIZE for good, which an active commit must not share.
            q.cmd("block-export-del", id="f0")
            q.wait_event("BLOCK_EXPORT_DELETED", lambda e: e.get("data", {}).get("id") == "f0")
            t1 = time.monotonic()
            q.cmd("block-commit", **{"job-id": "failover", "device": self.active, "base-node": "base"})
            q.wait_event("BLOCK_JOB_READY", lambda e: e.get("data", {}).get("device") == "failover", timeout=600)
            q.cmd("block-job-complete", device="failover")
            done = q.wait_event("BLOCK_JOB_COMPLETED", lambda e: e.get("data", {}).get("device") == "failover",
                                timeout=600)
            t2 = time.monotonic()
            q.cmd("block-export-add", type="fuse", id="f0", **{nn: "base"}, mountpoint=self.file, writable=True)
            t3 = time.monotonic()
        except QMPError as e:
            raise StepError(f"QEMU failover (block-commit) failed: {e}") from None
        if done.get("data", {}).get("error"):
            raise StepError(f"QEMU block-commit failed: {done['data']['error']}")
        return t2 - t1, t3 - t0

    def overlay_bytes(self) -> tuple[int, int]:
        """Allocated bytes of (hidden, active) qcow2 files: what the buffers hold on disk."""
        out = []
        for node in (self.hidden, self.active):
            try:
                out.append(os.stat(self.path(f"{node}.qcow2")).st_blocks * 512)
            except OSError:
                out.append(0)
        return out[0], out[1]

