"""File I/O policy: what runs on the trio loop and what goes to a worker thread.

Measured on the target machine (bench/core_bench.py and bench/fs_bench.py
print it again): a 4 KiB ``preadv`` that hits the page cache costs ~2 µs on
the loop; a ``trio.to_thread`` round trip ~190 µs of CPU, a job on
:data:`POOL` ~25 µs at queue depth 16 (~140 µs alone); the virtio disk
answers a 4 KiB read that misses the cache in ~30-60 µs. The FUSE loop is
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
import errno
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import outcome
import trio

# Threads doing disk I/O at once; enough to keep a device queue busy.
IO_LIMITER = trio.CapacityLimiter(16)

Buffer = bytes | bytearray | memoryview
T = TypeVar("T")


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


class WorkerPool:
    """Threads for blocking file I/O, at a fraction of ``trio.to_thread``'s cost per call.

    ``trio.to_thread.run_sync`` costs ~170 µs of CPU per call here (limiter,
    thread cache, cancellation plumbing); a job on this pool is one queue put,
    the call, and one ``run_sync_soon`` back (~25 µs at queue depth 16,
    measured by ``bench/core_bench.py``). That decides whether reads the page
    cache misses can overlap on the device at all. A job is not cancellable
    once queued (like ``to_thread`` without ``abandon_on_cancel``): the
    caller's buffer stays in use until the call returns.
    """

    def __init__(self, max_threads: int) -> None:
        self.max_threads = max_threads
        self.in_flight = 0  # jobs queued or running, counted on the loop
        self._threads = 0
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], Any, Any]] = queue.SimpleQueue()

    def _work(self) -> None:
        get = self._jobs.get
        while True:
            fn, args, token, task = get()
            result = outcome.capture(fn, *args)
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            del fn, args, token, task, result

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in a worker thread; the calling task sleeps until it returns."""
        self.in_flight += 1
        if self.in_flight > self._threads and self._threads < self.max_threads:
            self._threads += 1
            threading.Thread(target=self._work, name=f"colofs-io-{self._threads}", daemon=True).start()
        self._jobs.put((fn, args, trio.lowlevel.current_trio_token(), trio.lowlevel.current_task()))
        try:
            return await trio.lowlevel.wait_task_rescheduled(_no_abort)
        finally:
            self.in_flight -= 1


def _no_abort(_: Any) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED


POOL = WorkerPool(16)

# Tells whether other requests wait to be served (the mount sets it: requests queued in
# the kernel for the FUSE device). A read the page cache misses blocks the loop only
# when nothing else could run meanwhile.
_pending: Callable[[], bool] | None = None


def set_pending_probe(probe: Callable[[], bool] | None) -> None:
    """Install the check for requests waiting outside the loop (``None`` removes it)."""
    global _pending
    _pending = probe


_kicked = 0  # small reads whose device I/O was started and that let others run meanwhile


def _others_waiting() -> bool:
    if POOL.in_flight or _kicked:
        return True  # reads already overlap on the device: this one joins them
    probe = _pending
    return probe is not None and probe()


def _read_nowait(fd: int, buf: memoryview, offset: int) -> int:
    """What the page cache holds of ``buf`` now; a miss starts the device read and returns short."""
    if fd in _NO_NOWAIT:
        return 0
    try:
        return os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return 0
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        _NO_NOWAIT.add(fd)  # tmpfs, FUSE, NFS: this file system cannot say "would block"
        return 0


async def read_into(fd: int, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` from ``fd`` at ``offset``; bytes past EOF read as zeros.

    Small reads (the VM's 4 KiB requests) stay on the loop: a worker thread
    costs more CPU than the device takes to answer (~60 µs), and the loop is
    CPU bound. What the page cache holds is copied with ``RWF_NOWAIT``
    (~2 µs). A miss has then already started the device read, so when other
    requests wait (queued in the kernel, or other reads in flight) the
    request lets them run first, each starting its own device read, and
    only then waits for its data: concurrent reads overlap on the device
    without threads. Large reads, and small ones while the device is slow,
    go to worker threads for what the page cache lacks.
    """
    global _kicked
    size = len(buf)
    small = size <= INLINE_READ_MAX
    mode = READS.mode
    if small and mode == "loop":
        _pread_full(fd, buf, offset)
        return
    n = _read_nowait(fd, buf, offset) if mode == "auto" or not small else 0
    if n >= size:
        return
    if small and mode == "auto" and READS.use_loop():
        if _others_waiting():
            _kicked += 1
            try:
                await trio.lowlevel.cancel_shielded_checkpoint()
            finally:
                _kicked -= 1
            n += _read_nowait(fd, buf[n:], offset + n)
            if n >= size:
                return
        t = time.perf_counter_ns()
        _pread_full(fd, buf[n:], offset + n)
        READS.record(time.perf_counter_ns() - t)
        return
    await POOL.run(_pread_full, fd, buf[n:], offset + n)


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
