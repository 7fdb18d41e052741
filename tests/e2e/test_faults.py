"""The mounted pair under network faults and a killed secondary daemon: nothing lost, nothing applied twice."""

from __future__ import annotations

import os
import random
import threading
import time

from tests.e2e.pair import MiB, Pair, direct_pwrite, read_file
from tests.fs.mounts import mountctl
from tests.waiting import wait_until_sync

SIZE = 32 << 20


def _random_write(rng: random.Random, f: os.PathLike[str] | str, fd: int) -> None:
    """A mix of large incompressible, small, and compressible writes, buffered or O_DIRECT."""
    kind = rng.random()
    if kind < 0.4:
        size = rng.choice([256 << 10, MiB])
        data = rng.randbytes(size)
    elif kind < 0.7:
        size = 4096 * rng.randrange(1, 8)
        data = bytes([rng.randrange(256)]) * size
    else:
        size = rng.randrange(1, 20000)
        data = rng.randbytes(size)
    if size % 4096 == 0 and rng.random() < 0.5:
        direct_pwrite(f, 4096 * rng.randrange(0, (SIZE - size) // 4096), data)
    else:
        os.pwrite(fd, data, rng.randrange(0, SIZE - size))


def test_thirty_cuts_by_a_proxy_then_identical_images(pair: Pair) -> None:
    rng = random.Random(4711)
    cutting = [False]
    cut_rng = random.Random(99)

    def budget() -> int | None:
        """Bytes (both ways) a connection may carry: cuts in the handshake, early in the stream,
        and, most often, after a few batches (a batch is up to 4 MiB: larger budgets make progress)."""
        if not cutting[0]:
            return None
        r = cut_rng.random()
        if r < 0.15:
            return cut_rng.randrange(0, 600)
        if r < 0.35:
            return cut_rng.randrange(600, 200_000)
        return cut_rng.randrange(5 << 20, 12 << 20)

    pair.start(budget=budget)
    assert pair.proxy is not None
    mountctl("create", pair.pri.mnt, "vm1/d0", "--size", str(SIZE))
    pair.wait_disk("vm1", "d0", SIZE)
    # The new VM's first (full) sync completes uncut: a secondary asks for a full sync again
    # until a checkpoint follows one, and that costs more than a budget.
    pair.checkpoint()
    cutting[0] = True
    pair.proxy.cut_all()
    f = pair.pfile()
    fd = os.open(f, os.O_RDWR)
    confirmed = failed = rounds = 0
    deadline = time.monotonic() + 600  # bounds a hang only: the loop ends on cuts and checkpoints
    try:
        while (pair.proxy.proxy.cuts < 30 or confirmed < 3) and time.monotonic() < deadline:
            rounds += 1
            for _ in range(rng.randrange(5, 15)):
                _random_write(rng, f, fd)
            if rng.random() < 0.3:  # the SVM writes too; the next checkpoint discards it
                with open(pair.sfile(), "r+b") as s:
                    s.seek(rng.randrange(0, SIZE - 8192))
                    s.write(rng.randbytes(8192))
            if rounds % 3 == 0:
                res = mountctl("checkpoint", "--timeout", "1.5", pair.pri.path("vm1"), check=False, timeout=60)
                if res.returncode == 0:
                    confirmed += 1
                else:
                    assert "checkpoint" in res.stderr, res.stderr
                    failed += 1
    finally:
        os.close(fd)
    cuts = pair.proxy.proxy.cuts
    assert cuts >= 30 and confirmed >= 3, f"{cuts} cuts, {confirmed} checkpoints in {rounds} rounds"
    cutting[0] = False
    res = pair.checkpoint(timeout=60)
    assert res["seq"] == pair.vm_status(pair.pri)["last_applied"]
    assert read_file(pair.sfile()) == read_file(pair.pfile()), f"images differ after {cuts} cuts"
    assert read_file(pair.sfile(), direct=True) == read_file(pair.pfile())
    peer = pair.peer(pair.pri)
    assert peer["state"] == "connected" and peer["connects"] >= 10, peer
    assert "internal error" not in pair.pri.log() + pair.sec.log()
    print(f"{cuts} cuts, {rounds} rounds, {confirmed} checkpoints confirmed, {failed} failed, "
          f"{peer['connects']} connections, {peer['resyncs']} resyncs")


def test_secondary_killed_during_a_stream_recovers_and_catches_up(pair: Pair) -> None:
    rng = random.Random(31337)
    pair.start()
    mountctl("create", pair.pri.mnt, "vm1/d0", "--size", str(SIZE))
    pair.wait_disk("vm1", "d0", SIZE)
    f = pair.pfile()
    fd = os.open(f, os.O_RDWR)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        wrng = random.Random(5)
        try:
            while not stop.is_set():
                _random_write(wrng, f, fd)
        except BaseException as e:
            errors.append(e)

    try:
        for _ in range(30):
            _random_write(rng, f, fd)
        at_checkpoint = pair.checkpoint()
        image = read_file(f)
        thread = threading.Thread(target=writer)
        thread.start()
        try:
            wait_until_sync(lambda: pair.vm_status(pair.pri)["last_applied"] > at_checkpoint["seq"] + 50,
                            what="the stream to go on past the checkpoint")
            # An SVM write after the checkpoint: the crash must drop it too.
            with open(pair.sfile(), "r+b") as s:
                s.write(b"svm write that a crash loses")
            pair.sec.kill9()
            pair.sec.mounted = False
            wait_until_sync(lambda: pair.peer(pair.pri).get("state") != "connected", what="the primary to notice")
            res = pair.sec.mount("--listen", f"127.0.0.1:{pair.port}", "--key-file", str(pair.key))
            assert "detached a stale mount" in res.stderr and "recovered after a crash" in res.stderr
            rec = pair.vm_status(pair.sec)["recovery"]
            assert rec["action"] == "rolled-back" and rec["resume_seq"] == at_checkpoint["seq"], rec
            # The SVM sees the last checkpoint while the primary catches the secondary up underneath.
            assert read_file(pair.sfile()) == image
        finally:
            stop.set()
            thread.join(30)
        assert not errors, f"a primary write failed while the secondary was down: {errors[0]!r}"
    finally:
        os.close(fd)
    res = pair.checkpoint(timeout=60)
    assert res["seq"] > at_checkpoint["seq"]
    assert read_file(pair.sfile()) == read_file(f)
    log = pair.sec.log()
    assert "recovered after a crash" in log and "attached by primary" in log


def test_primary_remount_keeps_its_dirty_map(pair: Pair) -> None:
    """A clean unmount of the primary saves what the secondary lacks; the next mount needs no full sync."""
    rng = random.Random(8)
    pair.start()
    mountctl("create", pair.pri.mnt, "vm1/d0", "--size", str(SIZE))
    pair.wait_disk("vm1", "d0", SIZE)
    f = pair.pfile()
    fd = os.open(f, os.O_RDWR)
    try:
        for _ in range(20):
            _random_write(rng, f, fd)
        pair.checkpoint()
        pair.sec.umount()  # the secondary misses what follows
        for _ in range(20):
            _random_write(rng, f, fd)
    finally:
        os.close(fd)
    image = read_file(f)
    pair.pri.umount()
    assert "unmounted: stopping replication" in pair.pri.log()
    pair.mount_secondary()
    pair.mount_primary()
    assert "replication state loaded" in pair.pri.log()
    pair.checkpoint()
    assert read_file(pair.sfile()) == read_file(f) == image
    peer = pair.peer(pair.pri)
    assert peer["full_syncs"] == 0 and peer["resyncs"] == 1 and not peer["resync"]["full"], peer
