"""The pyfuse3 that ``make deps`` installed: patched unless the fallback was asked for, and its loop serves requests.

``patches/pyfuse3/build.sh`` builds pyfuse3 with a session loop that reads
/dev/fuse without waiting when a request is queued already. These tests check
that the installed module is that build (or stock, when COLOFS_STOCK_PYFUSE3
asked for it) and run the pyfuse3 floor (``bench/floor_fs.py``) under many
concurrent requests, with syncs that suspend their handler, to check that every
request is served with the right data and the mount ends cleanly.
"""

from __future__ import annotations

import mmap
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest

from tests.waiting import wait_until_sync

REPO = Path(__file__).resolve().parent.parent
FLOOR = REPO / "bench" / "floor_fs.py"
BLOCK = 4096
BLOCKS = 1024  # a 4 MiB disk
THREADS = 16  # as many requests in flight as the qd16 benchmark rows


def test_installed_pyfuse3_is_the_patched_build() -> None:
    patched = getattr(pyfuse3, "NONBLOCKING_SESSION_LOOP", False)
    if os.environ.get("COLOFS_STOCK_PYFUSE3"):
        assert not patched, "COLOFS_STOCK_PYFUSE3 is set but the installed pyfuse3 is the patched build"
    else:
        assert patched, "pyfuse3 is stock: make deps could not build patches/pyfuse3 (see its output)"


def _mounted(mnt: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(mnt) for line in f)


@pytest.fixture
def floor(tmp_path: Path) -> Iterator[Path]:
    """The floor over a zeroed 4 MiB file; yields its ``disk.raw``. Stopped by its PID and unmounted even on failure."""
    if os.geteuid() != 0:
        pytest.skip("mounting FUSE needs root")
    src, mnt = tmp_path / "disk.src", tmp_path / "mnt"
    src.write_bytes(bytes(BLOCK * BLOCKS))
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, str(FLOOR), str(src), str(mnt)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield mnt / "disk.raw"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        wait_until_sync(lambda: not _mounted(mnt), what=f"{mnt} to be unmounted")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if _mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def _pattern(block: int, round_: int) -> bytes:
    return (f"{block:06d}:{round_:04d}:".encode() * (BLOCK // 12 + 1))[:BLOCK]


def test_loop_serves_many_requests_in_flight(floor: Path) -> None:
    """16 threads of O_DIRECT 4K writes, reads and fsyncs: every block reads back what was last written to it."""
    rounds = 40
    errors: list[BaseException] = []
    written: dict[int, bytes] = {}
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        fd = os.open(floor, os.O_RDWR | os.O_DIRECT)
        buf = mmap.mmap(-1, BLOCK)  # O_DIRECT wants an aligned buffer
        try:
            for r in range(rounds):
                block = seed + THREADS * rng.randrange(BLOCKS // THREADS)  # each thread owns its blocks
                data = _pattern(block, r)
                buf[:] = data
                assert os.pwritev(fd, [buf], block * BLOCK) == BLOCK
                with lock:
                    written[block] = data
                if r % 10 == 9:
                    os.fsync(fd)  # the floor's fsync awaits a thread: its task suspends, others keep serving
                other = rng.randrange(BLOCKS)
                assert os.preadv(fd, [buf], other * BLOCK) == BLOCK
                assert os.preadv(fd, [buf], block * BLOCK) == BLOCK
                assert bytes(buf) == data
        except BaseException as e:  # reported by the main thread
            errors.append(e)
        finally:
            buf.close()
            os.close(fd)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "requests stopped being served"
    assert not errors, errors[0]
    with open(floor, "rb") as f:
        disk = f.read()
    for block, data in written.items():
        assert disk[block * BLOCK:(block + 1) * BLOCK] == data
    untouched = set(range(BLOCKS)) - set(written)
    assert all(disk[b * BLOCK:(b + 1) * BLOCK] == bytes(BLOCK) for b in untouched)
