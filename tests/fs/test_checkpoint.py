"""Checkpoint and failover through the mount, checked by reading the file against reference images.

Without a replication layer the secondary's base only changes through the
import, so the reference "primary image" is the imported image: a checkpoint
must discard every SVM write (including dirty pages the kernel still holds
and pages it cached), a failover must keep them.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

from tests.fs.conftest import random_image
from tests.fs.mounts import TIMEOUT, mountctl
from tests.waiting import wait_until_sync

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
SIZE = 16 * MiB


def _import(m, tmp_path, seed: int = 1) -> tuple[bytes, object]:
    img = tmp_path / "primary.raw"
    data = random_image(img, SIZE, seed)
    mountctl("import", m.mnt, "vm1/d0", "--from", img)
    return data, m.path("vm1", "d0.raw")


def _svm_writes(f, rnd: random.Random) -> tuple[bytearray, int, mmap.mmap]:
    """An O_DIRECT write, then buffered writes and dirty mmap pages left in the kernel.

    The returned fd stays open: closing any fd of the file would make the
    kernel write the dirty pages back, and the checkpoint must do that itself.
    """
    dfd = os.open(f, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, MiB)
    buf.write(rnd.randbytes(MiB))
    os.pwrite(dfd, buf, 5 * MiB)
    os.close(dfd)
    fd = os.open(f, os.O_RDWR)
    for _ in range(40):
        off = rnd.randrange(0, SIZE - 70000)
        os.pwrite(fd, rnd.randbytes(rnd.randrange(1, 70000)), off)
    mm = mmap.mmap(fd, SIZE)
    mm[7 * MiB : 7 * MiB + 10000] = rnd.randbytes(10000)
    return bytearray(os.pread(fd, SIZE, 0)), fd, mm


def test_checkpoint_discards_svm_writes_including_dirty_pages(sec, tmp_path):
    primary, f = _import(sec, tmp_path)
    rnd = random.Random(2)
    view, fd, mm = _svm_writes(f, rnd)
    assert view != primary  # and the page cache holds it
    out = mountctl("checkpoint", sec.path("vm1")).stdout
    assert "checkpoint at seq 0" in out and "took" in out
    try:
        assert os.pread(fd, SIZE, 0) == primary, "the open fd still sees data from before the checkpoint"
        assert mm[:] == primary, "the mapping still sees data from before the checkpoint"
        with open(f, "rb") as r:
            assert r.read() == primary
    finally:
        mm.close()
        os.close(fd)
    st = sec.status("vm1")
    assert st["disks"]["d0"]["active_bytes"] == 0 and st["disks"]["d0"]["hidden_bytes"] == 0
    assert st["last_op"]["op"] == "checkpoint"
    sec.remount()
    with open(f, "rb") as r:
        assert r.read() == primary


def test_checkpoint_writes_back_dirty_pages_before_it(sec, tmp_path):
    """Dirty pages (buffered and mmap, never fsynced, fd still open) land before the checkpoint.

    Were they written back after it, they would land in the new active layer
    and the file would differ from the primary image from then on.
    """
    primary, f = _import(sec, tmp_path)
    img = tmp_path / "primary.raw"
    holder = subprocess.Popen(
        [sys.executable, "-m", "tests.fs.dirty_holder", str(f), "4"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "ready"
        assert sec.status("vm1")["disks"]["d0"]["active_bytes"] < SIZE  # the dirty pages wait in the kernel
        mountctl("checkpoint", sec.path("vm1"))
        holder.stdin.write(f"check {img}\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "fd:ok mmap:ok"
        holder.stdin.write("quit\n")
        holder.stdin.flush()
        assert holder.wait(timeout=30) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=30)
    assert sec.status("vm1")["disks"]["d0"]["active_bytes"] == 0, "pages landed after the checkpoint"
    with open(f, "rb") as r:
        assert r.read() == primary
    sec.remount()
    with open(f, "rb") as r:
        assert r.read() == primary


def test_writes_after_a_checkpoint_are_kept_until_the_next(sec, tmp_path):
    primary, f = _import(sec, tmp_path)
    mountctl("checkpoint", sec.path("vm1"))
    with open(f, "r+b") as w:
        w.seek(3 * MiB)
        w.write(b"after" * 1000)
    expected = bytearray(primary)
    expected[3 * MiB : 3 * MiB + 5000] = b"after" * 1000
    sec.remount()  # buffered, no fsync: the unmount writes it back
    with open(f, "rb") as r:
        assert r.read() == expected
    assert sec.status("vm1")["disks"]["d0"]["active_bytes"] > 0
    mountctl("checkpoint", sec.path("vm1"))
    with open(f, "rb") as r:
        assert r.read() == primary


def test_failover_keeps_svm_writes(sec, tmp_path):
    primary, f = _import(sec, tmp_path)
    rnd = random.Random(3)
    view, fd, mm = _svm_writes(f, rnd)
    mm.close()
    os.close(fd)
    out = mountctl("failover", sec.path("vm1")).stdout
    assert "failover complete" in out and "now primary" in out and "epoch 1 -> 2" in out
    st = sec.status("vm1")
    assert (st["role"], st["phase"], st["epoch"]) == ("primary", "normal", 2)
    assert st["disks"]["d0"]["active_bytes"] == 0
    with open(f, "rb") as r:
        assert r.read() == view
    # Now a primary: writes go to the disk itself, and a checkpoint keeps them.
    with open(f, "r+b") as w:
        w.write(b"primary now")
    view[: len(b"primary now")] = b"primary now"
    mountctl("checkpoint", sec.path("vm1"))
    sec.remount()
    with open(f, "rb") as r:
        assert r.read() == view
    assert sec.status("vm1")["role"] == "primary"


def test_checkpoints_under_concurrent_io_finish(sec, tmp_path):
    """Checkpoints while fio writes buffered, mmap and O_DIRECT: none hangs, the end state is exact.

    fio runs until the test stops it; the test makes ``CHECKPOINTS`` checkpoints, each after the
    SVM has written since the one before (the active layer is not empty), and fio still running
    after each, however fast or slow this host is.
    """
    checkpoints = 5
    primary, f = _import(sec, tmp_path)
    jobs = []
    for engine, direct in (("psync", 0), ("mmap", 0), ("libaio", 1)):
        # runtime only bounds a run whose stop never came; the test stops fio itself
        jobs += [f"--name={engine}{direct}", f"--ioengine={engine}", f"--direct={direct}",
                 "--rw=randrw", "--bsrange=512-256k", "--iodepth=8", "--size=16M", "--time_based",
                 "--runtime=600", f"--filename={f}", "--fallocate=none", "--allow_file_create=0"]
    fio = subprocess.Popen(["fio", "--output-format=terse", *jobs], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)

    def svm_wrote() -> int:
        assert fio.poll() is None, f"fio ended early: {fio.stderr.read() if fio.stderr else ''}"
        return sec.status("vm1/d0")["active_bytes"]

    try:
        for n in range(checkpoints):
            wait_until_sync(svm_wrote, what=f"SVM writes from fio before checkpoint {n + 1}")
            mountctl("checkpoint", sec.path("vm1"), timeout=TIMEOUT)
        assert fio.poll() is None, "fio ended while the checkpoints ran"
        fio.send_signal(signal.SIGINT)  # fio stops its jobs and reports them
        out, err = fio.communicate(timeout=TIMEOUT)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait(timeout=TIMEOUT)
    results = [line.split(";") for line in out.splitlines() if line.startswith("3;")]
    assert [(r[2], r[4]) for r in results] == [("psync0", "0"), ("mmap0", "0"), ("libaio1", "0")], out + err
    mountctl("checkpoint", sec.path("vm1"))
    with open(f, "rb") as r:
        assert r.read() == primary
    result = json.loads(os.getxattr(sec.path("vm1"), "user.colofs.status"))
    assert result["last_op"]["op"] == "checkpoint"


def test_checkpoint_after_the_kernel_evicted_its_entries(pri, tmp_path):
    """A VM-directory request must not look paths up through its own mount.

    The setxattr holds the VM directory's inode lock; once the kernel has
    evicted the disk file's entry (drop_caches), a lookup below that directory
    needs the same lock, so a write-back that opened the file by path would
    hang the request and the daemon.
    """
    mountctl("create", pri.mnt, "vm1/d0", "--size", "16M")
    with open(pri.path("vm1", "d0.raw"), "r+b") as f:
        f.write(b"x" * 65536)
    for i in range(3):
        subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=True, timeout=60)
        res = mountctl("checkpoint", pri.path("vm1"), "--json", timeout=30)
        assert json.loads(res.stdout)["vm"] == "vm1"
        snap = mountctl("snapshot", "--vm", pri.path("vm1"), f"s{i}", timeout=30)
        assert snap.returncode == 0
    assert pri.path("vm1", "d0@s2.raw").read_bytes()[:65536] == b"x" * 65536
