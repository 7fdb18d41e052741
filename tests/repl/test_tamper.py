"""An attacker on the path without the key rewrites BATCH data and fixes the xxh3 digest:
the secondary never applies it and the checkpoint behind it is never confirmed."""

from __future__ import annotations

import logging

import trio

from colofs.wire.messages import Batch, Message, Write
from tests.repl.conftest import file_bytes
from tests.repl.proxy import FaultProxy
from tests.waiting import wait_until

SIZE = 256 << 10
EVIL = b"EVIL"


def poison(msg: Message) -> Message | None:
    """Same seqs, same offsets, same lengths: only the data is the attacker's."""
    if not isinstance(msg, Batch):
        return None
    return Batch(msg.first_seq, tuple(Write(w.disk, w.offset, (EVIL * (len(w.data) // 4 + 1))[: len(w.data)])
                                      for w in msg.writes))


async def test_rewritten_batch_is_refused_and_its_checkpoint_not_confirmed(pair, caplog) -> None:
    caplog.set_level(logging.INFO, logger="colofs")
    await pair.open_stores()
    await pair.primary.create_disk("vm", "d0", SIZE)
    await pair.start_secondary()
    armed = [False]
    proxy = FaultProxy(pair.port, rewrite=lambda m: poison(m) if armed[0] else None)
    await pair.nursery.start(proxy.run)
    await pair.start_primary(peer_port=proxy.port)
    pvm = pair.primary.vm("vm")
    await pvm.disk("d0").write(0, b"A" * 8192)
    await pair.link("vm").replicate_checkpoint()
    svm = pair.secondary.vm("vm")
    before = (pvm.state.last_checkpoint, svm.state.last_checkpoint)

    armed[0] = True
    await pvm.disk("d0").write(0, b"B" * 8192)
    outcome: list[object] = []

    async def checkpoint() -> None:
        try:
            outcome.append(await pair.link("vm").replicate_checkpoint(timeout=120))
        except Exception as e:  # recorded for the assertion below
            outcome.append(e)

    refusals = lambda: [r.getMessage() for r in caplog.records  # noqa: E731
                        if "fails authentication" in r.getMessage() and r.name == "colofs.repl.receiver"]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(checkpoint)
        # Two forged batches refused (the primary reconnected and was forged again), or the
        # checkpoint came back: whichever comes first.
        await wait_until(lambda: outcome or (proxy.rewritten >= 2 and len(refusals()) >= 2),
                         60, "two forged batches refused, or the checkpoint's outcome")
        assert not outcome, f"the checkpoint behind a forged batch returned: {outcome}"
        assert "BadMac" in refusals()[0] or "bad frame (BadMac)" in refusals()[0]
        status = pair.server.status("vm")
        assert "fails authentication" in status["last_bad_frame"]
        assert "fails authentication" in (pair.link().last_error or "")
        # Nothing of the forged frames was applied, nothing confirmed.
        assert (pvm.state.last_checkpoint, svm.state.last_checkpoint) == before
        view = bytes(await svm.disk("d0").read(0, SIZE))
        assert EVIL not in view and EVIL not in file_bytes(f"{svm.disk('d0').path}/base.raw")
        assert view[:8192] == b"A" * 8192

        # The attacker leaves: the same checkpoint goes through, with the primary's data.
        armed[0] = False
        await wait_until(lambda: outcome, 60, "the checkpoint once the path is clean")
    assert not isinstance(outcome[0], Exception), outcome[0]
    assert svm.state.last_checkpoint > before[1]
    await pair.assert_identical()
