"""File I/O policy: what runs on the trio loop and what goes to a worker thread.

Measured on the target machine (bench/core_bench.py and bench/fs_bench.py
print it again): a 4 KiB ``preadv`` that hits the page cache costs ~2 µs on
the loop and a ``trio.to_thread`` round trip ~190 µs, while the virtio disk
answers a 4 KiB read that misses the cache in ~30 µs. Handing such a read to
a thread makes it six times slower; blocking the loop for it costs the other
requests 30 µs. So:

* small reads (up to ``INLINE_READ_MAX``) run on the loop with a plain
  ``preadv`` as long as the device answers quickly; the policy keeps a moving
  average of how long those reads block, and when it exceeds
  ``SLOW_READ_NS`` (a slow or busy device) small reads go to threads until
  the device is quick again;
* larger reads try ``RWF_NOWAIT`` on the loop, and only the part the kernel
  would have to fetch from the device goes to a thread (so large cold reads
  overlap each other on the device);
* buffered writes land in the page cache and stay on the loop (ext4 does
  not take ``RWF_NOWAIT`` writes); ``fdatasync`` always goes to a thread.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import time
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


INLINE_READ_MAX = 128 << 10
SLOW_READ_NS = 250_000


class ReadPolicy:
    """How long small reads block the loop (a moving average), and whether they may keep doing so.

    Only reads done on the loop are measured (a worker thread's timing
    includes waiting for the GIL); while small reads go to threads, one in
    ``PROBE_EVERY`` still runs on the loop to notice when the device is
    quick again. Each sample is capped so that one stall (metadata read,
    writeback) does not flip the policy on its own.
    """

    PROBE_EVERY = 32
    MODES = ("auto", "loop", "thread")

    __slots__ = ("avg_ns", "inline", "mode", "skipped")

    def __init__(self, mode: str = "auto") -> None:
        self.inline = True
        self.avg_ns = 0.0
        self.skipped = 0
        self.mode = mode if mode in self.MODES else "auto"

    def use_loop(self) -> bool:
        if self.mode != "auto":
            return self.mode == "loop"
        if self.inline:
            return True
        self.skipped += 1
        if self.skipped >= self.PROBE_EVERY:
            self.skipped = 0
            return True
        return False

    def record(self, ns: int) -> None:
        self.avg_ns += (min(ns, 2 * SLOW_READ_NS) - self.avg_ns) / 32
        if self.inline and self.avg_ns > SLOW_READ_NS:
            self.inline = False
        elif not self.inline and self.avg_ns < SLOW_READ_NS / 2:
            self.inline = True


# COLOFS_SMALL_READS=loop|thread pins the policy (for slow or network-backed stores, or tests).
# Descriptors whose file system refused RWF_NOWAIT; their large reads go straight to a thread.
_NO_NOWAIT: set[int] = set()

READS = ReadPolicy(os.environ.get("COLOFS_SMALL_READS", "auto"))


async def read_into(fd: int, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` from ``fd`` at ``offset``; bytes past EOF read as zeros."""
    size = len(buf)
    if size <= INLINE_READ_MAX:
        if READS.use_loop():
            t = time.perf_counter_ns()
            _pread_full(fd, buf, offset)
            READS.record(time.perf_counter_ns() - t)
        else:
            await trio.to_thread.run_sync(_pread_full, fd, buf, offset, limiter=IO_LIMITER)
        return
    n = 0
    if fd not in _NO_NOWAIT:
        try:
            n = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            pass
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            _NO_NOWAIT.add(fd)  # tmpfs, FUSE, NFS: this file system cannot say "would block"
    if n < size:
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
