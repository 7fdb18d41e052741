"""kill -9 of the daemon during writes: the stale mount is cleaned up and the store recovered."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys

import pytest

from tests.fs.conftest import random_image
from tests.fs.mounts import mountctl

MiB = 1 << 20
SIZE = 16 * MiB

# Writes fresh 64 KiB slots with O_DIRECT + fdatasync and logs each slot once fdatasync returned,
# in the log file and as a line on stdout (which the test reads to place its kill).
WRITER = r"""
import mmap, os, random, sys
path, log_path = sys.argv[1], sys.argv[2]
rnd = random.Random(int(sys.argv[3]))
slots = list(range(int(sys.argv[4])))
rnd.shuffle(slots)
buf = mmap.mmap(-1, 65536)
fd = os.open(path, os.O_RDWR | os.O_DIRECT)
log = open(log_path, "a", buffering=1)
for slot in slots:
    seed = rnd.randrange(1 << 30)
    buf[:] = random.Random(seed).randbytes(65536)
    try:
        os.pwrite(fd, buf, slot * 65536)
        os.fdatasync(fd)
    except OSError:
        break
    log.write(f"{slot} {seed}\n")
    print("acked", flush=True)
"""

# Keeps writing buffered random data until killed; after every 16 writes it syncs them to the
# daemon and says so on stdout (the test kills the daemon once enough reached it).
SCRIBBLER = r"""
import os, random, sys
fd = os.open(sys.argv[1], os.O_RDWR)
size = os.fstat(fd).st_size
rnd = random.Random(1)
print("started", flush=True)
n = 0
while True:
    try:
        os.pwrite(fd, rnd.randbytes(65536), rnd.randrange(0, size - 65536))
        n += 1
        if n % 16 == 0:
            os.fdatasync(fd)
            print("synced", flush=True)
    except OSError:
        break
"""


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_secondary_kill9_rolls_back_to_the_last_checkpoint(sec, tmp_path):
    img = tmp_path / "primary.raw"
    primary = random_image(img, SIZE, seed=21)
    mountctl("import", sec.mnt, "vm1/d0", "--from", img)
    f = sec.path("vm1", "d0.raw")
    with open(f, "r+b") as w:
        w.write(b"before the checkpoint" * 100)
        os.fsync(w.fileno())
    mountctl("checkpoint", sec.path("vm1"))
    scribbler = subprocess.Popen([sys.executable, "-c", SCRIBBLER, str(f)], stdout=subprocess.PIPE, text=True)
    try:
        assert scribbler.stdout is not None and scribbler.stdout.readline().strip() == "started"
        for _ in range(4):  # the daemon holds 64 SVM writes since the checkpoint, and more arrive
            assert scribbler.stdout.readline().strip() == "synced", "the scribbler stopped"
        sec.kill9()
    finally:
        _kill(scribbler)
    # The mount is stale: an open needs the dead daemon (a stat may still be answered from the
    # attributes the kernel caches).
    with pytest.raises(OSError) as e:
        os.open(f, os.O_RDONLY)
    assert e.value.errno == errno.ENOTCONN
    res = sec.mount()
    assert "detached a stale mount" in res.stderr
    assert "recovered after a crash" in res.stderr
    with open(f, "rb") as r:
        assert r.read() == primary
    st = sec.status("vm1")
    assert st["recovery"]["action"] == "rolled-back"
    assert st["disks"]["d0"]["active_bytes"] == 0


def test_primary_kill9_keeps_every_synced_write(pri, tmp_path):
    mountctl("create", pri.mnt, "vm1/d0", "--size", "16M")
    f = pri.path("vm1", "d0.raw")
    log_path = tmp_path / "acked.log"
    nslots = SIZE // 65536
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(f), str(log_path), "9", str(nslots)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None
        for _ in range(20):  # the kill follows the 20th acknowledged write at once, without a poll
            assert writer.stdout.readline().strip() == "acked", "the writer stopped"
        pri.kill9()
    finally:
        _kill(writer)
    acked = [tuple(map(int, line.split())) for line in log_path.read_text().splitlines() if line.strip()]
    assert 20 <= len(acked) < nslots, "the kill did not land in the middle of the writes"
    pri.mount()
    with open(f, "rb") as r:
        for slot, seed in acked:
            r.seek(slot * 65536)
            assert r.read(65536) == random.Random(seed).randbytes(65536), f"slot {slot} lost"
    assert pri.status("vm1")["role"] == "primary"


def test_stale_mount_is_reported_and_umount_cleans_it_up(sec):
    mountctl("create", sec.mnt, "vm1/d0", "--size", "1M")
    sec.kill9()
    res = mountctl("status", sec.mnt, check=False)
    assert res.returncode == 1 and "stale colofs mount" in res.stderr
    res = mountctl("umount", sec.mnt)
    assert "stale mount" in res.stdout and "recovers it" in res.stdout
    sec.mounted = False
    assert not os.path.ismount(sec.mnt)
    sec.mount()
    assert os.stat(sec.path("vm1", "d0.raw")).st_size == 1 * MiB
