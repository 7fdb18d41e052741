#!/usr/bin/env python3
"""Micro-benchmark of the colofs wire codec: BATCH encode/decode throughput and lz4 ratio.

Encode = ``encode_frame_parts`` (payload build, lz4, xxh3 digest); decode =
``FrameDecoder`` fed in 64 KiB pieces, as ``FrameStream.receive`` does
(buffering, digest, lz4, message decode with one copy of each write's data).
Throughput is write data (not wire bytes) per second, median of ``--repeat``.

    .venv/bin/python bench/wire_bench.py [--batch-mib 4] [--write-kib 4] [--repeat 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

from colofs.wire import Batch, FrameDecoder, Write, encode_frame_parts

CHUNK = 64 * 1024


def random_data(n: int) -> bytes:
    return os.urandom(n)


def zero_heavy_data(n: int, block: int = 4096) -> bytes:
    """Mostly-zero blocks with a random tail (~1/8 of each block): typical fresh guest disks."""
    live = block // 8
    one = bytes(block - live)
    return b"".join(one + os.urandom(live) for _ in range(n // block))[:n]


def make_batch(data: bytes, write_size: int) -> Batch:
    writes = [
        Write(0, off, data[off : off + write_size]) for off in range(0, len(data), write_size)
    ]
    return Batch(1, writes)


def decode(header: bytes, payload: bytes) -> object:
    decoder = FrameDecoder()
    decoder.feed(header)
    view = memoryview(payload)
    for i in range(0, len(payload), CHUNK):
        decoder.feed(view[i : i + CHUNK])
    return decoder.next_message()


def timed(fn: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-mib", type=float, default=4.0)
    parser.add_argument("--write-kib", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    size = int(args.batch_mib * 1024 * 1024)
    write_size = int(args.write_kib * 1024)

    print(
        f"BATCH of {size / 2**20:g} MiB in {size // write_size} writes of "
        f"{write_size} bytes, median of {args.repeat}"
    )
    print(
        f"{'data':<11} {'lz4':>5} {'ratio':>6} {'wire MiB':>9} {'encode MB/s':>12} "
        f"{'decode MB/s':>12} {'enc+dec ms':>11}"
    )
    for name, make in (("random", random_data), ("zero-heavy", zero_heavy_data)):
        batch = make_batch(make(size), write_size)
        for compress in (True, False):
            header, payload = encode_frame_parts(batch, compress)
            assert decode(header, payload) == batch
            raw_len = int.from_bytes(header[12:16], "little")
            enc = timed(lambda b=batch, c=compress: encode_frame_parts(b, c), args.repeat)
            dec = timed(lambda h=header, p=payload: decode(h, p), args.repeat)
            used = "yes" if header[6] & 1 else "no"
            print(
                f"{name:<11} {used if compress else 'off':>5} {raw_len / len(payload):>6.2f} "
                f"{len(payload) / 2**20:>9.2f} {size / enc / 1e6:>12.0f} "
                f"{size / dec / 1e6:>12.0f} {(enc + dec) * 1e3:>11.1f}"
            )


if __name__ == "__main__":
    main()
