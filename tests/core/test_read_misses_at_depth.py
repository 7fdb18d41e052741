"""A small read that misses the page cache while other requests wait stays on the loop, whatever the policy says.

Its device read is already started by the ``RWF_NOWAIT`` attempt, the yield
lets the queued requests start theirs, and the wait that follows overlaps
them all; a worker-pool hop per miss costs more CPU than that wait (thread
wake-ups and GIL hand-offs). Lone reads still follow the policy.
"""

from __future__ import annotations

import os

from colofs.core.ioctx import SLOW_READ_NS, IOContext

BLOCK = 4096


def _uncached_file(path: str, blocks: int) -> int:
    """A file of distinct blocks, written, synced and dropped from the page cache; its descriptor."""
    with open(path, "wb") as f:
        for i in range(blocks):
            f.write(bytes([i + 1]) * BLOCK)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return fd


def _slow_device_policy(io: IOContext) -> None:
    """The policy as it stands after waits of a busy device: small reads sent to the pool."""
    for _ in range(200):
        io.reads.record(2 * SLOW_READ_NS)
    assert not io.reads.inline


async def test_a_miss_with_requests_queued_is_served_on_the_loop(tmp_path) -> None:
    io = IOContext()
    fd = _uncached_file(str(tmp_path / "f"), 8)
    try:
        _slow_device_policy(io)
        io.pending = lambda: True  # the kernel holds more requests
        for b in (5, 2, 7):
            buf = bytearray(BLOCK)
            await io.read_into(fd, memoryview(buf), b * BLOCK)
            assert buf == bytes([b + 1]) * BLOCK
        assert io.pool._threads == []  # no read went through a worker thread
    finally:
        os.close(fd)
        io.close()


async def test_a_lone_miss_still_follows_the_policy(tmp_path) -> None:
    io = IOContext()
    fd = _uncached_file(str(tmp_path / "f"), 4)
    try:
        _slow_device_policy(io)
        io.pending = lambda: False  # nothing else waits
        buf = bytearray(BLOCK)
        await io.read_into(fd, memoryview(buf), 3 * BLOCK)
        assert buf == bytes([4]) * BLOCK
        assert len(io.pool._threads) == 1  # the slow device's lone read went to the pool
    finally:
        os.close(fd)
        io.close()
