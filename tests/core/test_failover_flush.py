"""A flush during a failover's commit makes no tombstone durable before the base write it stands for.

The commit writes a step's blocks into base, then drops them from the
layers with tombstones; the flush syncs base, then the logs. A step that ran
between the two syncs would have its tombstones made durable by the second
while its base write missed the first: after a power loss the layers would
send the block's reads to a base without it. The flush therefore holds the
disk's whole range (shared) across both syncs, which waits for the step
under way and lets none start until it is done.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from colofs.core.state import FAILOVER, PRIMARY
from tests.core.test_failover_copy import BS, buffered, read_base


async def test_no_commit_step_runs_between_a_flushs_syncs(open_store, monkeypatch) -> None:
    store, vm, disk, image = await buffered(open_store)
    disk.commit_chunk = 4 * BS  # many steps, so one can fall between the flush's syncs
    events: list[str] = []
    real_syncs = disk.io.syncs

    class SlowSyncs:
        """The store's group syncs, each letting the loop run other tasks first, as a slow device's would."""

        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(real_syncs, name)

        async def datasync_all(self, fds: Sequence[int]) -> None:
            if disk.base_fd in fds:
                events.append("base sync")
            for _ in range(50):
                await trio.lowlevel.checkpoint()
            await real_syncs.datasync_all(fds)

    monkeypatch.setattr(disk.io, "syncs", SlowSyncs())
    for layer in (disk.active, disk.hidden):
        real_drop = layer.drop

        def drop(blocks, *args, _real=real_drop, **kw):  # type: ignore[no-untyped-def]
            if blocks:
                events.append("tombstones")
            return _real(blocks, *args, **kw)

        monkeypatch.setattr(layer, "drop", drop)
    stepped = trio.Event()
    real_step = disk._commit_step

    async def commit_step(*args, **kw):  # type: ignore[no-untyped-def]
        await real_step(*args, **kw)
        stepped.set()

    monkeypatch.setattr(disk, "_commit_step", commit_step)

    async def flush_mid_commit() -> None:
        await stepped.wait()
        assert vm.state.phase == FAILOVER
        events.append("flush")
        await disk.flush()
        events.append("flushed")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flush_mid_commit)
        await vm.failover()
    assert vm.state.role == PRIMARY
    window = events[events.index("flush") : events.index("flushed")]
    base_sync = window.index("base sync")
    assert "tombstones" not in window[base_sync:], events
    assert read_base(store, 0, len(image)) == image
