"""colofs demo: a COLO pair on one machine, replicating over loopback TCP through two mounts.

Mounts a secondary (``--listen``) and a primary (``--peer``) with ``mountctl``,
creates a 256 MiB disk on the primary, writes to it with ``qemu-io`` as the
primary VM would, writes to the secondary's file as the secondary VM would,
and shows the secondary's invariants through the mounted files: the SVM never
sees the primary's writes between checkpoints, a checkpoint makes both files
equal, and a failover turns the SVM's view into the disk while the old
primary is refused. Everything lives under a temporary directory in /var/tmp
and is unmounted and removed at the end, also after a failure or Ctrl-C.
Exits non-zero if any comparison fails.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

MiB = 1 << 20
SIZE = 256 * MiB
CHUNK = 16 * MiB
MOUNTCTL = [sys.executable, "-m", "mountctl.cli"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def sh(*cmd: str, timeout: float = 120) -> str:
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {(res.stderr or res.stdout).strip()}")
    return res.stdout.strip()


def mountctl(*args: str, timeout: float = 120) -> str:
    return sh(*MOUNTCTL, *args, timeout=timeout)


def status(mnt: str) -> dict[str, Any]:
    return json.loads(mountctl("status", mnt, "--json"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def same(path: str, image: bytearray) -> bool:
    """Whether the mounted file holds exactly ``image`` (read through the page cache, as QEMU reads)."""
    with open(path, "rb") as f:
        for off in range(0, len(image), CHUNK):
            if f.read(CHUNK) != image[off : off + CHUNK]:
                return False
        return f.read(1) == b""


def same_files(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(CHUNK), fb.read(CHUNK)
            if x != y:
                return False
            if not x:
                return True


def pattern_writes(path: str, image: bytearray, rng: random.Random, count: int, size: int,
                   direct: bool) -> int:
    """``count`` qemu-io pattern writes of ``size`` bytes at random aligned offsets; returns the bytes written."""
    cmds: list[str] = []
    for _ in range(count):
        off = rng.randrange(0, (SIZE - size) // 4096) * 4096
        pattern = rng.randrange(1, 256)
        cmds += ["-c", f"write -P {pattern} {off} {size}"]
        image[off : off + size] = bytes([pattern]) * size
    sh("qemu-io", "-f", "raw", *(["-n"] if direct else []), *cmds, path)
    return count * size


class Node:
    """One mount daemon of the demo, remembered by PID so cleanup never touches anything else."""

    def __init__(self, work: str, name: str, role: str) -> None:
        self.store = os.path.join(work, f"{name}-store")
        self.mnt = os.path.join(work, f"{name}-mnt")
        self.role = role
        self.pid: int | None = None
        os.makedirs(self.mnt)

    def mount(self, *opts: str) -> None:
        mountctl("mount", "--role", self.role, "--store", self.store, *opts, self.mnt)
        self.pid = int(status(self.mnt)["pid"])

    def file(self) -> str:
        return os.path.join(self.mnt, "vm1", "disk0.raw")

    def cleanup(self) -> None:
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        try:
            mountctl("umount", self.mnt, timeout=60)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            say(f"unmounting {self.mnt} failed ({e}); killing its daemon (pid {pid})")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            time.sleep(0.5)
            subprocess.run(["fusermount3", "-u", "-z", self.mnt], capture_output=True, check=False)


def wait_acked(primary: Node, timeout: float = 60) -> float:
    """Wait until the secondary acknowledged every write of vm1; returns when that happened."""
    deadline = time.monotonic() + timeout
    while True:
        vm = status(primary.mnt)["vms"]["vm1"]
        if vm["peer"].get("acked_seq", -1) >= vm["last_applied"]:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise RuntimeError(f"the secondary did not catch up within {timeout:.0f} s: {vm['peer']}")
        time.sleep(0.01)


def run(work: str) -> bool:
    rng = random.Random(2024)
    key = os.path.join(work, "colofs.key")
    with os.fdopen(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
        f.write(os.urandom(32))
    port = free_port()
    sec, pri = Node(work, "secondary", "secondary"), Node(work, "primary", "primary")
    nodes = [pri, sec]
    checks: list[tuple[str, bool]] = []

    def check(what: str, ok: bool) -> None:
        checks.append((what, ok))
        say(f"{what}: {'equal' if ok else 'NOT EQUAL'}")

    try:
        sec.mount("--listen", f"127.0.0.1:{port}", "--key-file", key)
        pri.mount("--peer", f"127.0.0.1:{port}", "--key-file", key)
        say(f"secondary on {sec.mnt} listening on 127.0.0.1:{port}; primary on {pri.mnt}; shared key {key} (0600)")
        mountctl("create", pri.mnt, "vm1/disk0", "--size", str(SIZE))
        deadline = time.monotonic() + 30
        while not os.path.exists(sec.file()):
            if time.monotonic() > deadline:
                raise RuntimeError("the disk did not appear on the secondary")
            time.sleep(0.05)
        say(f"created vm1/disk0 ({SIZE // MiB} MiB) on the primary; it appeared on the secondary as {sec.file()}")

        primary = bytearray(SIZE)  # the primary's disk
        svm = bytearray(SIZE)  # what the secondary VM must see: the last checkpoint plus its own writes
        t0 = time.monotonic()
        nbytes = pattern_writes(pri.file(), primary, rng, 128, MiB, direct=True)
        t1 = wait_acked(pri)
        rate = nbytes / (t1 - t0) / 1e6
        say(f"primary: {nbytes / MiB:.0f} MiB of qemu-io pattern writes (1 MiB, O_DIRECT), acknowledged by "
            f"the secondary at {rate:.0f} MB/s (qemu-io start-up included)")
        pattern_writes(pri.file(), primary, rng, 512, 4096, direct=False)
        say("primary: 512 buffered 4 KiB pattern writes (the kernel's page cache holds them)")
        pattern_writes(sec.file(), svm, rng, 64, 65536, direct=False)
        say("secondary VM: 64 writes of 64 KiB to its own file")
        check("isolation: the SVM's file shows only its own writes, none of the primary's", same(sec.file(), svm))

        out = json.loads(mountctl("checkpoint", pri.mnt + "/vm1", "--json"))
        latency = float(out["latency_seconds"])
        say(f"checkpoint at seq {out['seq']}: confirmed by the secondary in {latency * 1000:.1f} ms")
        for node in nodes:
            say(f"{node.role}: " + mountctl("status", node.mnt, "vm1").splitlines()[-1].strip())
        check("after the checkpoint: primary file vs secondary file", same_files(pri.file(), sec.file()))
        check("after the checkpoint: the secondary file vs the primary's image", same(sec.file(), primary))
        svm[:] = primary

        pattern_writes(pri.file(), primary, rng, 32, MiB, direct=True)
        pattern_writes(sec.file(), svm, rng, 32, 65536, direct=True)
        wait_acked(pri)
        say("more writes on both sides, not checkpointed; now the primary is declared lost")
        t2 = time.monotonic()
        say(mountctl("failover", sec.mnt + "/vm1"))
        failover_s = time.monotonic() - t2
        check("after the failover: the secondary file vs the SVM's view", same(sec.file(), svm))
        deadline = time.monotonic() + 15
        while (peer := status(pri.mnt)["vms"]["vm1"]["peer"])["state"] != "refused":
            if time.monotonic() > deadline:
                raise RuntimeError(f"the old primary was not refused: {peer}")
            time.sleep(0.05)
        say(f"the old primary is refused: {peer['reason']}")
        lz4 = peer.get("lz4_ratio")
        for node in nodes:
            node.cleanup()
        say("both mounts unmounted, stores closed cleanly")
    finally:
        for node in nodes:
            node.cleanup()
    ok = all(good for _, good in checks)
    say("summary:")
    say(f"  replicated primary writes: {nbytes / MiB:.0f} MiB at {rate:.0f} MB/s until acknowledged "
        f"(lz4 wire/raw ratio {lz4}: pattern data compresses)")
    say(f"  checkpoint latency: {latency * 1000:.1f} ms; failover: {failover_s * 1000:.0f} ms (incl. mountctl start-up)")
    say(f"  comparisons: {sum(g for _, g in checks)}/{len(checks)} equal -> {'OK' if ok else 'FAILED'}")
    return ok


def main() -> int:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("the demo needs root and /dev/fuse (it mounts two colofs file systems)", file=sys.stderr)
        return 1
    for tool in ("qemu-io", "fusermount3"):
        if shutil.which(tool) is None:
            print(f"the demo needs {tool} (Debian: qemu-utils, fuse3)", file=sys.stderr)
            return 1
    work = tempfile.mkdtemp(prefix="colofs-demo-", dir="/var/tmp")
    started = time.monotonic()
    try:
        ok = run(work)
    except KeyboardInterrupt:
        say("interrupted; cleaned up")
        return 130
    except Exception as e:
        say(f"FAILED: {e}")
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"done in {time.monotonic() - started:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
