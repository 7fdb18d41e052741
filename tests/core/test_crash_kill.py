"""SIGKILL a process applying a primary stream at random moments; recovery must find the last checkpoint.

After each kill, reopening the store must report a checkpoint sequence at
least as new as the last one the child saw complete, base must equal the
primary's image at exactly that sequence, and the SVM's writes must be gone.
At the end, resuming the stream from the reported sequence must give the
primary's final image.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import trio

from colofs.core import Store
from tests.core.crash_stream import BATCH, CHECKPOINT_EVERY, DISK_SIZE, stream_write

KILLS = 24
ENDLESS = 10**9  # the stream the child is killed in
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class PrimaryImage:
    """The primary's disk at a given seq, rolled forward incrementally (seqs only grow here)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.seq = 0
        self.img = bytearray(DISK_SIZE)

    def at(self, seq: int) -> bytes:
        assert seq >= self.seq
        for s in range(self.seq + 1, seq + 1):
            w = stream_write(self.seed, s)
            self.img[w.offset : w.offset + len(w.data)] = w.data
        self.seq = seq
        return bytes(self.img)


def spawn(path: str, seed: int, last: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.core.crash_stream", path, str(seed), str(last)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


async def reopen_and_check(path: str, image: PrimaryImage, seen_checkpoint: int) -> int:
    store = await Store.open(path, role="secondary")
    try:
        vm = store.vm("vm")
        resume = vm.recovery.resume_seq
        assert resume % CHECKPOINT_EVERY == 0
        assert resume >= seen_checkpoint, (resume, seen_checkpoint)
        assert vm.state.last_applied == resume
        disk = vm.disk("disk0")
        assert len(disk.hidden) == len(disk.active) == 0
        with open(os.path.join(disk.path, "base.raw"), "rb") as f:
            base = f.read()
        assert base == image.at(resume), f"base differs from the primary at seq {resume}"
        assert bytes(await disk.read(0, DISK_SIZE)) == base
        await store.close()
        return resume
    except BaseException:
        store.abandon()
        raise


def test_sigkill_during_stream(tmp_path) -> None:
    path = str(tmp_path / "store")
    seed = 20261125
    rng = random.Random(seed)
    image = PrimaryImage(seed)
    resumes = []
    for _ in range(KILLS):
        child = spawn(path, seed, ENDLESS)
        try:
            assert child.stdout is not None
            started = child.stdout.readline()
            assert started.startswith("start "), started
            # The kill lands after a random number of batches, counted by the stream itself: at
            # least one checkpoint interval, so every kill has seen a new checkpoint first.
            lines = []
            for _ in range(rng.randrange(CHECKPOINT_EVERY // BATCH, 8 * CHECKPOINT_EVERY // BATCH)):
                while not (line := child.stdout.readline()).startswith("batch "):
                    assert line, "the child exited before it was killed"
                    lines.append(line)
            child.send_signal(signal.SIGKILL)
            out, _ = child.communicate(timeout=60)
            lines += out.splitlines()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == -signal.SIGKILL
        seen = max([int(x.split()[1]) for x in lines if x.startswith("checkpoint")], default=0)
        resumes.append(trio.run(reopen_and_check, path, image, seen))
    assert resumes == sorted(set(resumes)), f"a kill did not land after a new checkpoint: {resumes}"
    # Replay the stream from the reported sequence up to a fixed end.
    last = resumes[-1] + 400
    child = spawn(path, seed, last)
    out, _ = child.communicate(timeout=300)
    assert child.returncode == 0 and "done" in out.splitlines()
    assert out.splitlines()[0] == f"start {resumes[-1]}"
    assert trio.run(reopen_and_check, path, image, last) == last
