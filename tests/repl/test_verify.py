"""Online verify between two stores in one process: exact differences, writes during the pass, cuts.

The secondary's copy is damaged behind colofs's back (bytes flipped in
``base.raw`` with a file descriptor of the test's own); the verify must find
exactly those blocks, a resync must repair them, and a final pass prove them
equal. Writes to the primary during the pass, and writes the secondary has
applied after its checkpoint, must never show as differences.
"""

from __future__ import annotations

import errno
import os
import random

import pytest
import trio
import xxhash

from colofs.repl.blockset import BlockSet
from colofs.repl.verifier import Verifications
from colofs.repl.verify import (
    Pacer,
    VerifyError,
    VerifyOptions,
    classify,
    parse_options,
    plan_queries,
)
from colofs.wire.messages import DiskInfo, Error, VerifyDigests, VerifyLiveQuery, VerifyQuery
from tests.repl.conftest import wait_until
from tests.repl.rawpeer import RawPrimary

BS = 4096
SIZE = 4 << 20  # 1024 blocks


async def _verifies(pair, nursery: trio.Nursery) -> Verifications:
    v = Verifications(pair.primary, pair.repl)
    await nursery.start(v.run)
    return v


def _flip(pair, blocks: list[int], disk: str = "d0") -> None:
    """Invert one byte in each block of the secondary's base.raw, bypassing colofs."""
    path = os.path.join(pair.secondary.vm("vm").disks[disk].path, "base.raw")
    fd = os.open(path, os.O_RDWR)
    try:
        for b in blocks:
            off = b * BS + 100
            old = os.pread(fd, 1, off) or b"\0"
            os.pwrite(fd, bytes([old[0] ^ 0xFF]), off)
        os.fsync(fd)
    finally:
        os.close(fd)


async def _filled_pair(pair) -> None:
    """One disk, data in its first half (the second half a hole), checkpointed on both sides."""
    await pair.open_stores()
    await pair.primary.create_disk("vm", "d0", SIZE)
    await pair.start_secondary()
    await pair.start_primary()
    rng = random.Random(7)
    disk = pair.primary.vm("vm").disk("d0")
    for off in range(0, SIZE // 2, 64 << 10):
        await disk.write(off, rng.randbytes(64 << 10))
    await pair.caught_up()
    await pair.link("vm").replicate_checkpoint()


async def _run(v: Verifications, opts: VerifyOptions, pair=None) -> dict:
    """Start a verify and wait for its report; with ``pair``, checkpoint whenever it waits for one."""
    run = v.start("vm", opts)
    while not run.done.is_set():
        await wait_until(lambda: run.done.is_set() or (pair is not None and run.phase == "waiting for a checkpoint"),
                         60, "the verify to finish or wait for a checkpoint")
        if not run.done.is_set():
            await pair.link("vm").replicate_checkpoint()
    return run.as_dict()


async def test_verify_finds_exactly_the_flipped_blocks_and_resync_repairs_them(pair, repl_errors) -> None:
    await _filled_pair(pair)
    async with trio.open_nursery() as nursery:
        v = await _verifies(pair, nursery)
        clean = await _run(v, VerifyOptions())
        assert (clean["state"], clean["blocks_differing"], clean["blocks_compared"]) == ("done", 0, 1024)

        flipped = [0, 5, 6, 300, 700]  # 700 lies in the hole: the flip allocates it on the secondary
        _flip(pair, flipped)
        found = await _run(v, VerifyOptions())
        assert found["state"] == "done", found
        assert found["blocks_differing"] == len(flipped)
        assert found["differing"] == [
            {"disk": "d0", "first_block": 0, "blocks": 1, "offset": 0, "bytes": BS},
            {"disk": "d0", "first_block": 5, "blocks": 2, "offset": 5 * BS, "bytes": 2 * BS},
            {"disk": "d0", "first_block": 300, "blocks": 1, "offset": 300 * BS, "bytes": BS},
            {"disk": "d0", "first_block": 700, "blocks": 1, "offset": 700 * BS, "bytes": BS},
        ]
        assert found["blocks_unverified"] == 0 and found["blocks_compared"] == 1024

        fixed = await _run(v, VerifyOptions(resync=True), pair)
        assert fixed["state"] == "done", fixed
        assert fixed["blocks_differing"] == 0
        assert fixed["resync"]["repaired"] == len(flipped) and fixed["resync"]["still_differing"] == 0
        assert fixed["resync"]["resync_blocks_sent"] >= len(flipped)
        assert fixed["resync"]["final_pass"] == "after a checkpoint" and fixed["blocks_compared"] == 1024

        # No checkpoint within checkpoint_wait: the final pass compares base to base instead.
        _flip(pair, [40])
        live = await _run(v, VerifyOptions(resync=True, checkpoint_wait=0.2))
        assert live["state"] == "done" and live["resync"]["final_pass"].startswith("live"), live
        assert (live["resync"]["repaired"], live["blocks_differing"]) == (1, 0)
        await pair.link("vm").replicate_checkpoint()

        await pair.link("vm").replicate_checkpoint()
        again = await _run(v, VerifyOptions())
        assert (again["state"], again["blocks_differing"], again["blocks_compared"]) == ("done", 0, 1024)
        nursery.cancel_scope.cancel()
    await pair.assert_identical()
    assert not repl_errors()


async def test_writes_during_the_pass_are_not_differences(pair, repl_errors) -> None:
    """Blocks the primary writes after the secondary's checkpoint (applied there or not) are rechecked."""
    await _filled_pair(pair)
    disk = pair.primary.vm("vm").disk("d0")
    rng = random.Random(11)
    async with trio.open_nursery() as nursery:
        v = await _verifies(pair, nursery)
        run = v.start("vm", VerifyOptions(rate=8e6))
        writes = 0
        with trio.fail_after(60):
            while not run.done.is_set():
                # Hot blocks everywhere, the pass's current position included; checkpoints between.
                for _ in range(8):
                    b = rng.randrange(1024)
                    await disk.write(b * BS, rng.randbytes(BS))
                    writes += 1
                if writes % 64 == 0:
                    await pair.link("vm").replicate_checkpoint()
                await trio.sleep(0)
        rep = run.as_dict()
        nursery.cancel_scope.cancel()
    assert rep["state"] == "done", rep
    assert rep["blocks_differing"] == 0, rep["differing"]
    assert rep["blocks_rechecked"] > 0  # the writes did hit compared blocks
    assert rep["blocks_compared"] + rep["blocks_unverified"] == 1024
    assert not repl_errors()


async def test_a_cut_during_the_pass_resumes_and_still_finds_the_flips(pair, repl_errors) -> None:
    proxy = await pair.start_proxied(SIZE)
    disk = pair.primary.vm("vm").disk("d0")
    await disk.write(0, os.urandom(SIZE // 2))
    await pair.caught_up()
    await pair.link("vm").replicate_checkpoint()
    _flip(pair, [3, 900])
    async with trio.open_nursery() as nursery:
        v = await _verifies(pair, nursery)
        run = v.start("vm", VerifyOptions(rate=4e6))  # ~1 s for the disk: the cut lands mid-pass
        await wait_until(lambda: run.blocks_done > 0, 30, "the verify to compare its first blocks")
        assert not run.done.is_set()
        proxy.cut_all()
        with trio.fail_after(60):
            await run.done.wait()
        rep = run.as_dict()
        nursery.cancel_scope.cancel()
    assert rep["state"] == "done", rep
    assert rep["interruptions"] >= 1
    assert rep["blocks_compared"] == 1024 and rep["blocks_done"] == 1024
    assert [(r["first_block"], r["blocks"]) for r in rep["differing"]] == [(3, 1), (900, 1)]
    assert pair.link().stats["connects"] >= 2
    assert not repl_errors()


async def test_blocks_written_after_the_checkpoint_are_settled_live(pair, repl_errors) -> None:
    """Blocks applied on the secondary after its checkpoint (new data in base, the old in hidden) differ
    from the checkpoint image; a live recheck settles them base to base: equal, or a real difference."""
    await _filled_pair(pair)
    disk = pair.primary.vm("vm").disk("d0")
    await disk.write(10 * BS, b"\x55" * (2 * BS))  # blocks 10 and 11
    await pair.caught_up()  # applied to the secondary's base, old content in hidden; no checkpoint
    assert {10, 11} <= set(pair.secondary.vm("vm").disks["d0"].hidden.map)
    _flip(pair, [11])  # rot in base after the write: the checkpoint image (hidden) cannot show it
    async with trio.open_nursery() as nursery:
        v = await _verifies(pair, nursery)
        rep = await _run(v, VerifyOptions())
        nursery.cancel_scope.cancel()
    assert rep["state"] == "done", rep
    assert [(r["first_block"], r["blocks"]) for r in rep["differing"]] == [(11, 1)]
    assert rep["blocks_rechecked"] == 2 and rep["blocks_unverified"] == 0 and rep["blocks_compared"] == 1024
    assert not repl_errors()


async def test_the_secondary_answers_verify_queries_and_refuses_bad_ones(pair, repl_errors) -> None:
    """A raw primary's VERIFY_QUERY gets the checkpoint image's digests; a bad one ends the session, changes nothing."""
    await _filled_pair(pair)
    pvm = pair.primary.vm("vm")
    at_checkpoint = bytes(await pvm.disk("d0").read(8 * BS, 16 * BS))
    await pvm.disk("d0").write(10 * BS, b"\x77" * BS)  # applied there after the checkpoint
    await pair.caught_up()
    now = bytes(await pvm.disk("d0").read(8 * BS, 16 * BS))
    await pair.stop_primary()
    svm = pair.secondary.vm("vm")
    before = (svm.state.last_applied, svm.state.last_checkpoint)
    assert before[0] == before[1] + 1

    def digests(buf: bytes) -> list[int]:
        return [xxhash.xxh3_64_intdigest(buf[i : i + BS]) for i in range(0, len(buf), BS)]

    raw = await RawPrimary.connect(pair.port, "vm", [DiskInfo("d0", SIZE, BS)], key=pair.key)
    try:
        await raw.send(VerifyQuery(77, 0, 8, 16))
        ans = await raw.receive()
        assert isinstance(ans, VerifyDigests)
        assert (ans.token, ans.disk, ans.first_block, ans.seq) == (77, 0, 8, before[1])
        assert list(ans.digests) == digests(at_checkpoint)  # the checkpoint's image: hidden over base
        await raw.send(VerifyLiveQuery(78, 0, 8, 16, 0))
        ans = await raw.receive()
        assert isinstance(ans, VerifyDigests) and (ans.token, ans.seq) == (78, before[0])
        assert list(ans.digests) == digests(now)  # base as of its last applied write
        await raw.send(VerifyQuery(79, 0, 1020, 5))  # past the disk's 1024 blocks
        closed, err = await raw.until_closed(30)
        assert closed and isinstance(err, Error) and "VERIFY_QUERY for blocks 1020+5" in err.message, err
    finally:
        await raw.aclose()
    raw = await RawPrimary.connect(pair.port, "vm", [DiskInfo("d0", SIZE, BS)], key=pair.key)
    try:
        await raw.send(VerifyLiveQuery(80, 0, 0, 1, 10**15))  # a seq no primary can have reached
        closed, err = await raw.until_closed(30)
        assert closed and isinstance(err, Error) and "is beyond any seq the primary" in err.message, err
    finally:
        await raw.aclose()
    assert (svm.state.last_applied, svm.state.last_checkpoint) == before
    assert not repl_errors()


async def test_a_verify_can_be_cancelled_and_a_second_one_is_refused_while_it_runs(pair) -> None:
    await _filled_pair(pair)
    async with trio.open_nursery() as nursery:
        v = await _verifies(pair, nursery)
        with pytest.raises(VerifyError, match="no disk nope"):
            v.start("vm", VerifyOptions(disks=("nope",)))
        run = v.start("vm", VerifyOptions(rate=1e6))  # 4 s for the disk
        with pytest.raises(VerifyError, match="is running") as busy:
            v.start("vm", VerifyOptions())
        assert busy.value.code == errno.EBUSY
        v.cancel("vm")
        with trio.fail_after(30):
            await run.done.wait()
        assert run.as_dict()["state"] == "cancelled"
        assert pair.link().verify_sink is None
        again = await _run(v, VerifyOptions(disks=("d0",)))
        assert (run.id, again["id"], again["state"]) == (1, 2, "done")
        nursery.cancel_scope.cancel()


def test_options_pace_and_classification() -> None:
    opts = parse_options({"disk": "d0.raw", "resync": True, "rate": 5})
    assert (opts.disks, opts.resync, opts.rate) == (("d0",), True, 5e6)
    assert parse_options({}).rate == 100e6
    for bad in ({"rate": 0}, {"rate": "fast"}, {"resync": 1}, {"disks": []}, {"disk": "a", "disks": ["b"]},
                {"frobnicate": 1}):
        with pytest.raises(VerifyError) as e:
            parse_options(bad)
        assert e.value.code == errno.EINVAL
    # No credit while idle: after a pause the next chunk waits its full share again.
    p = Pacer(1e6)
    assert p.delay(1_000_000, 10.0) == 0.0
    assert p.delay(1_000_000, 10.0) == pytest.approx(1.0)
    assert p.delay(500_000, 100.0) == 0.0
    assert p.delay(500_000, 100.0) == pytest.approx(0.5)
    # Mismatches: a block written after the checkpoint is rechecked, one not written differs.
    written = BlockSet(64)
    written.add(11, 12)
    assert classify(10, [1, 2, 3, 4], [1, 9, 9, 4], written) == ([12], [11])
    assert classify(10, [1, 2], [5, 6], None) == ([], [10, 11])
    assert [(q.first, q.count) for q in plan_queries([("d0", 600, 4096)], 1 << 20)] == [(0, 256), (256, 256), (512, 88)]
