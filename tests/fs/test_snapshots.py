"""Snapshots and clones through the mount, checked against images the test knows exactly.

A snapshot ``VM/DISK@NAME.raw`` must hold, byte for byte, the disk at the
moment of the request (on a primary) or the last checkpoint's image (on a
secondary), whatever happens to the disk afterwards: concurrent writers,
checkpoints, a failover, an unmount, a ``kill -9`` of the daemon. A clone
must show its own writes over that image and change nothing else.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fs.conftest import random_image
from tests.fs.mounts import XATTR as P
from tests.fs.mounts import Mount, mountctl, run
from tests.fs.slot_writer import SLOT, slot_data
from tests.fs.test_crash import WRITER
from tests.waiting import wait_until_sync

MiB = 1 << 20
SIZE = 32 * MiB
ROOT = Path(__file__).resolve().parents[2]
# -- helpers ---------------------------------------------------------------------------


def read_direct(path: Path) -> bytes:
    """The file's content read with O_DIRECT: from the daemon, not from the kernel's page cache."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        size = os.fstat(fd).st_size
        chunk = mmap.mmap(-1, MiB)
        out = bytearray()
        for off in range(0, size, MiB):
            n = os.preadv(fd, [chunk], off)
            out += chunk[:n]
        chunk.close()
        return bytes(out)
    finally:
        os.close(fd)


def same_image(expected: Path, image: Path, fmt: str = "raw") -> None:
    """``qemu-img compare`` with O_DIRECT reads of ``image``; fails with qemu-img's report."""
    res = run("qemu-img", "compare", "-T", "none", "-f", "raw", "-F", fmt, expected, image, check=False)
    assert res.returncode == 0, f"{image} differs from {expected}: {res.stdout}{res.stderr}"


def write_image(path: Path, data: bytes | bytearray) -> Path:
    path.write_bytes(data)
    return path


def store_bytes(store: Path) -> int:
    """Bytes the store occupies on its file system (``du``: allocated blocks, not sizes)."""
    total = 0
    for dirpath, _, files in os.walk(store):
        for name in files:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def import_disk(m: Mount, tmp_path: Path, seed: int, size: int = SIZE, disk: str = "vm1/d0") -> tuple[bytes, Path]:
    img = tmp_path / f"{disk.replace('/', '-')}.raw"
    data = random_image(img, size, seed)
    mountctl("import", m.mnt, disk, "--from", img)
    vm, name = disk.split("/")
    return data, m.path(vm, name + ".raw")


def direct_write(path: Path, offset: int, data: bytes) -> None:
    """One O_DIRECT write (length a multiple of 4096): it reaches the daemon before returning."""
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        assert os.pwrite(fd, buf, offset) == len(data)
    finally:
        os.close(fd)
        buf.close()


def _log_slots(log: Path, kind: str) -> set[int]:
    if not log.exists():
        return set()
    return {int(parts[1]) for line in log.read_text().splitlines()
            if len(parts := line.split()) == 2 and parts[0] == kind}


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


# -- primary: the disk now -------------------------------------------------------------------


def test_primary_snapshot_under_a_concurrent_writer_is_exact(pri, tmp_path):
    """Every write completed before the request is in the snapshot, none started after it returned.

    Region R1 (0-4 MiB) is written by this process before the snapshot (O_DIRECT, buffered
    pages still dirty in the kernel, a dirty mmap) and overwritten after it. Region R2
    (8-24 MiB) is written concurrently by another process, one logged 64 KiB slot at a
    time: slots done before the request must be new, slots started after it returned must
    be old, the few in between must be entirely old or entirely new. Then the whole disk
    keeps changing while qemu-img converts the snapshot to qcow2.
    """
    base, f = import_disk(pri, tmp_path, seed=31)
    expected = bytearray(base)
    rnd = random.Random(5)
    data = rnd.randbytes(MiB)
    direct_write(f, 2 * MiB, data)
    expected[2 * MiB : 3 * MiB] = data
    fd = os.open(f, os.O_RDWR)
    mm = mmap.mmap(fd, SIZE)
    first, nslots, seed = 8 * MiB // SLOT, 16 * MiB // SLOT, 7
    before, during = 10, 48  # slots granted before the request, and while it runs
    log, stop = tmp_path / "writer.log", tmp_path / "stop"
    writer = subprocess.Popen(
        [sys.executable, "-m", "tests.fs.slot_writer", str(f), str(log), str(seed), str(first), str(nslots),
         str(stop)], cwd=ROOT, stdin=subprocess.PIPE)
    assert writer.stdin is not None

    def grant(what: bytes) -> None:
        writer.stdin.write(what)
        writer.stdin.flush()

    snap = pri.path("vm1", "d0@s1.raw")
    backup = tmp_path / "backup.qcow2"
    try:
        for _ in range(30):  # dirty pages that only the snapshot's write-back can bring down
            off = rnd.randrange(0, 4 * MiB - 9000)
            piece = rnd.randbytes(rnd.randrange(1, 9000))
            os.pwrite(fd, piece, off)
            expected[off : off + len(piece)] = piece
        piece = rnd.randbytes(5000)
        mm[3 * MiB + 100 : 3 * MiB + 5100] = piece
        expected[3 * MiB + 100 : 3 * MiB + 5100] = piece
        grant(b"+" * before)
        wait_until_sync(lambda: len(_log_slots(log, "D")) >= before, what="the writer's first slots")
        done_before = _log_slots(log, "D")
        grant(b"+" * during)  # these run while the snapshot is requested, however long it takes
        os.setxattr(f, P + "snapshot", b"s1")  # from this process: its dirty pages stay dirty until then
        started_by_return = _log_slots(log, "S")
        grant(b"+" * (nslots - before - during) + b"g")
        # The disk moves on: R1 again, and the writer everywhere.
        os.pwrite(fd, rnd.randbytes(MiB), 0)
        mm[3 * MiB : 4 * MiB] = rnd.randbytes(MiB)
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", snap, backup, timeout=120)
        stop.touch()
        writer.stdin.close()
        assert writer.wait(timeout=60) == 0
    finally:
        _stop(writer)
        mm.close()
        os.close(fd)
    assert done_before and len(started_by_return) <= before + during < nslots
    got = read_direct(snap)
    ambiguous = 0
    for slot in range(first, first + nslots):
        lo, hi = slot * SLOT, (slot + 1) * SLOT
        new, old, seen = slot_data(seed, slot), bytes(expected[lo:hi]), got[lo:hi]
        if slot in done_before:
            assert seen == new, f"slot {slot} completed before the request but is not in the snapshot"
            expected[lo:hi] = new
        elif slot not in started_by_return:
            assert seen == old, f"slot {slot} started after the request returned but is in the snapshot"
        else:
            assert seen in (old, new), f"slot {slot} is torn in the snapshot"
            expected[lo:hi] = seen
            ambiguous += 1
    assert ambiguous <= during  # at most the slots granted while the request ran
    exp = write_image(tmp_path / "expected.raw", expected)
    same_image(exp, snap)
    same_image(exp, backup, "qcow2")
    assert read_direct(f) != bytes(expected), "the disk should have moved on"
    pri.remount()
    same_image(exp, snap)


def test_vm_snapshot_takes_all_disks_at_one_instant(pri, tmp_path):
    """A writer stamps counter i on d0, then on d1: a one-instant snapshot sees d0 - d1 in {0, 1}."""
    for disk in ("d0", "d1"):
        mountctl("create", pri.mnt, f"vm1/{disk}", "--size", "4M")
    d0, d1 = pri.path("vm1", "d0.raw"), pri.path("vm1", "d1.raw")
    stop = tmp_path / "stop"
    code = (
        "import mmap, os, sys\n"
        "fds = [os.open(p, os.O_RDWR | os.O_DIRECT) for p in sys.argv[1:3]]\n"
        "buf = mmap.mmap(-1, 4096); i = 0\n"
        "while not os.path.exists(sys.argv[3]):\n"
        "    i += 1; buf[:8] = i.to_bytes(8, 'little')\n"
        "    for fd in fds: os.pwrite(fd, buf, 0)\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", code, str(d0), str(d1), str(stop)])
    try:
        def counter() -> int:
            return int.from_bytes(read_direct(d1)[:8], "little")

        wait_until_sync(lambda: counter() > 20, what="the lockstep writer")
        for name in ("a", "b", "c", "d"):
            out = mountctl("snapshot", "--vm", pri.path("vm1"), name).stdout
            assert "at one instant" in out and f"d0@{name}.raw, d1@{name}.raw" in out
            now = counter()  # the writer moves on before the next snapshot
            wait_until_sync(lambda now=now: counter() > now, what=f"the writer past {now}")
        stop.touch()
        assert writer.wait(timeout=30) == 0
    finally:
        _stop(writer)
    counters = []
    for name in ("a", "b", "c", "d"):
        c0 = int.from_bytes(read_direct(pri.path("vm1", f"d0@{name}.raw"))[:8], "little")
        c1 = int.from_bytes(read_direct(pri.path("vm1", f"d1@{name}.raw"))[:8], "little")
        assert c0 - c1 in (0, 1), f"snapshot {name}: d0 at {c0}, d1 at {c1}: not one instant"
        counters.append(c0)
    assert counters == sorted(counters) and counters[0] < counters[-1]
    listing = json.loads(os.getxattr(pri.path("vm1"), P + "snapshots"))
    assert sorted((s["disk"], s["name"]) for s in listing) == [(d, n) for d in ("d0", "d1") for n in "abcd"]
    assert len({s["created"] for s in listing if s["name"] == "a"}) == 1  # one call, one instant


# -- secondary: the last checkpoint ----------------------------------------------------------------


def test_secondary_snapshot_is_the_last_checkpoint_and_survives_failover(sec, tmp_path):
    """SVM writes are never in a snapshot; checkpoints, a failover and a remount leave it unchanged.

    Without a replication peer the secondary's base changes only by the import and the
    failover commit, so the last checkpoint's image is the imported one. The failover
    carries the SVM writes into base through copy-before-write, which must save the
    snapshot's blocks first.
    """
    primary, f = import_disk(sec, tmp_path, seed=41, size=16 * MiB)
    ref = tmp_path / "vm1-d0.raw"
    rnd = random.Random(9)
    view = bytearray(primary)
    fd = os.open(f, os.O_RDWR)
    try:
        for off in (0, 5 * MiB + 123, 9 * MiB):
            piece = rnd.randbytes(200_000)
            os.pwrite(fd, piece, off)
            view[off : off + len(piece)] = piece
        os.setxattr(f, P + "snapshot", b"s1")
        os.setxattr(f, P + "clone", b"c1")
    finally:
        os.close(fd)
    snap, clone = sec.path("vm1", "d0@s1.raw"), sec.path("vm1", "d0@c1.raw")
    same_image(ref, snap)
    same_image(ref, clone)
    assert read_direct(f) == view
    st = json.loads(os.getxattr(snap, P + "status"))
    assert (st["kind"], st["seq"], st["role"], st["writable"]) == ("snapshot", 0, "secondary", False)

    mountctl("checkpoint", sec.path("vm1"))
    same_image(ref, f)
    same_image(ref, snap)
    # SVM writes for the failover to commit, and writes to the clone.
    view = bytearray(primary)
    cview = bytearray(primary)
    with open(f, "r+b") as w:
        for off in (MiB, 7 * MiB + 5, 15 * MiB):
            piece = rnd.randbytes(300_000)
            w.seek(off)
            w.write(piece)
            view[off : off + len(piece)] = piece
    with open(clone, "r+b") as w:
        w.seek(MiB + 4096)
        piece = rnd.randbytes(64 * 1024)
        w.write(piece)
        cview[MiB + 4096 : MiB + 4096 + len(piece)] = piece
    out = mountctl("failover", sec.path("vm1")).stdout
    assert "now primary" in out
    assert read_direct(f) == view
    same_image(ref, snap)
    # Now a primary: first-touch writes copy the snapshot's blocks before they change.
    piece = rnd.randbytes(2 * MiB)
    direct_write(f, 10 * MiB, piece)
    view[10 * MiB : 12 * MiB] = piece
    same_image(ref, snap)
    assert read_direct(clone) == cview
    assert json.loads(os.getxattr(snap, P + "status"))["bytes"] >= 2 * MiB
    sec.remount()
    same_image(ref, snap)
    assert read_direct(clone) == cview
    assert read_direct(f) == view


# -- clones -----------------------------------------------------------------------------------------

CLONE_REGIONS = [(0, 4096), (MiB + 1000, 5000), (3 * MiB + 100, 17), (17 * MiB + 4090, 70_000), (SIZE - 7, 7)]


def _qemu_io(path: Path, cmds: list[str], cache: str) -> None:
    args = ["qemu-io", "-f", "raw", "-t", cache]
    for c in cmds:
        args += ["-c", c]
    res = run(*args, path, check=False, timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "failed" not in out and "Pattern verification" not in out, out


def test_clones_take_writes_and_change_nothing_else(pri, tmp_path):
    base, f = import_disk(pri, tmp_path, seed=51)
    ref = tmp_path / "vm1-d0.raw"
    mountctl("snapshot", pri.path("vm1", "d0"), "s1")
    w1 = random.Random(1).randbytes(MiB)
    direct_write(f, MiB, w1)
    disk_view = bytearray(base)
    disk_view[MiB : 2 * MiB] = w1
    mountctl("clone", pri.path("vm1", "d0"), "c1")  # the disk now: base + w1
    mountctl("clone", pri.path("vm1", "d0"), "c2", "--from", "s1")  # the snapshot: base
    c1, c2 = pri.path("vm1", "d0@c1.raw"), pri.path("vm1", "d0@c2.raw")
    views = {c1: bytearray(disk_view), c2: bytearray(base)}
    log = tmp_path / "writer.log"
    writer = subprocess.Popen([sys.executable, "-m", "tests.fs.slot_writer", str(f), str(log), "3",
                               str(16 * MiB // SLOT), str(8 * MiB // SLOT)], cwd=ROOT)
    try:
        # qemu-io on both clones while the disk changes underneath them.
        for (clone, cache), pat0 in zip(((c1, "writeback"), (c2, "none")), (0x20, 0x40), strict=True):
            cmds = [f"write -P {pat0 + i} {off} {ln}" for i, (off, ln) in enumerate(CLONE_REGIONS)]
            _qemu_io(clone, cmds, cache)
            for i, (off, ln) in enumerate(CLONE_REGIONS):
                views[clone][off : off + ln] = bytes([pat0 + i]) * ln
        # O_DIRECT and a shared mapping work on a clone like on a disk.
        piece = random.Random(2).randbytes(8192)
        direct_write(c2, 20 * MiB, piece)
        views[c2][20 * MiB : 20 * MiB + 8192] = piece
        fd = os.open(c1, os.O_RDWR)
        try:
            with mmap.mmap(fd, SIZE) as mm:
                mm[21 * MiB + 3 : 21 * MiB + 10_003] = b"m" * 10_000
                mm.flush()
        finally:
            os.close(fd)
        views[c1][21 * MiB + 3 : 21 * MiB + 10_003] = b"m" * 10_000
        assert writer.wait(timeout=60) == 0
    finally:
        _stop(writer)
    for slot in range(16 * MiB // SLOT, 24 * MiB // SLOT):
        disk_view[slot * SLOT : (slot + 1) * SLOT] = slot_data(3, slot)
    # Read back in the other cache mode, then whole images.
    for clone, cache, pat0 in ((c1, "none", 0x20), (c2, "writeback", 0x40)):
        _qemu_io(clone, [f"read -P {pat0 + i} {off} {ln}" for i, (off, ln) in enumerate(CLONE_REGIONS)], cache)

    def check() -> None:
        assert read_direct(c1) == views[c1]
        assert read_direct(c2) == views[c2]
        assert read_direct(f) == disk_view, "a clone write reached the disk"
        same_image(ref, pri.path("vm1", "d0@s1.raw"))

    check()
    listing = {s["name"]: s for s in json.loads(os.getxattr(f, P + "snapshots"))}
    assert (listing["c1"]["kind"], listing["c1"]["base"], listing["c1"]["writable"]) == ("clone", None, True)
    assert (listing["c2"]["kind"], listing["c2"]["base"]) == ("clone", "s1")
    assert listing["c2"]["bytes"] >= 5 * 4096  # its overlay holds its writes
    assert "virtual size: 32 MiB" in run("qemu-img", "info", "-f", "raw", c1).stdout
    pri.remount()
    check()


# -- space, busy, deletion ------------------------------------------------------------------------------


def test_delete_frees_space_and_refuses_while_in_use(pri, tmp_path):
    mountctl("create", pri.mnt, "vm1/d0", "--size", "32M")
    f = pri.path("vm1", "d0.raw")
    direct_write(f, 0, random.Random(1).randbytes(16 * MiB))
    os.setxattr(f, P + "snapshot", b"s1")
    before = store_bytes(pri.store)
    direct_write(f, 0, random.Random(2).randbytes(16 * MiB))  # first touch: 16 MiB saved into s1
    grown = store_bytes(pri.store) - before
    assert 16 * MiB <= grown < 18 * MiB, grown
    snap = pri.path("vm1", "d0@s1.raw")
    assert json.loads(os.getxattr(snap, P + "status"))["bytes"] == 16 * MiB
    os.setxattr(snap, P + "clone", b"c1")
    clone = pri.path("vm1", "d0@c1.raw")
    direct_write(clone, 0, random.Random(3).randbytes(4 * MiB))
    peak = store_bytes(pri.store)

    # A clone is built on s1: EBUSY, and last_error says why.
    with pytest.raises(OSError) as e:
        os.removexattr(snap, P + "snapshot")
    assert e.value.errno == errno.EBUSY
    assert "clone c1 (d0@c1.raw) is built on it" in os.getxattr(snap, P + "last_error").decode()
    # An open clone: EBUSY until it is closed; a close just before the delete is waited for.
    fd = os.open(clone, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            os.removexattr(clone, P + "clone")
        assert e.value.errno == errno.EBUSY
        assert "is open (1 file handle" in os.getxattr(clone, P + "last_error").decode()
    finally:
        os.close(fd)
    os.removexattr(clone, P + "clone")
    assert json.loads(os.getxattr(f, P + "last_result"))["freed_bytes"] == 4 * MiB
    old_ino = os.stat(snap).st_ino
    os.removexattr(snap, P + "snapshot")
    result = json.loads(os.getxattr(f, P + "last_result"))
    assert (result["op"], result["freed_bytes"]) == ("delete", 16 * MiB)
    assert not snap.exists() and not clone.exists()
    assert sorted(os.listdir(pri.path("vm1"))) == ["d0.raw"]
    freed = peak - store_bytes(pri.store)
    assert freed >= 20 * MiB - 64 * 1024, f"only {freed} bytes freed"  # (the mount's log grows a little)
    # The name can be used again; it is a new file with the disk's current content.
    os.setxattr(f, P + "snapshot", b"s1")
    assert os.stat(snap).st_ino != old_ino
    assert read_direct(snap)[: 16 * MiB] == random.Random(2).randbytes(16 * MiB)


# -- crashes ----------------------------------------------------------------------------------------------


def test_kill9_right_after_a_snapshot_keeps_it(pri, tmp_path):
    base, f = import_disk(pri, tmp_path, seed=61, size=16 * MiB)
    expected = bytearray(base)
    fd = os.open(f, os.O_RDWR)
    try:
        # Buffered, not synced: dirty pages the snapshot's write-back takes down.
        os.pwrite(fd, b"in the snapshot" * 1000, 3 * MiB + 5)
        expected[3 * MiB + 5 : 3 * MiB + 15_005] = b"in the snapshot" * 1000
        os.setxattr(f, P + "snapshot", b"s1")
        pri.kill9()
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # the daemon is gone: the close cannot flush
    res = pri.mount()
    assert "recovered after a crash" in res.stderr or "detached a stale mount" in res.stderr
    same_image(write_image(tmp_path / "expected.raw", expected), pri.path("vm1", "d0@s1.raw"))
    names = [s["name"] for s in json.loads(os.getxattr(f, P + "snapshots"))]
    assert names == ["s1"]


def test_kill9_during_copy_before_write_keeps_the_snapshot_exact(pri, tmp_path):
    """Synced first-touch writes run when the daemon dies: the snapshot and every acked write survive."""
    base, f = import_disk(pri, tmp_path, seed=71, size=16 * MiB)
    mountctl("snapshot", pri.path("vm1", "d0"), "s1")
    log_path = tmp_path / "acked.log"
    nslots = 16 * MiB // 65536
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(f), str(log_path), "19", str(nslots)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None
        for _ in range(20):  # the kill follows the 20th acknowledged write at once, without a poll
            assert writer.stdout.readline().strip() == "acked", "the writer stopped"
        pri.kill9()
    finally:
        _stop(writer)
    acked = [tuple(map(int, line.split())) for line in log_path.read_text().splitlines() if line.strip()]
    assert 20 <= len(acked) < nslots, "the kill did not land in the middle of the writes"
    pri.mount()
    same_image(tmp_path / "vm1-d0.raw", pri.path("vm1", "d0@s1.raw"))
    with open(f, "rb") as r:
        for slot, seed in acked:
            r.seek(slot * 65536)
            assert r.read(65536) == random.Random(seed).randbytes(65536), f"acked slot {slot} lost"
    # And the snapshot keeps working: more writes, another remount.
    direct_write(f, 0, bytes(16 * MiB))
    pri.remount()
    same_image(tmp_path / "vm1-d0.raw", pri.path("vm1", "d0@s1.raw"))
