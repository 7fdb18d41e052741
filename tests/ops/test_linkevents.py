"""The link and verify watchers wake on what changed, not on a clock.

They run against small stand-ins for the replicator, its links and its
verifies (the real ones are exercised end to end by test_events.py). After
each change the test waits until every task is blocked: a watcher that
only looked again after a sleep would not have emitted the event yet.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import trio
import trio.testing

from colofs.events import EventBus
from colofs.fs.linkevents import watch_links, watch_verifies
from colofs.repl.linkstate import CONNECTED, LinkState
from colofs.repl.resync import ResyncProgress
from colofs.repl.util import Signal
from colofs.repl.verifier import DONE, RUNNING
from tests.waiting import wait_until


class FakeLink:
    """What linkevents reads of a VMLink, changed the way VMLink changes it."""

    def __init__(self, vm: str) -> None:
        self.vm = SimpleNamespace(name=vm)
        self.peer = ("127.0.0.1", 7788)
        self.state = LinkState.IDLE
        self.ups = self.downs = 0
        self.last_error: str | None = None
        self.progress = ResyncProgress()
        self._changed = Signal()

    def set_state(self, state: LinkState) -> None:
        if (state in CONNECTED) != (self.state in CONNECTED):
            if state in CONNECTED:
                self.ups += 1
            else:
                self.downs += 1
        self.state = state
        self._changed.fire()

    def start_pass(self, total: int, full: bool, upto: int) -> None:
        self.progress.start(total, full, upto)
        self._changed.fire()

    def finish_pass(self) -> None:
        self.progress.finish()
        self._changed.fire()

    async def wait_changed(self) -> None:
        await self._changed.wait()


class FakePrimary:
    def __init__(self) -> None:
        self.links: dict[str, FakeLink] = {}
        self._added = Signal()

    def add(self, link: FakeLink) -> None:
        self.links[link.vm.name] = link
        self._added.fire()

    async def wait_link_added(self) -> None:
        await self._added.wait()


class Recorder:
    def __init__(self, bus: EventBus) -> None:
        self.events: list[dict[str, Any]] = []
        bus.watch(self.events.append)

    def kinds(self, vm: str) -> list[str]:
        return [e["event"] for e in self.events if e.get("vm") == vm]


async def test_a_link_added_later_is_watched_at_once():
    bus, primary = EventBus(), FakePrimary()
    seen = Recorder(bus)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_links, primary, bus)
        await trio.testing.wait_all_tasks_blocked()
        link = FakeLink("vm2")
        link.set_state(LinkState.STREAMING)  # it connected before anyone looked
        primary.add(link)
        await trio.testing.wait_all_tasks_blocked()
        assert seen.kinds("vm2") == ["peer-connected"]
        link.set_state(LinkState.DISCONNECTED)
        await trio.testing.wait_all_tasks_blocked()
        assert seen.kinds("vm2") == ["peer-connected", "peer-lost"]
        link.set_state(LinkState.REFUSED)
        await trio.testing.wait_all_tasks_blocked()
        assert seen.kinds("vm2")[-1] == "peer-refused"
        link.set_state(LinkState.STOPPED)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()


async def test_a_resync_pass_begun_and_ended_between_two_looks_is_reported():
    bus, primary = EventBus(), FakePrimary()
    seen = Recorder(bus)
    link = FakeLink("vm1")
    primary.add(link)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_links, primary, bus)
        link.set_state(LinkState.STREAMING)
        await trio.testing.wait_all_tasks_blocked()
        link.start_pass(8, False, 42)  # begun and ended before the watcher runs again
        link.progress.blocks_checked = 8
        link.finish_pass()
        await trio.testing.wait_all_tasks_blocked()
        assert seen.kinds("vm1") == ["peer-connected", "resync-started", "resync-done"]
        started = seen.events[-2]
        assert started["upto_seq"] == 42 and started["blocks_total"] == 8
        nursery.cancel_scope.cancel()


async def test_a_resync_pass_is_reported_when_it_starts_and_ends_with_no_clock(autojump_clock):
    """RESYNCING without a pass arms no timer; the pass's start and end wake the watcher."""
    bus, primary = EventBus(), FakePrimary()
    seen = Recorder(bus)
    link = FakeLink("vm1")
    primary.add(link)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_links, primary, bus)
        link.set_state(LinkState.RESYNCING)
        await trio.testing.wait_all_tasks_blocked()
        assert trio.lowlevel.current_statistics().seconds_to_next_deadline == float("inf"), \
            "a timer while no pass runs"
        t0 = trio.current_time()
        link.start_pass(100, True, 7)  # the pass starts after the state changed
        await trio.testing.wait_all_tasks_blocked()
        assert seen.kinds("vm1") == ["peer-connected", "resync-started"]
        assert trio.current_time() == t0  # no clock had to pass
        link.progress.blocks_checked = 50
        await wait_until(lambda: "resync-progress" in seen.kinds("vm1"), what="resync-progress")
        assert [e["percent"] for e in seen.events if e["event"] == "resync-progress"][-1] == 50.0
        t0 = trio.current_time()
        link.finish_pass()  # the state is still RESYNCING: the end of the pass alone wakes the watcher
        await trio.testing.wait_all_tasks_blocked()
        assert seen.kinds("vm1")[-1] == "resync-done"
        assert trio.current_time() == t0
        nursery.cancel_scope.cancel()


class FakeRun:
    def __init__(self, ident: int) -> None:
        self.id = ident
        self.state = RUNNING
        self.done = trio.Event()

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "phase": "comparing" if self.state == RUNNING else self.state,
                "percent": 10.0, "blocks_done": 1, "blocks_total": 10, "eta_s": None, "blocks_compared": 10,
                "blocks_differing": 0, "blocks_unverified": 0, "duration_s": 0.5, "error": None}


async def test_a_verify_that_ends_at_once_is_reported_when_it_ends(autojump_clock):
    bus = EventBus()
    seen = Recorder(bus)
    verifies = SimpleNamespace(runs={"vm1": FakeRun(1)})  # a run that ended before the mount: not news
    verifies.runs["vm1"].state = DONE
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_verifies, verifies, bus)
        await trio.testing.wait_all_tasks_blocked()
        t0 = trio.current_time()
        run = verifies.runs["vm1"] = FakeRun(2)
        bus.emit("verify-started", vm="vm1", id=2)
        run.state = DONE
        run.done.set()
        await trio.testing.wait_all_tasks_blocked()
        assert seen.kinds("vm1") == ["verify-started", "verify-done"]
        assert seen.events[-1]["id"] == 2 and seen.events[-1]["state"] == DONE
        assert trio.current_time() == t0  # no clock had to pass

        run = verifies.runs["vm1"] = FakeRun(3)
        bus.emit("verify-started", vm="vm1", id=3)
        await wait_until(lambda: "verify-progress" in seen.kinds("vm1"), what="verify-progress")
        run.state = DONE
        run.done.set()
        await trio.testing.wait_all_tasks_blocked()
        assert seen.events[-1]["event"] == "verify-done" and seen.events[-1]["id"] == 3
        nursery.cancel_scope.cancel()
