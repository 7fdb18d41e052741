"""Closing emptied block-log files off the critical path.

A checkpoint or a failover empties the hidden and active logs. Freeing the
blocks of a log costs the file system about a millisecond per MiB (ext4 on
the target machine: 110 ms for 128 MiB), and a checkpoint is the moment both
VMs of a COLO pair stand paused. So a log is emptied by renaming a fresh file
over it (see ``BlockLog.take_spare``) and the old, now unlinked, file is
freed when its last descriptor closes: here, in one worker thread the VM
owns, started on first use and joined when the VM closes.

Descriptors handed over stay open until the reaper gets to them, so an
operation still in flight on an old descriptor (a group-commit ``fdatasync``)
finishes on the file it started on and never on a new file that reused the
number.

Freeing is off the loop but not free for the others: an ``fsync`` that
overlaps it waits for the file system's journal (and, on a file system
mounted with ``discard``, for the freed range's discards), 30-50 ms for
128 MiB on ext4 on the target machine. So an operation whose own syncs
follow the hand-over (the ``fsync`` of the directory the fresh logs were
renamed in, or an in-place reset's ``fdatasync``) holds the closing back with :meth:`FdReaper.deferred` until they
are done.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import trio

log = logging.getLogger(__name__)

_STOP = -1


class FdReaper:
    """One thread closing descriptors of unlinked files, in the order handed over."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._queue: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pending = 0
        self._lock = threading.Lock()
        self._holds = 0  # open ``deferred`` blocks
        self._held: list[int] = []  # handed over inside them, closed once the last one ends

    @property
    def pending(self) -> int:
        """Descriptors handed over and not yet closed."""
        with self._lock:
            return self._pending

    def put(self, fds: list[int]) -> None:
        """Hand descriptors over; returns at once (never blocks the trio loop)."""
        if not fds:
            return
        with self._lock:
            self._pending += len(fds)
        if self._holds:
            self._held.extend(fds)
            return
        self._close_later(fds)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Keep descriptors handed over inside the block open until it ends (called on the loop's thread).

        Wrap an operation whose syncs come after it hands the old logs over,
        so that their freeing cannot slow those syncs down (see above).
        """
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
            if not self._holds:
                self._release()

    def _release(self) -> None:
        held, self._held = self._held, []
        self._close_later(held)

    def _close_later(self, fds: list[int]) -> None:
        if not fds:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"colofs-reaper-{self.label}", daemon=True)
            self._thread.start()
        for fd in fds:
            self._queue.put(fd)

    def _run(self) -> None:
        while True:
            fd = self._queue.get()
            if fd == _STOP:
                return
            try:
                os.close(fd)
            except OSError as e:
                # The file is unlinked and its content discarded: nothing to lose, only to report.
                log.warning("%s: closing an emptied block log failed: %s", self.label, e)
            with self._lock:
                self._pending -= 1

    async def stop(self) -> None:
        """Close everything handed over and end the thread (waits in a worker thread)."""
        self._release()  # closing: nothing waits any more
        thread = self._thread
        if thread is None:
            return
        self._queue.put(_STOP)
        await trio.to_thread.run_sync(thread.join)
        self._thread = None

    def stop_now(self) -> None:
        """Like :meth:`stop`, blocking: for the synchronous paths (a simulated crash, a fatal error)."""
        self._release()
        thread = self._thread
        if thread is None:
            return
        self._queue.put(_STOP)
        thread.join()
        self._thread = None
