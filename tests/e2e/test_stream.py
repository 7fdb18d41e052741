"""A mounted pair against the model: isolation between checkpoints, identical images at each, failover.

Primary writes go through the primary's mounted file (buffered and O_DIRECT
``pwrite``, and ``qemu-io``); the secondary VM writes through the secondary's
mounted file. ``tests/core/model.py`` says what the SVM must see at every
step (docs/design.md invariants 1-4).
"""

from __future__ import annotations

import os
import random

from tests.core.model import ModelDisk
from tests.e2e.pair import Pair, direct_pwrite, read_file
from tests.fs.mounts import mountctl, run
from tests.waiting import wait_until_sync

SIZE = 16 << 20
BS = 4096


def _primary_writes(pair: Pair, model: ModelDisk, rng: random.Random, n: int) -> None:
    """``n`` writes to the primary's file, each by one of the three ways a VM could write."""
    f = pair.pfile()
    fd = os.open(f, os.O_RDWR)
    qemu: list[str] = []
    later: list[tuple[int, bytes]] = []
    try:
        for _ in range(n):
            how = rng.choice(["buffered", "direct", "qemu-io"])
            if how == "buffered":
                size = rng.choice([1, 100, 4096, 5000, 65536, 300_000])
                off = rng.randrange(0, SIZE - size)
                data = rng.randbytes(size)
                os.pwrite(fd, data, off)
            elif how == "direct":
                size = BS * rng.choice([1, 2, 16, 256])
                off = BS * rng.randrange(0, (SIZE - size) // BS)
                data = rng.randbytes(size)
                direct_pwrite(f, off, data)
            else:
                size = 512 * rng.choice([1, 8, 100, 2048])
                off = 512 * rng.randrange(0, (SIZE - size) // 512)
                pattern = rng.randrange(1, 256)
                qemu += ["-c", f"write -P {pattern} {off} {size}"]
                later.append((off, bytes([pattern]) * size))
                continue
            model.primary_write(off, data)
    finally:
        os.close(fd)
    if qemu:  # one qemu-io run for the round, after the pwrites: the model takes them in that order
        cache = ["-n"] if rng.random() < 0.5 else []  # -n: O_DIRECT, like cache=none
        run("qemu-io", "-f", "raw", *cache, *qemu, f)
        for off, data in later:
            model.primary_write(off, data)


def _svm_writes(pair: Pair, model: ModelDisk, rng: random.Random, n: int) -> None:
    f = pair.sfile()
    fd = os.open(f, os.O_RDWR)
    try:
        for _ in range(n):
            if rng.random() < 0.5:
                size = rng.choice([1, 512, 4096, 9000, 131072])
                off = rng.randrange(0, SIZE - size)
                data = rng.randbytes(size)
                os.pwrite(fd, data, off)
            else:
                size = BS * rng.choice([1, 4, 32])
                off = BS * rng.randrange(0, (SIZE - size) // BS)
                data = rng.randbytes(size)
                direct_pwrite(f, off, data)
            model.svm_write(off, data)
    finally:
        os.close(fd)


def _assert_svm_sees(pair: Pair, want: bytes, when: str) -> None:
    f = pair.sfile()
    assert read_file(f) == want, f"{when}: the SVM's file (page cache) differs from the model"
    assert read_file(f, direct=True) == want, f"{when}: the SVM's file (O_DIRECT) differs from the model"


def test_stream_checkpoints_isolation_and_failover(pair: Pair) -> None:
    rng = random.Random(20240611)
    pair.start()
    mountctl("create", pair.pri.mnt, "vm1/d0", "--size", str(SIZE))
    pair.wait_disk("vm1", "d0", SIZE)
    model = ModelDisk(SIZE, BS)
    seqs = []
    for rnd in range(5):
        _primary_writes(pair, model, rng, 30)
        _svm_writes(pair, model, rng, 10)
        # Isolation: however much of the stream arrived, the SVM sees the last checkpoint and its own writes.
        _assert_svm_sees(pair, model.view(), f"round {rnd}, before the checkpoint")
        _primary_writes(pair, model, rng, 10)
        _svm_writes(pair, model, rng, 5)
        res = pair.checkpoint()
        assert res["replicated"] and res["seq"] > (seqs[-1] if seqs else 0)
        seqs.append(res["seq"])
        model.checkpoint()
        pimg = read_file(pair.pfile())
        assert pimg == bytes(model.P), f"round {rnd}: the primary's file differs from what was written"
        _assert_svm_sees(pair, pimg, f"round {rnd}, after checkpoint seq {res['seq']}")
        st = pair.vm_status(pair.sec)
        assert st["last_checkpoint"] == res["seq"]
        assert all(d["hidden_bytes"] == d["active_bytes"] == 0 for d in st["disks"].values())

    peer = pair.peer(pair.pri)
    assert peer["state"] == "connected" and peer["acked_seq"] >= seqs[-1]
    assert peer["lz4_ratio"] is not None and peer["confirmed_checkpoint"] == seqs[-1]
    assert "peer:connected" in mountctl("status", pair.pri.mnt, "vm1").stdout

    # Uncheckpointed writes on both sides, then the primary is declared lost and the SVM takes over.
    _primary_writes(pair, model, rng, 20)
    _svm_writes(pair, model, rng, 10)
    pair.wait_caught_up()
    out = mountctl("failover", pair.sec.path("vm1")).stdout
    assert "failover complete" in out and "now primary" in out and "closed the session of primary" in out
    model.failover()
    _assert_svm_sees(pair, model.view(), "after the failover")

    # The old primary is refused from now on, and says so; its writes never reach the new primary.
    wait_until_sync(lambda: pair.peer(pair.pri).get("state") == "refused", what="the old primary to be refused")
    assert "failed over" in pair.peer(pair.pri)["reason"]
    _primary_writes(pair, ModelDisk(SIZE, BS), rng, 10)
    assert pair.vm_status(pair.sec)["role"] == "primary"
    assert pair.peer(pair.sec)["state"] == "failed over"
    slog, plog = pair.sec.log(), pair.pri.log()
    assert "closing the session of primary" in slog and "primary writes are refused from now on" in slog
    wait_until_sync(lambda: "refusing primary" in pair.sec.log(), what="a refused attach in the secondary's log")
    assert "fails over to node" in plog and "has failed over to this node" in pair.pri.log()
    _assert_svm_sees(pair, model.view(), "after the old primary tried again")
    fail = mountctl("checkpoint", "--timeout", "1", pair.pri.path("vm1"), check=False)
    assert fail.returncode == 1 and "checkpoint could not start within 1 s" in fail.stderr
