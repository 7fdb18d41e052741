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
  device) small reads go to the pool instead;
* larger reads try ``RWF_NOWAIT`` on the loop, and only the part the kernel
  would have to fetch from the device goes to the pool (so large cold reads
  overlap each other on the device);
* buffered writes land in the page cache and stay on the loop (ext4 does
  not take ``RWF_NOWAIT`` writes); ``fdatasync`` always goes to a thread.
"""

from __future__ import annotations

import ctypes
import itertools
import os
from collections.abc import Callable, Sequence

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


class _SyncState:
    __slots__ = ("covered", "running")

    def __init__(self) -> None:
        self.covered = 0  # every write made before this ticket is durable
        self.running: trio.Event | None = None


_tickets = itertools.count(1)
_syncs: dict[int, _SyncState] = {}


async def datasync(fd: int) -> None:
    """Make every write to ``fd`` completed so far durable; concurrent callers share one ``fdatasync``.

    Group commit: a sync that *starts* after a caller's writes covers them,
    so callers arriving while one runs wait for it and then share the next,
    instead of queueing one ``fdatasync`` each (16 first-touch writes in
    flight under a snapshot cost two device flushes, not sixteen). The
    ``fdatasync`` runs in a worker thread: it waits for the device.
    """
    mine = next(_tickets)
    st = _syncs.get(fd)
    if st is None:
        st = _syncs[fd] = _SyncState()
    while st.covered < mine:
        if st.running is not None:
            await st.running.wait()
            continue
        start = next(_tickets)
        done = st.running = trio.Event()
        try:
            await trio.to_thread.run_sync(os.fdatasync, fd, limiter=IO_LIMITER)
            st.covered = max(st.covered, start)
        finally:
            st.running = None
            done.set()


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
