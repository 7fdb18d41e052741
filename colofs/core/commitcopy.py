"""A failover's copies into base: which runs of active go file to file, and the copy itself.

Active (the SVM's writes) has no digests to check, so a run of its blocks
that is contiguous in the log goes file to file in the kernel
(:func:`copy_runs`, ``copy_file_range``): one copy instead of a read into
Python and a write back. Used by ``Disk``'s commit step, which
:mod:`colofs.core.commit` drives; apart from both so neither imports the other.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping, Sequence

from colofs.core.errors import DiskIOError
from colofs.core.fileio import write_all
from colofs.core.logformat import ZERO_AT

COPY_MIN = 64 << 10
"""Shortest run of active's blocks copied in the kernel; a shorter one is not worth a system call of its own."""
NO_COPY = frozenset({errno.ENOSYS, errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL})
"""``copy_file_range`` errors that mean "not here", not an I/O failure: the data is then read and written."""

Copy = tuple[int, int, int]
"""``(offset in active, offset in base, length)``."""


def map_copy(layer_map: Mapping[int, int]) -> dict[int, int]:
    """A layer's map (block -> offset) as a ``dict``: the commit's per-block questions at dict speed.

    A map kept in another structure (sorted arrays, a bisection per
    question) is copied once per pass, in C (``dict(items)``); a ``dict`` is
    returned as it is, which the commit's refresh of rewritten blocks then
    leaves unchanged.
    """
    return layer_map if isinstance(layer_map, dict) else dict(layer_map.items())


def active_runs(amap: Mapping[int, int], chunk: Sequence[int], shift: int, size: int,
                min_bytes: int = COPY_MIN) -> tuple[list[Copy], list[int]]:
    """Split sorted blocks ``chunk`` into copies of active's long contiguous runs and the blocks left (sorted)."""
    bs = 1 << shift
    min_blocks = max(1, min_bytes >> shift)
    copies: list[Copy] = []
    rest: list[int] = []
    run: list[int] = []

    def close_run() -> None:
        if len(run) >= min_blocks:
            start = run[0] << shift
            copies.append((amap[run[0]], start, min(len(run) * bs, size - start)))
        else:
            rest.extend(run)
        run.clear()

    for b in chunk:
        off = amap.get(b)
        if off is None or off == ZERO_AT:
            close_run()
            rest.append(b)
        elif run and b == run[-1] + 1 and off == amap[run[-1]] + bs:
            run.append(b)
        else:
            close_run()
            run.append(b)
    close_run()
    rest.sort()
    return copies, rest


def copy_runs(src: int, dst: int, copies: Sequence[Copy], label: str) -> bool:
    """Copy each run from ``src`` (active) into ``dst`` (base); blocking, for a worker thread.

    Returns False if the file system has no ``copy_file_range`` for these
    files (the runs were then read and written): the caller stops asking.
    """
    supported = True
    for src_off, dst_off, length in copies:
        done = 0
        while done < length:
            if not supported:
                done += _read_and_write(src, dst, src_off + done, dst_off + done, length - done, label)
                continue
            try:
                n = os.copy_file_range(src, dst, length - done, src_off + done, dst_off + done)
            except OSError as e:
                if e.errno not in NO_COPY:
                    raise DiskIOError(f"{label}: copying {length} bytes of active at {src_off} into base at "
                                      f"{dst_off} failed: {e.strerror}", e.errno) from e
                supported = False
                continue
            if n == 0:
                raise DiskIOError(f"{label}: active ends before offset {src_off + done} "
                                  f"(copying into base at {dst_off})", errno.EIO)
            done += n
    return supported


def _read_and_write(src: int, dst: int, src_off: int, dst_off: int, length: int, label: str) -> int:
    """What ``copy_file_range`` does, where the kernel will not: read, then write; returns ``length``."""
    try:
        data = os.pread(src, length, src_off)
    except OSError as e:
        raise DiskIOError(f"{label}: reading active at {src_off} failed: {e.strerror}", e.errno) from e
    if len(data) != length:
        raise DiskIOError(f"{label}: active ends before offset {src_off + len(data)} (copying into base)", errno.EIO)
    try:
        write_all(dst, [data], dst_off)
    except OSError as e:
        raise DiskIOError(f"{label}: writing base at {dst_off} ({length} bytes) failed: {e.strerror}", e.errno) from e
    return length
