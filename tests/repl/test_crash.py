"""A secondary that dies (store abandoned, as SIGKILL leaves it) or restarts, and a primary that restarts."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import trio

from colofs.core import Store
from colofs.repl import CheckpointError
from tests.repl.child import SecondaryChild
from tests.repl.conftest import base_of, wait_until
from tests.repl.test_end_to_end import rand_write
from tests.waiting import DEADLINE

SIZE = 1 << 20


async def _write(pair, rng: random.Random, img: bytearray, n: int, svm_too: bool = False) -> None:
    pvm = pair.primary.vm("vm")
    for _ in range(n):
        off, data = rand_write(rng, SIZE)
        await pvm.disk("d0").write(off, data)
        img[off : off + len(data)] = data
        if svm_too and rng.random() < 0.3:
            soff, sdata = rand_write(rng, SIZE)
            await pair.secondary.vm("vm").disk("d0").write(soff, sdata)


@pytest.mark.parametrize("backlog", [256 << 20, 64 << 10], ids=["retained-writes", "dirty-resync"])
async def test_killed_secondary_recovers_to_its_checkpoint_and_catches_up(pair, repl_errors, backlog) -> None:
    rng = random.Random(backlog)
    pair.cfg = replace(pair.cfg, max_backlog_bytes=backlog)
    await pair.open_stores()
    await pair.primary.create_disk("vm", "d0", SIZE)
    await pair.start_secondary()
    port = pair.port
    await pair.start_primary()
    img = bytearray(SIZE)
    await _write(pair, rng, img, 80)
    c1 = (await pair.link("vm").replicate_checkpoint()).seq
    at_c1 = bytes(img)
    await _write(pair, rng, img, 120, svm_too=True)
    await pair.caught_up()
    applied = pair.secondary.vm("vm").state.last_applied
    assert applied > c1
    resyncs_before = pair.repl.status("vm")["resyncs"]

    await pair.kill_secondary()
    await _write(pair, rng, img, 60)  # the primary goes on alone

    store = await Store.open(pair.sdir, role="secondary")
    svm = store.vm("vm")
    assert svm.recovery.action == "rolled-back" and svm.recovery.resume_seq == c1
    assert svm.state.last_applied == svm.state.last_checkpoint == c1
    assert base_of(svm.disk("d0")) == at_c1
    assert bytes(await svm.disk("d0").read(0, SIZE)) == at_c1
    pair.secondary = store
    await pair.start_secondary(port=port)
    res = await pair.link("vm").replicate_checkpoint()
    assert res.seq == pair.primary.vm("vm").state.last_applied
    assert bytes(await pair.primary.vm("vm").disk("d0").read(0, SIZE)) == img
    await pair.assert_identical()
    st = pair.repl.status("vm")
    assert st["full_syncs"] == 0  # a new, empty VM needs none; the crash only a dirty-block resync
    if backlog > SIZE:
        assert st["resyncs"] == resyncs_before, "resumed from retained writes"
    else:
        assert st["resyncs"] > resyncs_before and st["stream_breaks"] >= 1
        last = st["resync"]
        assert not last["full"] and 0 < last["blocks_total"] < SIZE // 4096
    assert not repl_errors()


async def test_clean_secondary_restart_resumes_after_its_last_applied(pair, repl_errors) -> None:
    rng = random.Random(5)
    await pair.open_stores()
    await pair.primary.create_disk("vm", "d0", SIZE)
    await pair.start_secondary()
    port = pair.port
    await pair.start_primary()
    img = bytearray(SIZE)
    await _write(pair, rng, img, 50)
    await pair.link("vm").replicate_checkpoint()
    await _write(pair, rng, img, 50)
    await pair.caught_up()
    await pair.stop_secondary()
    await pair.secondary.close()
    pair.secondary = None
    await _write(pair, rng, img, 30)
    pair.secondary = await Store.open(pair.sdir, role="secondary")
    before = pair.repl.status("vm")["resyncs"]
    assert pair.secondary.vm("vm").recovery.resume_seq == pair.secondary.vm("vm").state.last_applied
    await pair.start_secondary(port=port)
    await pair.link("vm").replicate_checkpoint()
    await pair.assert_identical()
    assert pair.repl.status("vm")["resyncs"] == before
    assert not repl_errors()


async def test_primary_restart_uses_its_saved_dirty_bitmap(pair, repl_errors) -> None:
    """A clean primary restart while the secondary had crashed: only the dirty blocks are compared."""
    rng = random.Random(9)
    await pair.open_stores()
    await pair.primary.create_disk("vm", "d0", SIZE)
    await pair.start_secondary()
    port = pair.port
    await pair.start_primary()
    img = bytearray(SIZE)
    await _write(pair, rng, img, 40)
    await pair.link("vm").replicate_checkpoint()
    pvm = pair.primary.vm("vm")
    for i in range(5):  # exactly 5 blocks change after the checkpoint
        await pvm.disk("d0").write(i * 8192, bytes([i + 1]) * 4096)
    await pair.caught_up()
    await pair.kill_secondary()
    await pair.stop_primary()
    await pair.primary.close()
    pair.primary = await Store.open(pair.pdir, role="primary")
    pair.secondary = await Store.open(pair.sdir, role="secondary")
    await pair.start_secondary(port=port)
    await pair.start_primary()
    await pair.link("vm").replicate_checkpoint()
    await pair.assert_identical()
    st = pair.repl.status("vm")
    assert st["full_syncs"] == 0 and st["resyncs"] == 1
    assert st["resync"]["blocks_total"] < 64 and st["resync"]["blocks_sent"] == 5

    # Writes nobody tracked (the replicator was not running) cost a full, digest-compared sync.
    await pair.stop_primary()
    pvm = pair.primary.vm("vm")
    await pvm.disk("d0").write(SIZE - 4096, b"untracked")
    await pair.start_primary()
    with trio.fail_after(DEADLINE):
        await pair.link("vm").replicate_checkpoint()
    await pair.assert_identical()
    st = pair.repl.status("vm")
    assert st["full_syncs"] == 1 and st["resync"]["full"] and st["resync"]["blocks_total"] == SIZE // 4096
    assert st["resync"]["blocks_sent"] == 1
    assert not repl_errors()


async def test_sigkilled_secondary_process(pair, repl_errors) -> None:
    """SIGKILL at random points of a busy stream; each restart recovers to a checkpoint and catches up."""
    rng = random.Random(77)
    pair.primary = await Store.open(pair.pdir, role="primary", create=True)
    await pair.primary.create_disk("vm", "d0", SIZE)
    child = SecondaryChild(pair.sdir)
    await child.start(pair.nursery)
    await pair.start_primary(peer_port=child.port, key=None)
    pvm = pair.primary.vm("vm")
    img = bytearray(SIZE)
    stop = trio.Event()
    written = 0

    async def writer() -> None:
        nonlocal written
        while not stop.is_set():
            off, data = rand_write(rng, SIZE)
            await pvm.disk("d0").write(off, data)
            img[off : off + len(data)] = data
            written += 1
            await trio.sleep(0)

    async def more_writes(n: int) -> None:
        """The kill points are placed by the stream itself: after ``n`` more writes, however fast."""
        target = written + n
        await wait_until(lambda: written >= target, what=f"{n} more writes")

    async with trio.open_nursery() as n:
        n.start_soon(writer)
        for _ in range(3):
            for _ in range(rng.randrange(2, 5)):
                try:
                    await pair.link("vm").replicate_checkpoint(timeout=5)
                except CheckpointError:
                    pass
                await more_writes(rng.randrange(0, 30))
            await child.kill()
            await more_writes(rng.randrange(1, 30))  # the VM writes on while its secondary is dead
            await child.start(pair.nursery)
        stop.set()
    res = await pair.link("vm").replicate_checkpoint(timeout=DEADLINE)
    await child.kill()
    store = await Store.open(pair.sdir, role="secondary")
    try:
        svm = store.vm("vm")
        assert svm.state.last_checkpoint == res.seq == pvm.state.last_applied
        assert base_of(svm.disk("d0")) == bytes(img) == bytes(await pvm.disk("d0").read(0, SIZE))
        assert bytes(await svm.disk("d0").read(0, SIZE)) == bytes(img)
    finally:
        store.abandon()
    assert pair.repl.status("vm")["connects"] >= 4
    assert not repl_errors()
