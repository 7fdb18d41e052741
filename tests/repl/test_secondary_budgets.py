"""The secondary's memory under ingest with the default budgets: what it holds decoded, and per group commit.

A busy secondary (its applier held up in a checkpoint) must stop reading at
``receive_bytes`` with the defaults, and the groups it then applies must
stay within ``apply_merge_bytes`` plus one batch: the decoded writes and the
copy-before-write buffer of a group are what its process holds beyond its
maps (``bench/secondary_memory.py`` measures the process).
"""

from __future__ import annotations

import random

import trio

from colofs.repl import ReplConfig, SecondaryHooks
from tests.repl.conftest import wait_until

MiB = 1 << 20
SIZE = 64 * MiB
WRITE = MiB
HELD_DEFAULT = 5 * MiB
"""Most decoded write data a secondary holds with the defaults: ``receive_bytes`` and the batch being read."""
GROUP_DEFAULT = 5 * MiB
"""Most write data of one group commit with the defaults: ``apply_merge_bytes`` and the batch that passed it."""


def waiters(signal: object) -> int:
    """Tasks parked on a replication ``Signal`` now."""
    return signal._event.statistics().tasks_waiting  # type: ignore[attr-defined]


async def _held_secondary(pair):  # type: ignore[no-untyped-def]
    """A pair with the defaults whose secondary applier is parked in a checkpoint until ``gate`` is set."""
    gate = trio.Event()
    held = trio.Event()

    async def slow_checkpoint(vm, seq: int) -> None:  # type: ignore[no-untyped-def]
        held.set()
        await gate.wait()
        await vm.checkpoint(seq)

    await pair.open_stores()
    await pair.primary.create_disk("vm", "d0", SIZE)
    await pair.start_secondary(hooks=SecondaryHooks(take_checkpoint=slow_checkpoint))
    await pair.start_primary()
    await pair.caught_up()
    await pair.primary.vm("vm").disk("d0").write(0, bytes(WRITE))
    pair.nursery.start_soon(pair.link("vm").replicate_checkpoint)
    await held.wait()
    return gate


def test_the_default_budgets_are_the_ones_these_tests_bound() -> None:
    cfg = ReplConfig()
    assert cfg.receive_bytes + cfg.batch_max_bytes <= HELD_DEFAULT
    assert cfg.apply_merge_bytes + cfg.batch_max_bytes <= GROUP_DEFAULT


async def test_a_busy_secondary_holds_little_decoded_with_the_defaults(pair, repl_errors) -> None:
    """48 MiB sent while the applier is held: the reader stops with at most ``HELD_DEFAULT`` decoded."""
    gate = await _held_secondary(pair)
    pvm = pair.primary.vm("vm")
    session = pair.server.sessions["vm"]
    rng = random.Random(3)
    try:  # the hook runs shielded: always let it finish
        for i in range(48):
            await pvm.disk("d0").write(i * WRITE, rng.randbytes(WRITE))
        await wait_until(lambda: waiters(session._drained) == 1, what="the secondary's reader to stop at its budget")
        assert session._queued <= HELD_DEFAULT
    finally:
        gate.set()
    await pair.caught_up()
    await pair.link("vm").replicate_checkpoint()
    await pair.assert_identical()
    assert repl_errors() == []


async def test_a_group_commit_stays_within_the_default_merge_budget(pair, repl_errors) -> None:
    """Batches queued behind a held applier are applied in groups of at most ``GROUP_DEFAULT`` bytes."""
    gate = await _held_secondary(pair)
    pvm = pair.primary.vm("vm")
    svm = pair.secondary.vm("vm")
    session = pair.server.sessions["vm"]
    groups: list[int] = []
    apply = svm.apply_primary

    async def counted(seq: int, writes) -> int:  # type: ignore[no-untyped-def]
        groups.append(sum(len(w.data) for w in writes))
        return await apply(seq, writes)

    svm.apply_primary = counted
    rng = random.Random(4)
    try:
        for i in range(24):
            await pvm.disk("d0").write(i * WRITE, rng.randbytes(WRITE))
        await wait_until(lambda: session._queued >= min(24 * WRITE, session.cfg.receive_bytes),
                         what="the written data queued at the secondary")
    finally:
        gate.set()
    await pair.caught_up()
    assert sum(groups) == 24 * WRITE
    assert max(groups) <= GROUP_DEFAULT, groups
    await pair.link("vm").replicate_checkpoint()
    await pair.assert_identical()
    assert repl_errors() == []
