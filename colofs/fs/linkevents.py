"""A primary's link changes as events: peer connected or lost, refused, resync and verify progress.

Nothing here polls. A link announces each change of its state
(``wait_changed``); a task per link wakes on it, compares with what it saw
last, and emits the difference. The replicator announces each link it adds
(``wait_link_added``), so a VM created later is watched from its first
connection. A verify is followed from its ``verify-started`` event to its
run's ``done``. A resync pass wakes the link's waiters when it begins and
when it ends. Only progress is timed: while a resync pass or a verify runs,
its progress is reported every :data:`PROGRESS_EVERY` seconds.
"""

from __future__ import annotations

from typing import Any, Protocol

import trio

from colofs.events import EventBus
from colofs.repl.linkstate import CONNECTED, LinkState
from colofs.repl.resync import ResyncProgress
from colofs.repl.util import Signal
from colofs.repl.verifier import RUNNING, Verifications, VerifyRun

PROGRESS_EVERY = 1.0


class _VM(Protocol):
    name: str


class WatchedLink(Protocol):
    """What this module reads of a :class:`~colofs.repl.sender.VMLink`."""

    vm: _VM
    peer: tuple[str, int]
    state: LinkState
    ups: int
    downs: int
    last_error: str | None
    progress: ResyncProgress

    async def wait_changed(self) -> None: ...


class Links(Protocol):
    """What this module reads of a :class:`~colofs.repl.PrimaryReplicator`."""

    @property
    def links(self) -> dict[str, Any]: ...

    async def wait_link_added(self) -> None: ...


def current_state(ops: Any) -> list[dict[str, Any]]:
    """One ``exists`` event per VM of the mount (``ops``: its Operations): what a new listener starts from."""
    out = []
    for name, vm in sorted(ops.store.vms.items()):
        st = vm.status()
        out.append({"event": "exists", "vm": name, "role": st["role"], "phase": st["phase"],
                    "epoch": st["epoch"], "last_seq": st["last_applied"],
                    "peer": ops.repl.vm_status(vm).get("state")})
    return out


async def watch_links(primary: Links, bus: EventBus) -> None:
    """Emit the changes of every link of ``primary``, each from when it is added, until cancelled."""
    watched: set[object] = set()  # the link objects watched: a VM's link made anew is watched anew
    async with trio.open_nursery() as nursery:
        while True:
            for link in list(primary.links.values()):
                if link not in watched:
                    watched.add(link)
                    nursery.start_soon(_watch_link, link, bus)
            await primary.wait_link_added()  # no await since the look: an addition cannot slip between


async def _watch_link(link: WatchedLink, bus: EventBus) -> None:
    vm = link.vm.name
    peer = f"{link.peer[0]}:{link.peer[1]}"
    state = LinkState.IDLE
    ups = downs = 0  # the link counts its ups and downs, so one that came and went before this task looked is told
    passes = 0  # resync passes reported as started: the link counts them, so a short one is told too
    shown: dict[str, Any] | None = None  # the pass reported as started and not yet as ended
    next_progress = 0.0
    while True:
        new = link.state
        while ups < link.ups or downs < link.downs:
            if ups <= downs:
                ups += 1
                bus.emit("peer-connected", vm=vm, peer=peer, role="primary")
            else:
                downs += 1
                bus.emit("peer-lost", vm=vm, peer=peer, role="primary", reason=link.last_error)
        if new != state:
            if new == LinkState.REFUSED:
                bus.emit("peer-refused", vm=vm, peer=peer, role="primary", reason=link.last_error)
            state = new
        progress = link.progress.as_dict()
        now = trio.current_time()
        if progress["passes"] > passes:  # a pass began since the last look (it may have ended already)
            passes = progress["passes"]
            if shown is not None:
                _resync_ended(bus, vm, peer, shown, done=False)
            bus.emit("resync-started", vm=vm, peer=peer, full=progress["full"],
                     blocks_total=progress["blocks_total"], upto_seq=progress["upto_seq"])
            shown = progress
            next_progress = now + PROGRESS_EVERY
        elif progress["active"] and now >= next_progress:
            bus.emit("resync-progress", vm=vm, peer=peer, percent=progress["percent"],
                     blocks_checked=progress["blocks_checked"], blocks_total=progress["blocks_total"],
                     blocks_sent=progress["blocks_sent"], eta_s=progress["eta_s"])
            next_progress = now + PROGRESS_EVERY
        if shown is not None and not progress["active"]:
            _resync_ended(bus, vm, peer, progress, done=state in CONNECTED)
            shown = None
        if state == LinkState.STOPPED:
            return
        # A pass wakes the link's waiters when it begins and ends, not per block: only its progress is timed.
        with trio.move_on_after(PROGRESS_EVERY if progress["active"] else float("inf")):
            await link.wait_changed()


def _resync_ended(bus: EventBus, vm: str, peer: str, progress: dict[str, Any], *, done: bool) -> None:
    bus.emit("resync-done" if done else "resync-interrupted", vm=vm, peer=peer,
             blocks_total=progress["blocks_total"], blocks_sent=progress["blocks_sent"],
             bytes_sent=progress["bytes_sent"], elapsed_s=progress["elapsed_s"])


async def watch_verifies(verifies: Verifications, bus: EventBus) -> None:
    """Follow each verify from its ``verify-started`` event: its progress each period, then its outcome.

    ``verify-started`` is emitted where the verify is started (right after
    :meth:`Verifications.start`); this task watches the bus for it, so it
    wakes only for a verify, and a run that ends at once is still reported.
    """
    started: dict[str, int] = {}  # VM -> id of its run to follow; at most one entry per VM
    arrived = Signal()
    following = True

    def on_event(event: dict[str, Any]) -> None:
        if following and event["event"] == "verify-started":
            started[event["vm"]] = event["id"]
            arrived.fire()

    bus.watch(on_event)
    try:
        async with trio.open_nursery() as nursery:
            while True:
                while started:
                    vm, ident = started.popitem()
                    run = verifies.runs.get(vm)
                    if run is not None and run.id == ident:
                        nursery.start_soon(_follow_verify, vm, run, bus)
                await arrived.wait()  # nothing awaited since the look: a start cannot slip between
    finally:
        following = False  # the bus keeps its watchers; this one now ignores what it is told


async def _follow_verify(vm: str, run: VerifyRun, bus: EventBus) -> None:
    while not run.done.is_set():
        with trio.move_on_after(PROGRESS_EVERY):
            await run.done.wait()
        st = run.as_dict()
        if st["state"] == RUNNING:
            bus.emit("verify-progress", vm=vm, id=run.id, phase=st["phase"], percent=st["percent"],
                     blocks_done=st["blocks_done"], blocks_total=st["blocks_total"], eta_s=st["eta_s"])
    st = run.as_dict()
    bus.emit("verify-done", vm=vm, id=run.id, state=st["state"], blocks_compared=st["blocks_compared"],
             blocks_differing=st["blocks_differing"], blocks_unverified=st["blocks_unverified"],
             duration_s=st["duration_s"], error=st["error"])
