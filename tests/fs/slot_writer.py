"""A writer that logs each write before it starts and after it completed, so tests know what a snapshot must hold.

Usage: ``python -m tests.fs.slot_writer FILE LOG SEED FIRST NSLOTS [GO STOP]``.

Phase 1 writes each 64 KiB slot ``FIRST .. FIRST+NSLOTS-1`` once, in a
shuffled order, with O_DIRECT (one FUSE request each, so a snapshot holds
either all of a slot's new content or none of it), logging ``S slot`` before
and ``D slot`` after the ``pwrite``. A snapshot therefore holds every slot
logged ``D`` before it was requested and no slot logged ``S`` only after it
returned; the content of slot ``n`` is :func:`slot_data`.

Without ``GO``/``STOP`` the writer exits after phase 1. With them it waits
for the file ``GO``, then scribbles random data (O_DIRECT and buffered) all
over the disk until the file ``STOP`` appears: the disk keeps changing while
the test reads the snapshot.
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


def main() -> None:
    path, log_path, seed, first, nslots = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    go, stop = (sys.argv[6], sys.argv[7]) if len(sys.argv) > 7 else (None, None)
    slots = list(range(first, first + nslots))
    random.Random(seed).shuffle(slots)
    buf = mmap.mmap(-1, SLOT)  # page-aligned, as O_DIRECT wants
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    with open(log_path, "a", buffering=1) as log:
        for slot in slots:
            buf[:] = slot_data(seed, slot)
            log.write(f"S {slot}\n")
            os.pwrite(fd, buf, slot * SLOT)
            log.write(f"D {slot}\n")
            time.sleep(0.005)  # leaves the test time to act while slots remain, even on a busy host
        log.write("phase1 done\n")
    if go is None or stop is None:
        os.close(fd)
        return
    while not os.path.exists(go):
        time.sleep(0.005)
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
