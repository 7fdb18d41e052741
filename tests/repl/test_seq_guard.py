"""Sequence numbers from a peer that holds the key are checked against the session before anything is recorded.

A RESYNC_DONE or CHECKPOINT far beyond the primary's last write would leave
the secondary with a checkpoint no primary can resume from; each is refused,
the session closed with the reason, and the real primary resumes afterwards.
"""

from __future__ import annotations

import logging

import pytest

from colofs.repl import ReplCode
from colofs.repl.errors import ReplProtocolError
from colofs.repl.seqguard import SeqGuard
from colofs.wire.messages import (
    Checkpoint,
    DiskInfo,
    Error,
    Message,
    ResyncBlock,
    ResyncData,
    ResyncDone,
    ResyncQuery,
    ResyncRequest,
)
from tests.repl.rawpeer import RawPrimary
from tests.waiting import DEADLINE

SIZE = 256 << 10
HUGE = 10**15


async def _refused(pair, frames: list[Message], reason: str) -> None:
    """Send ``frames`` as a raw primary with the key: answered as a real secondary would, then refused."""
    raw = await RawPrimary.connect(pair.port, "vm", [DiskInfo("d0", SIZE, 4096)], key=pair.key)
    try:
        for msg in frames:
            await raw.send(msg)
            if isinstance(msg, ResyncQuery):
                answer = await raw.receive()
                assert isinstance(answer, ResyncRequest), answer  # a resync may start: it is answered
        closed, err = await raw.until_closed(DEADLINE)
        assert closed, "the session stayed open"
        assert isinstance(err, Error) and err.code == ReplCode.BAD_REQUEST, err
        assert reason in err.message, err.message
    finally:
        await raw.aclose()


async def test_seq_games_are_refused_and_the_primary_resumes(pair, caplog, repl_errors) -> None:
    caplog.set_level(logging.INFO, logger="colofs")
    await pair.open_stores()
    await pair.primary.create_disk("vm", "d0", SIZE)
    await pair.start_secondary()
    await pair.start_primary()
    pvm = pair.primary.vm("vm")
    for i in range(4):
        await pvm.disk("d0").write(i * 4096, bytes([65 + i]) * 4096)
    await pair.link("vm").replicate_checkpoint()
    await pair.stop_primary()
    svm = pair.secondary.vm("vm")
    before = (svm.state.last_applied, svm.state.last_checkpoint)
    assert before == (4, 4)

    await _refused(pair, [ResyncQuery(0, 0, 1), ResyncDone(HUGE)],
                   "is beyond any seq the primary can have reached")
    await _refused(pair, [ResyncDone(HUGE)], "without a resync (no RESYNC_QUERY came)")
    await _refused(pair, [Checkpoint(HUGE, 7)], f"CHECKPOINT after seq {HUGE}")
    # This raw primary announced seq 0 at ATTACH: it cannot checkpoint the secondary's seq 4.
    await _refused(pair, [Checkpoint(4, 7)], "beyond the primary's last seq 0")
    await _refused(pair, [ResyncData(0, 4096, (ResyncBlock(0, bytes(4096)),))],
                   "RESYNC_DATA without a resync")
    assert (svm.state.last_applied, svm.state.last_checkpoint) == before
    assert "refused: RESYNC_DONE at seq 1000000000000000 is beyond" in caplog.text

    # The real primary comes back: no full sync, a confirmed checkpoint, identical images.
    await pair.start_primary()
    await pvm.disk("d0").write(0, b"Z" * 4096)
    result = await pair.link("vm").replicate_checkpoint()
    assert result.seq == pvm.state.last_applied
    await pair.caught_up()
    await pair.assert_identical()
    assert svm.state.last_checkpoint == pvm.state.last_applied
    assert pair.link().stats["full_syncs"] == 0
    assert repl_errors() == []


def test_resync_done_bounds() -> None:
    """The rules on their own: behind what was shown, beyond the rate bound, without a query."""
    g = SeqGuard(announced=10, last_applied=8, max_rate=1000, now=100.0)
    with pytest.raises(ReplProtocolError, match="without a resync"):
        g.check_done(10, 8, has_disks=True, now=100.0)
    g.took_query()
    with pytest.raises(ReplProtocolError, match="goes back behind seq 10"):
        g.check_done(9, 8, has_disks=True, now=100.0)
    g.check_done(10 + 1000, 8, has_disks=True, now=100.0)  # one second of slack
    with pytest.raises(ReplProtocolError, match="beyond any seq"):
        g.check_done(10 + 1001, 8, has_disks=True, now=100.0)
    g.check_done(10 + 3000, 8, has_disks=True, now=102.0)  # two seconds later
    g.took_done(3010, now=102.0)
    assert (g.next_seq, g.primary_seq, g.resyncing) == (3011, 3010, False)
    with pytest.raises(ReplProtocolError, match="beyond the primary's last seq 3010"):
        g.check_checkpoint(3011, 3011)
    g.check_checkpoint(3010, 3010)
    # A primary without disks ends a resync without a query, at the secondary's own seq only.
    bare = SeqGuard(announced=5, last_applied=5, max_rate=1000, now=0.0)
    bare.check_done(5, 5, has_disks=False, now=0.0)
    with pytest.raises(ReplProtocolError, match="without a resync"):
        bare.check_done(6, 5, has_disks=False, now=0.0)
