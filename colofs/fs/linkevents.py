"""A primary's link changes as events: peer connected or lost, refused, resync and verify progress.

Each VM's link announces every change of its state (``wait_changed``); a
task per link wakes on it, compares with what it saw last, and emits the
difference. While a resync runs it also reports progress every
:data:`PROGRESS_EVERY` seconds. New links (a VM created later) are picked up
as the replicator's own scan adds them.
"""

from __future__ import annotations

from typing import Any

import trio

from colofs.events import EventBus
from colofs.repl import PrimaryReplicator
from colofs.repl.linkstate import CONNECTED
from colofs.repl.sender import VMLink
from colofs.repl.verifier import Verifications

PROGRESS_EVERY = 1.0
SCAN_EVERY = 1.0


def current_state(ops: Any) -> list[dict[str, Any]]:
    """One ``exists`` event per VM of the mount (``ops``: its Operations): what a new listener starts from."""
    out = []
    for name, vm in sorted(ops.store.vms.items()):
        st = vm.status()
        out.append({"event": "exists", "vm": name, "role": st["role"], "phase": st["phase"],
                    "epoch": st["epoch"], "last_seq": st["last_applied"],
                    "peer": ops.repl.vm_status(vm).get("state")})
    return out


async def watch_links(primary: PrimaryReplicator, bus: EventBus) -> None:
    """Emit the changes of every link of ``primary`` until cancelled."""
    watched: set[str] = set()
    async with trio.open_nursery() as nursery:
        while True:
            for name, link in list(primary.links.items()):
                if name not in watched:
                    watched.add(name)
                    nursery.start_soon(_watch_link, link, bus)
            await trio.sleep(SCAN_EVERY)


async def _watch_link(link: VMLink, bus: EventBus) -> None:
    vm = link.vm.name
    peer = f"{link.peer[0]}:{link.peer[1]}"
    state = "idle"
    ups = downs = 0  # the link counts its ups and downs, so one that came and went before this task looked is told
    resync: dict[str, Any] = {"active": False}
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
            if new == "refused":
                bus.emit("peer-refused", vm=vm, peer=peer, role="primary", reason=link.last_error)
            state = new
        progress = link.progress.as_dict()
        now = trio.current_time()
        if progress["active"] and not resync["active"]:
            bus.emit("resync-started", vm=vm, peer=peer, full=progress["full"],
                     blocks_total=progress["blocks_total"], upto_seq=progress["upto_seq"])
            next_progress = now + PROGRESS_EVERY
        elif progress["active"] and now >= next_progress:
            bus.emit("resync-progress", vm=vm, peer=peer, percent=progress["percent"],
                     blocks_checked=progress["blocks_checked"], blocks_total=progress["blocks_total"],
                     blocks_sent=progress["blocks_sent"], eta_s=progress["eta_s"])
            next_progress = now + PROGRESS_EVERY
        elif resync["active"] and not progress["active"]:
            done = state in CONNECTED
            bus.emit("resync-done" if done else "resync-interrupted", vm=vm, peer=peer,
                     blocks_total=progress["blocks_total"], blocks_sent=progress["blocks_sent"],
                     bytes_sent=progress["bytes_sent"], elapsed_s=progress["elapsed_s"])
        resync = progress
        if link.state == "stopped":
            return
        with trio.move_on_after(PROGRESS_EVERY if progress["active"] else float("inf")):
            await link.wait_changed()


async def watch_verifies(verifies: Verifications, bus: EventBus) -> None:
    """Emit a running verify's progress every :data:`PROGRESS_EVERY` seconds, and its end with the outcome.

    ``verify-started`` is emitted where the verify is started; a run keeps its
    state in its own object, so its end is seen here, at most a second late.
    """
    # VM -> id of the last run whose end was reported (runs that ended before the mount are not news).
    ended = {vm: run.id for vm, run in verifies.runs.items()}
    while True:
        for vm, run in list(verifies.runs.items()):
            st = run.as_dict()
            if st["state"] == "running":
                bus.emit("verify-progress", vm=vm, id=run.id, phase=st["phase"], percent=st["percent"],
                         blocks_done=st["blocks_done"], blocks_total=st["blocks_total"], eta_s=st["eta_s"])
            elif ended.get(vm) != run.id:  # a run that ended quickly is reported though never seen running
                ended[vm] = run.id
                bus.emit("verify-done", vm=vm, id=run.id, state=st["state"], blocks_compared=st["blocks_compared"],
                         blocks_differing=st["blocks_differing"], blocks_unverified=st["blocks_unverified"],
                         duration_s=st["duration_s"], error=st["error"])
        await trio.sleep(PROGRESS_EVERY)
