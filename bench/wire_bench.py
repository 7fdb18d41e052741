#!/usr/bin/env python3
"""Micro-benchmark of the colofs wire codec: frames/s and MB/s, with and without the frame MAC.

Encode = ``encode_frame_parts`` (payload build, lz4, xxh3 digest) plus, keyed,
the MAC (``FrameMac.absorb`` over the payload, ``seal`` with the counter);
decode = ``FrameDecoder`` fed in 64 KiB pieces, as ``FrameStream.receive``
does (buffering, MAC, digest, lz4, message decode with one copy of each
write's data).  MB/s is write data (not wire bytes) per second; frames/s is
whole frames encoded and decoded per second; medians of ``--repeat``.

    .venv/bin/python bench/wire_bench.py [--batch-mib 4] [--write-kib 4] [--repeat 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

from colofs.wire import Ack, Batch, FrameDecoder, Message, Write, encode_frame_parts

try:  # the MAC arrived with protocol 2; without it only the keyless rows are measured
    from colofs.wire.mac import FrameMac
except ImportError:  # pragma: no cover - benchmarking an older tree
    FrameMac = None  # type: ignore[assignment,misc]

CHUNK = 64 * 1024
SESSION_KEY = bytes(range(32))


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


class Codec:
    """One direction of a connection: the sender's encoding and the receiver's decoder."""

    def __init__(self, keyed: bool) -> None:
        self.keyed = keyed
        self.send_mac = FrameMac(SESSION_KEY) if keyed else None
        self.decoder = FrameDecoder()
        if keyed:
            self.decoder.require_mac(FrameMac(SESSION_KEY))

    def encode(self, msg: Message, compress: bool) -> tuple[bytes, bytes, bytes]:
        if self.send_mac is None:
            header, payload = encode_frame_parts(msg, compress)
            return header, payload, b""
        header, payload = encode_frame_parts(msg, compress, mac=True)
        return header, payload, self.send_mac.seal(self.send_mac.absorb(payload), header)

    def decode(self, frame: tuple[bytes, bytes, bytes]) -> object:
        header, payload, tag = frame
        decoder = self.decoder
        decoder.feed(header)
        view = memoryview(payload)
        for i in range(0, len(payload), CHUNK):
            decoder.feed(view[i : i + CHUNK])
        if tag:
            decoder.feed(tag)
        return decoder.next_message()


def timed(fn: Callable[[], object], repeat: int, inner: int = 1) -> float:
    """Median seconds of one call of ``fn``, timing ``inner`` calls per sample."""
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def measure(msg: Message, data_bytes: int, compress: bool, keyed: bool, repeat: int,
            inner: int) -> tuple[float, float, float, int, int, bool]:
    """(encode s, decode s, frames/s, raw payload, wire payload, lz4 used) for one frame shape."""
    # Encode and decode share one counter sequence: each decode gets the next frame encoded.
    codec = Codec(keyed)
    frames: list[tuple[bytes, bytes, bytes]] = []
    enc = timed(lambda: frames.append(codec.encode(msg, compress)), repeat, inner)
    it = iter(frames)
    dec = timed(lambda: codec.decode(next(it)), repeat, inner)
    header, payload, _ = frames[0]
    first = Codec(keyed)
    assert first.decode(first.encode(msg, compress)) == msg
    raw_len = int.from_bytes(header[12:16], "little")
    return enc, dec, 1 / (enc + dec), raw_len, len(payload), bool(header[6] & 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-mib", type=float, default=4.0)
    parser.add_argument("--write-kib", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    size = int(args.batch_mib * 1024 * 1024)
    write_size = int(args.write_kib * 1024)
    modes = [False, True] if FrameMac is not None else [False]

    print(
        f"BATCH of {size / 2**20:g} MiB in {size // write_size} writes of {write_size} bytes; "
        f"small frames: one {write_size}-byte write, ACK; median of {args.repeat}"
    )
    print(
        f"{'frame':<18} {'mac':>4} {'lz4':>5} {'ratio':>6} {'encode MB/s':>12} "
        f"{'decode MB/s':>12} {'frames/s':>10}"
    )
    shapes: list[tuple[str, Message, int, bool, int]] = []
    for name, make in (("random", random_data), ("zero-heavy", zero_heavy_data)):
        batch = make_batch(make(size), write_size)
        for compress in (True, False):
            shapes.append((f"{name} 4M", batch, size, compress, 1))
    small = Batch(1, (Write(0, 0, os.urandom(write_size)),))
    shapes.append((f"random {write_size // 1024}K", small, write_size, True, 200))
    shapes.append(("ACK", Ack(12345), 0, False, 2000))
    for label, msg, data_bytes, compress, inner in shapes:
        for keyed in modes:
            enc, dec, fps, raw_len, wire_len, used = measure(msg, data_bytes, compress, keyed,
                                                            args.repeat, inner)
            lz4 = ("yes" if used else "no") if compress else "off"
            enc_mb = f"{data_bytes / enc / 1e6:.0f}" if data_bytes else "-"
            dec_mb = f"{data_bytes / dec / 1e6:.0f}" if data_bytes else "-"
            print(
                f"{label:<18} {'on' if keyed else 'off':>4} {lz4:>5} "
                f"{raw_len / max(wire_len, 1):>6.2f} {enc_mb:>12} {dec_mb:>12} {fps:>10.0f}"
            )


if __name__ == "__main__":
    main()
