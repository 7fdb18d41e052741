"""The primary's memory bound: retained writes stay under ``max_backlog_bytes`` and writers wait, nothing is dropped."""

from __future__ import annotations

import random
from dataclasses import replace

import trio

from colofs.repl import SecondaryHooks
from tests.repl.conftest import wait_until
from tests.waiting import DEADLINE

SIZE = 8 << 20
WRITE = 64 << 10


def waiters(signal: object) -> int:
    """Tasks parked on a replication ``Signal`` now (how a test sees that a task waits on it)."""
    return signal._event.statistics().tasks_waiting  # type: ignore[attr-defined]


async def test_unacknowledged_writes_hold_writers_back_within_the_bound(pair, repl_errors) -> None:
    backlog = 1 << 20
    pair.cfg = replace(pair.cfg, max_backlog_bytes=backlog, max_inflight_bytes=256 << 10, batch_max_bytes=128 << 10)
    limit = pair.cfg.effective_inflight
    proxy = await pair.start_proxied(SIZE)
    pvm = pair.primary.vm("vm")
    link = pair.link()
    rng = random.Random(7)
    image = bytearray(SIZE)
    total = 48  # 3 MiB: three times the backlog bound
    done = [0]
    peak = [0, 0]

    async def writer() -> None:
        for _ in range(total):
            off = rng.randrange(0, SIZE // WRITE) * WRITE
            data = rng.randbytes(WRITE)
            await pvm.disk("d0").write(off, data)
            image[off : off + WRITE] = data
            done[0] += 1
            peak[0] = max(peak[0], link.tracking.retained.nbytes)
            peak[1] = max(peak[1], link.tracking.unacked_bytes)

    proxy.hold_down = True  # the secondary applies, but its acknowledgements stop
    finished = trio.Event()

    async def run_writer() -> None:
        await writer()
        finished.set()

    pair.nursery.start_soon(run_writer)
    # The bound is reached and the writer is parked waiting for room (on the link's change signal):
    # a positive sign that it is held back, instead of watching it not move for a while.
    await wait_until(lambda: link.tracking.unacked_bytes + WRITE > limit
                     and waiters(link.life._changed) == 1, what="the writer held back at the in-flight bound")
    stuck_at = done[0]
    assert not finished.is_set()
    assert stuck_at * WRITE <= limit + WRITE
    assert link.state == "streaming" and link.tracking.retaining

    proxy.release()
    with trio.fail_after(DEADLINE):
        await finished.wait()
    await pair.caught_up()
    assert peak[0] <= backlog and peak[1] <= limit
    assert link.stats["stream_breaks"] == 0 and link.stats["resyncs"] == 0  # a new, empty VM: nothing dropped
    await pair.link("vm").replicate_checkpoint()
    await pair.assert_identical()
    assert bytes(await pvm.disk("d0").read(0, SIZE)) == bytes(image)
    assert repl_errors() == []


async def test_a_busy_secondary_stops_reading_at_its_byte_budget(pair, repl_errors) -> None:
    """While the secondary's applier is held up, decoded frames stop at ``receive_bytes``; then all arrive."""
    budget = 512 << 10
    pair.cfg = replace(pair.cfg, receive_bytes=budget, batch_max_bytes=WRITE,
                       max_backlog_bytes=64 << 20, max_inflight_bytes=16 << 20)
    gate = trio.Event()
    held = trio.Event()

    async def slow_checkpoint(vm, seq: int) -> None:
        held.set()
        await gate.wait()
        await vm.checkpoint(seq)

    await pair.open_stores()
    await pair.primary.create_disk("vm", "d0", SIZE)
    await pair.start_secondary(hooks=SecondaryHooks(take_checkpoint=slow_checkpoint))
    await pair.start_primary()
    await pair.caught_up()
    pvm = pair.primary.vm("vm")
    rng = random.Random(11)
    await pvm.disk("d0").write(0, rng.randbytes(WRITE))
    pair.nursery.start_soon(pair.link("vm").replicate_checkpoint)
    await held.wait()  # the secondary's applier now waits in the checkpoint
    session = pair.server.sessions["vm"]
    link = pair.link()
    try:  # the hook runs shielded: always let it finish, or teardown would wait for it forever
        for i in range(64):  # 4 MiB, eight times the budget
            await pvm.disk("d0").write(i * WRITE, rng.randbytes(WRITE))
        # The reader parks on the drained signal once the budget is used: then it reads no more.
        await wait_until(lambda: session._queued + WRITE > budget and waiters(session._drained) == 1,
                         what="the secondary's reader to stop at the budget")
        assert session._queued <= budget + WRITE
        assert link.acked < pvm.state.last_applied
    finally:
        gate.set()
    await pair.caught_up()
    await pair.link("vm").replicate_checkpoint()
    await pair.assert_identical()
    assert session._queued == 0 and link.stats["stream_breaks"] == 0
    assert repl_errors() == []


async def test_all_vms_together_stay_within_the_hosts_retained_budget(pair, repl_errors) -> None:
    """Past ``max_retained_total_bytes`` the VM holding the most drops its acknowledged writes; nothing is lost."""
    limit = 1 << 20
    pair.cfg = replace(pair.cfg, max_retained_total_bytes=limit, max_backlog_bytes=8 << 20,
                       max_inflight_bytes=512 << 10, batch_max_bytes=128 << 10)
    await pair.open_stores()
    for vm in ("a", "b"):
        await pair.primary.create_disk(vm, "d0", SIZE)
    await pair.start_secondary()
    await pair.start_primary()
    budget = pair.repl.budget
    rng = random.Random(5)
    for vm, count in (("a", 14), ("b", 14)):  # 896 KiB each: the second VM pushes the total past the limit
        await pair.caught_up(vm)
        for i in range(count):
            await pair.primary.vm(vm).disk("d0").write(i * WRITE, rng.randbytes(WRITE))
            held = sum(link.tracking.retained.nbytes for link in pair.repl.links.values())
            assert budget.total == held
            assert held <= limit + WRITE
        await pair.caught_up(vm)
    a, b = pair.link("a"), pair.link("b")
    assert a.tracking.retained.nbytes == 0 and b.tracking.retained.nbytes == 14 * WRITE  # the larger, acknowledged holder gave way
    assert a.tracking.retaining and a.stats["stream_breaks"] == 0 and b.stats["stream_breaks"] == 0
    for vm in ("a", "b"):
        await pair.link(vm).replicate_checkpoint()
        await pair.assert_identical(vm)
    assert budget.total == 0
    assert repl_errors() == []
