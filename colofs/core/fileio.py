"""File I/O policy: page-cache hits run on the trio loop, everything that can wait goes to a thread.

Measured on the target machine (bench/core_bench.py prints it again): a 4 KiB
``preadv`` that hits the page cache costs ~4 µs on the loop, while a
``trio.to_thread`` round trip costs ~100 µs. So reads first try
``RWF_NOWAIT`` on the loop and fall back to a worker thread only for the part
the kernel would have to fetch from the device. Buffered writes land in the
page cache (ext4 does not support ``RWF_NOWAIT`` writes) and stay on the loop;
``fdatasync`` and bulk copies always go to a thread.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import trio

# Threads doing disk I/O at once; enough to keep a device queue busy.
IO_LIMITER = trio.CapacityLimiter(16)

Buffer = bytes | bytearray | memoryview


def _pread_full(fd: int, buf: memoryview, offset: int) -> int:
    """Blocking read that keeps going until ``buf`` is full or EOF; zero-fills past EOF."""
    done = 0
    total = len(buf)
    while done < total:
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            buf[done:] = bytes(total - done)
            break
        done += n
    return done


async def read_into(fd: int, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` from ``fd`` at ``offset``; bytes past EOF read as zeros."""
    try:
        n = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        n = 0
    if n < len(buf):
        await trio.to_thread.run_sync(_pread_full, fd, buf[n:], offset + n, limiter=IO_LIMITER)


def read_into_blocking(fd: int, buf: memoryview, offset: int) -> None:
    """The same as :func:`read_into` for code already running in a worker thread."""
    _pread_full(fd, buf, offset)


IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def write_all(fd: int, bufs: Sequence[Buffer], offset: int) -> None:
    """``pwritev`` that retries short writes; one system call in the normal case."""
    pending = list(bufs)
    pos = offset
    while pending:
        batch = pending[:IOV_MAX]
        want = sum(len(b) for b in batch)
        n = os.pwritev(fd, batch, pos) if len(batch) > 1 else os.pwrite(fd, batch[0], pos)
        pos += n
        if n == want:
            del pending[: len(batch)]
            continue
        # A short write: drop what was written and go on with the rest.
        skip = n
        i = 0
        while skip >= len(pending[i]):
            skip -= len(pending[i])
            i += 1
        pending = [memoryview(pending[i])[skip:], *pending[i + 1 :]]


async def datasync(fd: int) -> None:
    """``fdatasync`` in a worker thread: it waits for the device."""
    await trio.to_thread.run_sync(os.fdatasync, fd, limiter=IO_LIMITER)


async def datasync_all(fds: Sequence[int]) -> None:
    """Sync several files concurrently (one group commit)."""
    if len(fds) == 1:
        await datasync(fds[0])
        return
    async with trio.open_nursery() as nursery:
        for fd in fds:
            nursery.start_soon(datasync, fd)


def fsync_dir(path: str) -> None:
    """Make a rename or create in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all(fd, [data], 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")
