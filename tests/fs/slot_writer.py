"""A writer that logs each write before it starts and after it completed, so tests know what a snapshot must hold.

Usage: ``python -m tests.fs.slot_writer FILE LOG SEED FIRST NSLOTS [STOP]``.

Phase 1 writes each 64 KiB slot ``FIRST .. FIRST+NSLOTS-1`` once, in a
shuffled order, with O_DIRECT (one FUSE request each, so a snapshot holds
either all of a slot's new content or none of it), logging ``S slot`` before
and ``D slot`` after the ``pwrite``. A snapshot therefore holds every slot
logged ``D`` before it was requested and no slot logged ``S`` only after it
returned; the content of slot ``n`` is :func:`slot_data`.

Without ``STOP`` the writer runs phase 1 at its own pace and exits. With it the
test drives it through stdin: each byte ``+`` lets it write one more slot (so
the test knows at most how many slots can have started by any point, on any
host), then a ``g`` starts phase 2, which scribbles random data (O_DIRECT and
buffered) all over the disk until the file ``STOP`` appears: the disk keeps
changing while the test reads the snapshot.
"""

from __future__ import annotations

import mmap
import os
import random
import sys
import time

SLOT = 65536


def slot_data(seed: int, slot: int) -> bytes:
    return random.Random(seed * 100_003 + slot).randbytes(SLOT)


def _expect(what: bytes) -> None:
    """Block until the test sends ``what`` on stdin (the test's go-ahead)."""
    got = sys.stdin.buffer.read(1)
    if got != what:
        raise SystemExit(f"slot_writer: expected {what!r} on stdin, got {got!r}")


def main() -> None:
    path, log_path, seed, first, nslots = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    stop = sys.argv[6] if len(sys.argv) > 6 else None
    slots = list(range(first, first + nslots))
    random.Random(seed).shuffle(slots)
    buf = mmap.mmap(-1, SLOT)  # page-aligned, as O_DIRECT wants
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    with open(log_path, "a", buffering=1) as log:
        for slot in slots:
            if stop is not None:
                _expect(b"+")
            buf[:] = slot_data(seed, slot)
            log.write(f"S {slot}\n")
            os.pwrite(fd, buf, slot * SLOT)
            log.write(f"D {slot}\n")
            if stop is None:
                time.sleep(0.005)  # paces the workload: spreads the slots over the test's other I/O
        log.write("phase1 done\n")
    if stop is None:
        os.close(fd)
        return
    _expect(b"g")
    size = os.fstat(fd).st_size
    rnd = random.Random(seed + 1)
    bfd = os.open(path, os.O_RDWR)
    while not os.path.exists(stop):
        off = rnd.randrange(0, size // SLOT) * SLOT
        buf[:] = rnd.randbytes(SLOT)
        os.pwrite(fd, buf, off)
        os.pwrite(bfd, rnd.randbytes(rnd.randrange(1, 20000)), rnd.randrange(0, size - 20000))
    os.close(bfd)
    os.close(fd)


if __name__ == "__main__":
    main()
