"""A failover's commit: every buffered block's V carried into base, step by step.

:func:`commit_disk` walks the blocks buffered in hidden and active in steps
(``Disk.commit_chunk`` bytes each, the step's span locked, the VM's I/O going
on elsewhere). Active (the SVM's writes) has no digests to check, so a run of its
blocks that is contiguous in the log goes file to file in the kernel
(:func:`colofs.core.commitcopy.copy_runs`, ``copy_file_range``): one copy instead of a read into
Python and a write back; hidden's blocks and short runs still go through
the view. A copy is an ordinary write of base, so the failover's order and
its recovery (docs/design.md, invariant 4) are the same either way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from colofs.core.commitcopy import map_copy

if TYPE_CHECKING:
    from colofs.core.disk import Disk

COMMIT_PREFETCH_STEPS = 2
"""Steps ahead of the one under way whose layer data is read ahead."""

async def commit_disk(disk: Disk) -> int:
    """Carry every buffered block's V of ``disk`` into base; returns the number of blocks moved.

    Runs while the SVM keeps reading and writing: each step locks only the
    span of the blocks it moves. A moved block is dropped from the layers
    with a tombstone, written after the block's base write, so writes to it
    then go straight to base. The caller syncs base before declaring the
    failover complete.
    """
    per_step = max(1, disk.commit_chunk // disk.block_size)
    moved = 0
    while True:
        # The maps as dicts (copied once per pass: a bisection per block would cost more than the
        # copies it feeds), asked per block from here on; the SVM's writes during the commit are
        # the only other change to them, and Disk._svm_write names those blocks for Disk._refresh.
        disk._rewritten = set()
        amap, hmap = map_copy(disk.active.map), map_copy(disk.hidden.map)
        pending = sorted(amap.keys() | hmap.keys())
        if not pending:
            return moved
        ahead = COMMIT_PREFETCH_STEPS * per_step
        disk._prefetch(pending[:ahead], amap, hmap)
        for i in range(0, len(pending), per_step):
            chunk = pending[i : i + per_step]
            # The device reads the coming steps' blocks while this one is written to base.
            disk._prefetch(pending[i + ahead : i + ahead + per_step], amap, hmap)
            async with disk.lock.range(chunk[0], chunk[-1] + 1, exclusive=True):
                if disk._rewritten and not disk._rewritten.isdisjoint(chunk):
                    disk._refresh(amap, hmap, disk._rewritten.intersection(chunk))
                    chunk = [b for b in chunk if b in amap or b in hmap]
                    if not chunk:
                        continue
                await disk._commit_step(chunk, amap)
                # Tombstones only where a layer holds the block (set operations, in C): known present,
                # so drop looks none of them up again.
                disk.active.drop(sorted(amap.keys() & chunk), checked=True)
                disk.hidden.drop(sorted(hmap.keys() & chunk), checked=True)
                moved += len(chunk)
