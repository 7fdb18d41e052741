"""A process that leaves dirty pages in the kernel and keeps them there until told.

Closing any descriptor of a FUSE file (also implicitly, when a forked child
execs) makes the kernel write the file's dirty pages back. So the dirty
pages a checkpoint must handle itself are made here, in a process that
forks nothing, and kept open while the test runs ``mountctl checkpoint``.

Protocol on stdin/stdout: prints ``ready``; on ``check PATH`` answers whether
its fd and its mapping now see exactly the image at PATH; on ``quit`` exits.
"""

from __future__ import annotations

import mmap
import os
import random
import sys


def main() -> None:
    path, seed = sys.argv[1], int(sys.argv[2])
    rnd = random.Random(seed)
    size = os.stat(path).st_size
    fd = os.open(path, os.O_RDWR)
    for _ in range(40):
        off = rnd.randrange(0, size - 70000)
        os.pwrite(fd, rnd.randbytes(rnd.randrange(1, 70000)), off)
    mm = mmap.mmap(fd, size)
    mm[size // 2 : size // 2 + 10000] = rnd.randbytes(10000)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "check":
            with open(arg, "rb") as f:
                want = f.read()
            fd_ok = os.pread(fd, size, 0) == want
            mm_ok = mm[:] == want
            print(f"fd:{'ok' if fd_ok else 'differs'} mmap:{'ok' if mm_ok else 'differs'}", flush=True)
        elif cmd == "quit":
            break
    mm.close()
    os.close(fd)


if __name__ == "__main__":
    main()
