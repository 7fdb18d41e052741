"""A store's I/O context: the worker pool, the small-read policy, writeback and group-commit syncs.

The store creates one when it is opened and hands it down (VM, disk,
copy-before-write, layers); closing the store stops its threads. Nothing
here is process-wide, so two stores in one process (tests, tools) do not
share a read policy or threads. The figures behind the policy are in
:mod:`colofs.core.fileio`'s docstring.
"""

from __future__ import annotations

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

from colofs.core.fileio import _pread_full, start_writeback

T = TypeVar("T")

INLINE_READ_MAX = 128 << 10
SLOW_READ_NS = 250_000
POOL_THREADS = 16
SYNC_THREADS = 16  # fdatasyncs waiting for the device at once; enough to keep its queue busy
READS_ENV = "COLOFS_SMALL_READS"
"""``loop`` or ``thread`` pins the small-read policy (slow or network-backed stores, tests)."""


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
        self._threads: list[threading.Thread] = []
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], Any, Any] | None] = (
            queue.SimpleQueue())

    def _work(self) -> None:
        get = self._jobs.get
        while True:
            job = get()
            if job is None:
                return
            fn, args, token, task = job
            result = outcome.capture(fn, *args)
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            del fn, args, token, task, result, job

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in a worker thread; the calling task sleeps until it returns."""
        self.in_flight += 1
        if self.in_flight > len(self._threads) and len(self._threads) < self.max_threads:
            t = threading.Thread(target=self._work, name=f"colofs-io-{len(self._threads) + 1}", daemon=True)
            self._threads.append(t)
            t.start()
        self._jobs.put((fn, args, trio.lowlevel.current_trio_token(), trio.lowlevel.current_task()))
        try:
            return await trio.lowlevel.wait_task_rescheduled(_no_abort)
        finally:
            self.in_flight -= 1

    def close(self) -> None:
        """Stop the threads once the jobs queued before are done (blocking: call from a thread)."""
        threads, self._threads = self._threads, []
        for _ in threads:
            self._jobs.put(None)
        for t in threads:
            t.join()


def _no_abort(_: Any) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED


class Writeback:
    """Starts writeback of files from a thread of its own, without waiting for it.

    ``sync_file_range`` submits every dirty page of the file and blocks
    while the device queue is full: 30 ms for 8 MiB of scattered 4 KiB
    writes was measured on the loop. It is only a hint (durability comes
    from the syncs at flushes and checkpoints), so nobody waits for it;
    requests for the same file made meanwhile are served by one call.
    """

    def __init__(self) -> None:
        self._fds: set[int] = set()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False

    def kick(self, fd: int) -> None:
        with self._cv:
            if self._closing:
                return
            self._fds.add(fd)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="colofs-writeback", daemon=True)
                self._thread.start()
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._fds and not self._closing:
                    self._cv.wait()
                if not self._fds:
                    return
                fds = list(self._fds)
                self._fds.clear()
            for fd in fds:
                start_writeback(fd)  # a closed (or reused) descriptor only gets a harmless hint

    def close(self) -> None:
        """Serve the requests made so far, then end the thread (blocking: call from a thread)."""
        with self._cv:
            self._closing = True
            thread, self._thread = self._thread, None
            self._cv.notify()
        if thread is not None:
            thread.join()


class _SyncState:
    __slots__ = ("covered", "running")

    def __init__(self) -> None:
        self.covered = 0  # every write made before this ticket is durable
        self.running: trio.Event | None = None


class GroupSync:
    """``fdatasync`` shared by concurrent callers (group commit), per file descriptor.

    A sync that *starts* after a caller's writes covers them, so callers
    arriving while one runs wait for it and then share the next, instead of
    queueing one ``fdatasync`` each (16 first-touch writes in flight under a
    snapshot cost two device flushes, not sixteen). The ``fdatasync`` runs in
    a worker thread: it waits for the device.
    """

    __slots__ = ("_limiter", "_syncs", "_tickets")

    def __init__(self, threads: int = SYNC_THREADS) -> None:
        self._limiter = trio.CapacityLimiter(threads)
        self._tickets = itertools.count(1)
        self._syncs: dict[int, _SyncState] = {}

    async def datasync(self, fd: int) -> None:
        """Make every write to ``fd`` completed so far durable."""
        mine = next(self._tickets)
        st = self._syncs.get(fd)
        if st is None:
            st = self._syncs[fd] = _SyncState()
        while st.covered < mine:
            if st.running is not None:
                await st.running.wait()
                continue
            start = next(self._tickets)
            done = st.running = trio.Event()
            try:
                await trio.to_thread.run_sync(os.fdatasync, fd, limiter=self._limiter)
                st.covered = max(st.covered, start)
            finally:
                st.running = None
                done.set()

    async def datasync_all(self, fds: Sequence[int]) -> None:
        """Sync several files concurrently (one group commit)."""
        if len(fds) == 1:
            await self.datasync(fds[0])
            return
        async with trio.open_nursery() as nursery:
            for fd in fds:
                nursery.start_soon(self.datasync, fd)


class IOContext:
    """The pool, read policy, writeback and syncs a store's file I/O shares; see :meth:`read_into`."""

    __slots__ = ("_no_nowait", "kicked", "pending", "pool", "reads", "syncs", "writeback")

    def __init__(self, reads: str = "auto", threads: int = POOL_THREADS) -> None:
        self.pool = WorkerPool(threads)
        self.reads = ReadPolicy(reads)
        self.writeback = Writeback()
        self.syncs = GroupSync()  # durability: ``await io.syncs.datasync_all(fds)``
        self.pending: Callable[[], bool] | None = None
        """Whether other requests wait to be served (the mount sets it: requests queued in the
        kernel for the FUSE device). A read the page cache misses blocks the loop only when
        nothing else could run meanwhile."""
        self.kicked = 0  # small reads whose device I/O was started and that let others run meanwhile
        self._no_nowait: set[int] = set()  # descriptors whose file system refused RWF_NOWAIT

    @classmethod
    def from_environment(cls) -> IOContext:
        """A context whose read policy ``COLOFS_SMALL_READS`` may pin."""
        return cls(os.environ.get(READS_ENV, "auto"))

    def close(self) -> None:
        """Join the writeback thread and the pool's threads (blocking: call from a thread)."""
        self.writeback.close()
        self.pool.close()

    def _others_waiting(self) -> bool:
        if self.pool.in_flight or self.kicked:
            return True  # reads already overlap on the device: this one joins them
        probe = self.pending
        return probe is not None and probe()

    def _read_nowait(self, fd: int, buf: memoryview, offset: int) -> int:
        """What the page cache holds of ``buf`` now; a miss starts the device read and returns short."""
        if fd in self._no_nowait:
            return 0
        try:
            return os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return 0
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self._no_nowait.add(fd)  # tmpfs, FUSE, NFS: this file system cannot say "would block"
            return 0

    async def read_into(self, fd: int, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` from ``fd`` at ``offset``; bytes past EOF read as zeros.

        Small reads (the VM's 4 KiB requests) stay on the loop: a worker thread
        costs more CPU than the device takes to answer (~60 µs), and the loop is
        CPU bound. What the page cache holds is copied with ``RWF_NOWAIT``
        (~2 µs). A miss has then already started the device read, so when other
        requests wait (queued in the kernel, or other reads in flight) the
        request lets them run first, each starting its own device read, and
        only then waits for its data: concurrent reads overlap on the device
        without threads. Such a read stays on the loop whatever the policy
        says: a pool hop per miss cost ~100 µs more CPU in thread wake-ups
        and GIL hand-offs than the loop's wait (cold 4 KiB reads at queue
        depth 16 over FUSE, ``bench/read_path.py --floor``: 193 against 85
        µs of CPU per read, the pyfuse3 floor 64), and the policy, which
        measures those waits at depth, sent every miss there.
        Large reads, and lone small ones while the device is slow, go to
        worker threads for what the page cache lacks (``thread`` mode sends
        every small read there, for stores on slow or network devices).
        """
        size = len(buf)
        small = size <= INLINE_READ_MAX
        reads = self.reads
        mode = reads.mode
        if small and mode == "loop":
            _pread_full(fd, buf, offset)
            return
        n = self._read_nowait(fd, buf, offset) if mode == "auto" or not small else 0
        if n >= size:
            return
        others = small and mode == "auto" and self._others_waiting()
        if others or (small and mode == "auto" and reads.use_loop()):
            if others:
                self.kicked += 1
                try:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                finally:
                    self.kicked -= 1
                n += self._read_nowait(fd, buf[n:], offset + n)
                if n >= size:
                    return
            t = time.perf_counter_ns()
            _pread_full(fd, buf[n:], offset + n)
            reads.record(time.perf_counter_ns() - t)
            return
        await self.pool.run(_pread_full, fd, buf[n:], offset + n)
