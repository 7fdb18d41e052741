"""A worker stuck while starting (never ``ready``) is reported hung after the starting deadline,
with a log line and a ``worker-hung`` event, and answering pings does not make it serving."""

from __future__ import annotations

import logging
import os
import signal

import pytest
import trio

from colofs.events import EventBus
from colofs.workers.channel import WorkerArgs
from colofs.workers.fleet import Fleet
from colofs.workers.table import HUNG, STARTING, Table
from colofs.workers.zygote import Zygote
from tests.waiting import wait_until


def _entry(args: WorkerArgs) -> int:
    """A worker that never reports anything: it waits until killed."""
    signal.pause()
    return 0


def test_a_worker_stuck_starting_is_reported_hung(caplog: pytest.LogCaptureFixture) -> None:
    zygote = Zygote.fork(_entry)
    pids: list[int] = []

    async def main() -> None:
        bus = EventBus()
        seen: list[dict[str, object]] = []
        bus.watch(seen.append)
        table = Table(kill_after=0, start_timeout=1.0)
        fleet = Fleet(zygote=zygote, table=table, bus=bus, argv=[], mountpoint="/nonexistent",
                      budget_total=1 << 30)
        async with trio.open_nursery() as nursery:
            await nursery.start(fleet.run)
            w = await fleet.start("vm0")
            assert w.pid is not None
            pids.append(w.pid)
            assert w.state == STARTING and not fleet.settled("vm0")
            await wait_until(lambda: w.state == HUNG, 60, "the stuck worker reported hung")
            assert w.error == "still starting after 1 s" and fleet.settled("vm0")
            assert [e for e in seen if e.get("event") == "worker-hung"][0]["starting"] is True
            # It still answers nothing (no channel served), and a ping answer would not make it serving:
            assert table.answered(w, trio.current_time()) is False and w.state == HUNG
            table.ready(w, trio.current_time())  # its late ready is what ends it
            assert w.state == "serving" and w.error is None
            nursery.cancel_scope.cancel()

    caplog.set_level(logging.ERROR, logger="colofs.workers.fleet")
    try:
        with caplog.at_level(logging.ERROR, logger="colofs.workers.fleet"):
            trio.run(main)
        assert any("still starting after 1 s" in r.getMessage() and r.getMessage().endswith("hung")
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        zygote.close()
        zygote.wait()
