"""A resync pass wakes the link's waiters when it begins and when it is done.

The event stream (colofs/fs/linkevents.py) relies on this to report a pass
without looking at a clock. The test records what the link looks like at
each wake-up it fires: with the secondary's answers held back, nothing else
(no ACK, no RESYNC_DONE echo) can fire while the pass runs.
"""

from __future__ import annotations

import trio
import trio.testing

from colofs.repl.linkstate import LinkState
from colofs.repl.util import Signal
from tests.repl.conftest import wait_until

SIZE = 1 << 20


class RecordingSignal(Signal):
    """The link's change signal, noting the link's state and resync pass at every fire."""

    def __init__(self, link: object, old: Signal) -> None:
        self._event = old._event  # whoever waits on the old one is woken by this one
        self.link = link
        self.fires: list[tuple[LinkState, int, bool]] = []

    def fire(self) -> None:
        p = self.link.progress  # type: ignore[attr-defined]
        self.fires.append((self.link.state, p.passes, p.active))  # type: ignore[attr-defined]
        super().fire()


async def test_a_resync_pass_fires_the_change_signal_when_it_begins_and_ends(pair, repl_errors) -> None:
    proxy = await pair.start_proxied(SIZE)
    link = pair.link()
    await pair.primary.vm("vm").disk("d0").write(0, b"x" * 8192)
    await pair.caught_up()
    signal = link.life._changed = RecordingSignal(link, link.life._changed)
    before = link.progress.passes

    proxy.hold_down = True  # the secondary's digests, and so the end of the pass, are held back
    link.repair({"d0": [(0, 16)]})
    await wait_until(lambda: link.progress.passes == before + 1, what="the resync pass to begin")
    await trio.testing.wait_all_tasks_blocked()
    assert link.progress.active and link.state == LinkState.RESYNCING
    assert (LinkState.RESYNCING, before + 1, True) in signal.fires, "the pass began without a wake-up"

    proxy.release()
    await pair.caught_up()
    assert (LinkState.RESYNCING, before + 1, False) in signal.fires, "the pass ended without a wake-up"
    assert repl_errors() == []
