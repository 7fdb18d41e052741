"""File I/O policy: what runs on the trio loop and what goes to a worker thread.

Measured on the target machine (bench/core_bench.py and bench/fs_bench.py
print it again): a 4 KiB ``preadv`` that hits the page cache costs ~2 µs on
the loop; a ``trio.to_thread`` round trip ~190 µs of CPU, a job on the
store's worker pool (:mod:`colofs.core.ioctx`) ~25 µs at queue depth 16
(~140 µs alone); the virtio disk answers a 4 KiB read that misses the cache in ~30-60 µs. The FUSE loop is
CPU bound at ~110 µs per request, so a thread must save more than it costs:

* small reads (up to ``INLINE_READ_MAX``) stay on the loop. ``RWF_NOWAIT``
  copies what the page cache holds; a miss has then already started the
  device read, and when other requests wait (queued in the kernel's FUSE
  queue, or other reads in flight) the request yields to them first, so
  concurrent misses overlap on the device without threads. It then waits
  for its data on the loop. The policy keeps a moving average of how long
  those waits block, and while it exceeds ``SLOW_READ_NS`` (a slow or busy
  device) small reads that nothing else waits beside go to the pool instead
  (a hop per read at depth cost more CPU than the overlapped wait);
* larger reads try ``RWF_NOWAIT`` on the loop, and only the part the kernel
  would have to fetch from the device goes to the pool (so large cold reads
  overlap each other on the device);
* buffered writes land in the page cache and stay on the loop (ext4 does
  not take ``RWF_NOWAIT`` writes); ``fdatasync`` always goes to a thread
  (the store's :class:`~colofs.core.ioctx.GroupSync`, shared by concurrent callers).

This module keeps no state: the pool, the read policy, writeback and the
group-commit syncs live in the store's :class:`~colofs.core.ioctx.IOContext`.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Sequence

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


def read_into_blocking(fd: int, buf: memoryview, offset: int) -> None:
    """The same as ``IOContext.read_into`` for code already running in a worker thread."""
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


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing ``fd``'s dirty pages now, without waiting for them.

    Files synced only at checkpoints (base) call it after each batch, so the
    checkpoint's ``fdatasync`` finds little left to wait for.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)


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
