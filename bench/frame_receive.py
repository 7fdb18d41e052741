#!/usr/bin/env python3
"""CPU of receiving and decoding BATCH frames over a socket, trees alternated in one run.

What ``FrameStream.receive`` costs the secondary per MiB of write data,
without the apply: a forked child writes pre-encoded frames into one end of
a Unix socket pair (blocking ``sendall``, as fast as the reader takes them),
this process receives and decodes them with the colofs of ``--tree`` (each
tree measured in its own subprocess with ``PYTHONPATH=TREE``, the trees
alternated every repetition so load from elsewhere falls on each alike).
Printed per tree: the receiving process's CPU ms per MiB of write data
(``time.process_time``: user + system, the kernel's copy out of the socket
included), median [min-max] over ``--reps``. ``--incompressible`` sends
random data (no lz4), where the receive's copies are the larger share.

    .venv/bin/python bench/frame_receive.py --tree /tmp/a --tree /tmp/b [--mib 512] [--reps 7]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time

MiB = 1 << 20


def measure(mib: int, writes: int, size: int, incompressible: bool) -> dict[str, float]:
    """Receive ``mib`` MiB of write data in batches of ``writes`` writes of ``size`` bytes; CPU per MiB."""
    import trio

    from colofs.wire import Batch, FrameStream, Write, encode_frame

    rng = random.Random(5)
    half = rng.randbytes(size // 2)

    def data() -> bytes:
        return rng.randbytes(size) if incompressible else rng.randbytes(size // 2) + half

    frames = [encode_frame(Batch(1 + k * writes, tuple(
        Write(0, (k * writes + i) * size, data()) for i in range(writes))))
        for k in range(8)]  # about half compressible, as fio's --buffer_compress_percentage=50
    per_frame = writes * size
    count = max(1, mib * MiB // per_frame)
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the writer
        a.close()
        try:
            for k in range(count):
                b.sendall(frames[k % len(frames)])
            b.shutdown(socket.SHUT_WR)
        finally:
            os._exit(0)
    b.close()

    async def receive() -> tuple[float, float, int]:
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(a))
        fs = FrameStream(stream)
        got = 0
        c0, t0 = time.process_time(), time.perf_counter()
        async for msg in fs:
            got += msg.data_bytes  # type: ignore[attr-defined]
        return time.process_time() - c0, time.perf_counter() - t0, got

    cpu, wall, got = trio.run(receive)
    os.waitpid(pid, 0)
    assert got == count * per_frame
    return {"cpu_ms_mib": cpu / (got / MiB) * 1e3, "mb_s": got / wall / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", action="append", required=True, help="a colofs source tree (repeat)")
    ap.add_argument("--mib", type=int, default=512, help="MiB of write data per measurement")
    ap.add_argument("--writes", type=int, default=256, help="writes per batch (default 256: 1 MiB of 4 KiB)")
    ap.add_argument("--write-size", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--incompressible", action="store_true", help="random data (lz4 is skipped by the encoder)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(a.mib, a.writes, a.write_size, a.incompressible)), flush=True)
        return
    results: dict[str, list[dict[str, float]]] = {t: [] for t in a.tree}
    for rep in range(a.reps):
        for k in range(len(a.tree)):
            tree = a.tree[(rep + k) % len(a.tree)]
            env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--tree", tree, "--child",
                                  "--mib", str(a.mib), "--writes", str(a.writes), "--write-size", str(a.write_size)]
                                 + (["--incompressible"] if a.incompressible else []),
                                 env=env, cwd=tree, check=True, capture_output=True, text=True).stdout
            r = json.loads(out)
            results[tree].append(r)
            print(f"rep {rep} {tree}: {r['cpu_ms_mib']:.3f} ms CPU/MiB, {r['mb_s']:.0f} MB/s", flush=True)
    print(f"\nmedian [min-max] of {a.reps}, {a.mib} MiB each, load {os.getloadavg()[0]:.1f}")
    for tree, rows in results.items():
        v = [r["cpu_ms_mib"] for r in rows]
        print(f"{tree}: {statistics.median(v):.3f} [{min(v):.3f}-{max(v):.3f}] ms CPU/MiB")


if __name__ == "__main__":
    main()
