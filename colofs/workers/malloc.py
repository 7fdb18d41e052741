"""glibc's allocator, tuned for a process that serves one VM: one arena, free pages given back.

Each thread that allocates (the I/O pool's, ``trio.to_thread``'s, the frame
encoder's) gets a malloc arena of its own by default, and a thread's arena
keeps its top resident once freed: glibc raises its trim threshold to twice
the largest buffer it ever mmapped (a 4 MiB batch: 8 MiB), and
``malloc_trim`` trims only the main arena's top. A worker that streamed a few
MiB kept 8 to 12 MiB of free, resident, private memory in such an arena, where
the issue allows 16 MiB per VM in all. With one arena (:func:`limit_arenas`,
set in the zygote before it forks and inherited by every worker) everything
is in the main arena, and :func:`trim`, which a worker calls after a
checkpoint and a resync's end, gives all of its free pages back. Small
allocations do not contend for the one arena: each thread has its own cache.
Both are no-ops where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from functools import cache

import trio

log = logging.getLogger(__name__)

M_ARENA_MAX = -8
"""mallopt's parameter number for the arena cap (malloc.h)."""
TRIM_INTERVAL = 1.0
"""At most one trim a second: each costs page faults when the memory is used again."""
WORKER_ARENAS = 1
"""Only the main arena, the one ``malloc_trim`` empties whole (one VM's rate of large allocations is low)."""


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6", use_errno=True)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None  # not glibc (musl has neither)
    return libc


def limit_arenas(count: int = WORKER_ARENAS) -> bool:
    """Cap this process's malloc arenas at ``count`` (before its threads start); True if applied."""
    libc = _libc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(M_ARENA_MAX, count))
    if not ok:
        log.debug("mallopt(M_ARENA_MAX, %d) refused", count)
    return ok


def trim() -> bool:
    """Give every arena's free pages back to the kernel (fast: no copying); True if some were."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


class Trimmer:
    """Trims when asked, at most once per ``interval`` seconds, in a thread (it takes the arenas' locks a moment).

    A request within ``interval`` of the last trim is not lost: one more trim
    follows when the interval is over.
    """

    def __init__(self, interval: float = TRIM_INTERVAL) -> None:
        self.interval = interval
        self._wanted = trio.Event()
        self.count = 0

    def request(self) -> None:
        """Ask for a trim (never blocks: called from event watchers)."""
        self._wanted.set()

    async def run(self) -> None:
        """Serve requests until cancelled: a trim at once, and one more ``interval`` later.

        The second gives back what was freed just after the first (a checkpoint's
        event can come a moment before the writes it releases are dropped), and
        covers every request made meanwhile.
        """
        while True:
            await self._wanted.wait()
            self._wanted = trio.Event()
            await self._trim()
            await trio.sleep(self.interval)
            self._wanted = trio.Event()
            await self._trim()

    async def _trim(self) -> None:
        self.count += 1
        await trio.to_thread.run_sync(trim)
