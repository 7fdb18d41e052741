"""Connections cut at random points (mid-frame, mid-batch, mid-resync, before acks): nothing lost, nothing twice."""

from __future__ import annotations

import logging
import random
from dataclasses import replace

import pytest
import trio

from colofs.repl import CheckpointError
from tests.repl.test_end_to_end import rand_write

SIZES = {"d0": 1 << 20, "d1": 192 << 10}


@pytest.mark.parametrize("backlog", [256 << 20, 96 << 10], ids=["retained", "dirty-bitmap"])
async def test_thirty_random_cuts_then_identical_images(pair, repl_errors, caplog, backlog) -> None:
    """With a small backlog bound, catching up after a cut is a dirty-block resync (cut too)."""
    rng = random.Random(1234 + backlog)
    pair.cfg = replace(pair.cfg, max_backlog_bytes=backlog)
    cutting = [True]

    def budget() -> int | None:
        # Small budgets cut handshakes and attaches, large ones cut batches and resyncs.
        if not cutting[0]:
            return None
        return rng.choice([rng.randrange(0, 400), rng.randrange(0, 20_000), rng.randrange(0, 400_000),
                           rng.randrange(0, 6_000_000)])

    await pair.open_stores()
    for name, size in SIZES.items():
        await pair.primary.create_disk("vm", name, size)
    await pair.start_secondary()
    proxy = await pair.start_proxy(budget)
    await pair.start_primary(peer_port=proxy.port)
    pvm = pair.primary.vm("vm")
    pimg = {n: bytearray(s) for n, s in SIZES.items()}
    confirmed = 0
    failed = 0
    with trio.fail_after(90):
        while proxy.cuts < 30 or confirmed < 5:
            for _ in range(rng.randrange(10, 80)):
                name = rng.choice(list(SIZES))
                off, data = rand_write(rng, SIZES[name])
                with trio.fail_after(5):  # writes never wait for the peer for long
                    await pvm.disk(name).write(off, data)
                pimg[name][off : off + len(data)] = data
                if rng.random() < 0.1 and pair.secondary.vms.get("vm") is not None:
                    svm = pair.secondary.vm("vm")
                    if name in svm.disks:
                        soff, sdata = rand_write(rng, SIZES[name])
                        await svm.disk(name).write(soff, sdata)
            try:
                res = await pair.link("vm").replicate_checkpoint(timeout=2.0)
            except CheckpointError:
                failed += 1
                continue
            confirmed += 1
            assert res.seq == pvm.state.last_applied
            for n in SIZES:
                assert bytes(await pvm.disk(n).read(0, SIZES[n])) == pimg[n]
            await pair.assert_identical()
    cutting[0] = False
    proxy.cut_all()
    await pair.link("vm").replicate_checkpoint(timeout=15)
    await pair.assert_identical()
    st = pair.repl.status("vm")
    assert proxy.cuts >= 30 and st["connects"] >= 10
    if backlog < 1 << 20:
        assert st["resyncs"] >= 5 and st["stream_breaks"] >= 1
    logging.getLogger(__name__).info("cuts %d, connects %d, checkpoints %d ok / %d failed, resyncs %d",
                                     proxy.cuts, st["connects"], confirmed, failed, st["resyncs"])
    # No replayed or skipped batch ever reached the core, and no bug surfaced.
    assert not [r for r in caplog.records if "applying failed" in r.getMessage()]
    assert not repl_errors()
