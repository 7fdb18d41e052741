"""colofs demo: a COLO pair on one machine, replicating over loopback TCP through two mounts.

Mounts a secondary (``--listen``) and a primary (``--peer``) with ``mountctl``
(through :mod:`mountctl.pair`, the harness the tests and benchmarks use too),
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
import subprocess
import sys
import tempfile
import time

from mountctl.pair import Node, Pair

MiB = 1 << 20
SIZE = 256 * MiB
CHUNK = 16 * MiB
VM, DISK = "vm1", "disk0"


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


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
    res = subprocess.run(["qemu-io", "-f", "raw", *(["-n"] if direct else []), *cmds, path], capture_output=True,
                         text=True, timeout=120, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"qemu-io on {path} failed ({res.returncode}): {(res.stderr or res.stdout).strip()}")
    return count * size


def run(work: str) -> bool:
    rng = random.Random(2024)
    pair = Pair(work)
    sec, pri = pair.secondary, pair.primary
    nodes: list[Node] = [pri, sec]
    pfile, sfile = str(pri.file(VM, DISK)), str(sec.file(VM, DISK))
    checks: list[tuple[str, bool]] = []

    def check(what: str, ok: bool) -> None:
        checks.append((what, ok))
        say(f"{what}: {'equal' if ok else 'NOT EQUAL'}")

    with pair:
        pair.start()
        say(f"secondary on {sec.mnt} listening on 127.0.0.1:{pair.port}; primary on {pri.mnt}; "
            f"shared key {pair.key} (0600)")
        pri.mountctl("create", str(pri.mnt), f"{VM}/{DISK}", "--size", str(SIZE))
        pair.wait_disk(VM, DISK, timeout=30)
        say(f"created {VM}/{DISK} ({SIZE // MiB} MiB) on the primary; it appeared on the secondary as {sfile}")

        primary = bytearray(SIZE)  # the primary's disk
        svm = bytearray(SIZE)  # what the secondary VM must see: the last checkpoint plus its own writes
        t0 = time.monotonic()
        nbytes = pattern_writes(pfile, primary, rng, 128, MiB, direct=True)
        t1 = pair.wait_acked(VM, timeout=60)
        rate = nbytes / (t1 - t0) / 1e6
        say(f"primary: {nbytes / MiB:.0f} MiB of qemu-io pattern writes (1 MiB, O_DIRECT), acknowledged by "
            f"the secondary at {rate:.0f} MB/s (qemu-io start-up included)")
        pattern_writes(pfile, primary, rng, 512, 4096, direct=False)
        say("primary: 512 buffered 4 KiB pattern writes (the kernel's page cache holds them)")
        pattern_writes(sfile, svm, rng, 64, 65536, direct=False)
        say("secondary VM: 64 writes of 64 KiB to its own file")
        check("isolation: the SVM's file shows only its own writes, none of the primary's", same(sfile, svm))

        out = json.loads(pri.mountctl("checkpoint", str(pri.path(VM)), "--json").stdout)
        latency = float(out["latency_seconds"])
        say(f"checkpoint at seq {out['seq']}: confirmed by the secondary in {latency * 1000:.1f} ms")
        for node in nodes:
            say(f"{node.role}: " + node.mountctl("status", str(node.mnt), VM).stdout.splitlines()[-1].strip())
        check("after the checkpoint: primary file vs secondary file", same_files(pfile, sfile))
        check("after the checkpoint: the secondary file vs the primary's image", same(sfile, primary))
        svm[:] = primary

        pattern_writes(pfile, primary, rng, 32, MiB, direct=True)
        pattern_writes(sfile, svm, rng, 32, 65536, direct=True)
        pair.wait_acked(VM, timeout=60)
        say("more writes on both sides, not checkpointed; now the primary is declared lost")
        t2 = time.monotonic()
        say(sec.mountctl("failover", str(sec.path(VM))).stdout.strip())
        failover_s = time.monotonic() - t2
        check("after the failover: the secondary file vs the SVM's view", same(sfile, svm))
        peer = pair.wait(lambda: (p := pri.vm_status(VM)["peer"])["state"] == "refused" and p, 15,
                         "the old primary to be refused")
        say(f"the old primary is refused: {peer['reason']}")
        lz4 = peer.get("lz4_ratio")
        for node in nodes:
            node.umount(timeout=60)
        say("both mounts unmounted, stores closed cleanly")
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
    except Exception as e:  # any failure: say it in one line; the pair is already cleaned up
        say(f"FAILED: {e}")
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"done in {time.monotonic() - started:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
