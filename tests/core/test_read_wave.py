"""Small reads that miss the page cache while requests queue: all start their device reads before one waits.

The FUSE session reads one queued request per pass of the loop. A read that
misses lets the queued ones be read first (each starting its own device
read) and only then blocks for its data; the reads that miss meanwhile park
until it is done. Here the misses are simulated (``RWF_NOWAIT`` says "would
block" the first time) and the queue is a list a dispatcher takes one
request from per pass, as pyfuse3's session loop does.
"""

from __future__ import annotations

import os

import trio

from colofs.core import ioctx
from colofs.core.ioctx import IOContext

N = 8
BS = 4096


async def test_queued_reads_start_before_the_first_blocks_and_all_get_their_bytes(tmp_path, monkeypatch) -> None:
    path = os.path.join(tmp_path, "f")
    with open(path, "wb") as f:
        for i in range(N):
            f.write(bytes([i + 1]) * BS)
    fd = os.open(path, os.O_RDONLY)
    io = IOContext("auto")
    queue = list(range(N))
    started: list[int] = []
    blocked_after: list[int] = []  # how many reads had started when each blocking read began
    nowait_calls: dict[int, int] = {}
    real_pread = ioctx._pread_full

    def miss_once(self: IOContext, fd: int, buf: memoryview, offset: int) -> int:
        n = nowait_calls.get(offset, 0)
        nowait_calls[offset] = n + 1
        return 0  # the page cache never has it: every read takes the slow path

    def blocking(fd: int, buf: memoryview, offset: int) -> int:
        blocked_after.append(len(started))
        return real_pread(fd, buf, offset)

    monkeypatch.setattr(IOContext, "_read_nowait", miss_once)
    monkeypatch.setattr(ioctx, "_pread_full", blocking)
    io.pending = lambda: bool(queue)
    out = {i: bytearray(BS) for i in range(N)}

    async def request(i: int) -> None:
        started.append(i)
        await io.read_into(fd, memoryview(out[i]), i * BS)

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                while queue:  # one request read per pass, like the FUSE session loop
                    nursery.start_soon(request, queue.pop(0))
                    await trio.lowlevel.checkpoint()
    finally:
        os.close(fd)
        io.close()
    assert all(bytes(out[i]) == bytes([i + 1]) * BS for i in range(N))
    assert len(blocked_after) == N
    # The first read to block did so only once (nearly) every queued request had started its read;
    # a single yield per miss let about two start first.
    assert blocked_after[0] >= N - 1, blocked_after
    assert io.kicked == 0 and not io._followers and not io._leading


async def test_a_queue_that_never_empties_bounds_the_wait(tmp_path, monkeypatch) -> None:
    """Requests keep coming (the probe always says so): the leader stops after LEAD_PASSES passes and wakes the rest."""
    path = os.path.join(tmp_path, "f")
    with open(path, "wb") as f:
        for i in range(4):
            f.write(bytes([i + 1]) * BS)
    fd = os.open(path, os.O_RDONLY)
    io = IOContext("auto")
    probes = []
    io.pending = lambda: probes.append(1) or True
    monkeypatch.setattr(IOContext, "_read_nowait", lambda self, fd, buf, off: 0)
    out = [bytearray(BS) for _ in range(4)]
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(io.read_into, fd, memoryview(out[i]), i * BS)
    finally:
        os.close(fd)
        io.close()
    assert [bytes(b) for b in out] == [bytes([i + 1]) * BS for i in range(4)]
    assert len(probes) <= 4 + ioctx.LEAD_PASSES  # one probe per read's first check, one per leader pass
    assert io.kicked == 0 and not io._followers and not io._leading
