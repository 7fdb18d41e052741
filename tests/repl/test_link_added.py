"""The replicator announces each link it adds, so its watchers (the event stream) need not rescan."""

from __future__ import annotations

import trio
import trio.testing

from tests.repl.conftest import Pair


async def test_attaching_a_new_vm_wakes_the_link_watchers_at_once(pair: Pair) -> None:
    await pair.open_stores()
    await pair.start_secondary()
    await pair.start_primary()
    woke: list[list[str]] = []

    async def watcher() -> None:
        await pair.repl.wait_link_added()
        woke.append(sorted(pair.repl.links))

    pair.nursery.start_soon(watcher)
    await trio.testing.wait_all_tasks_blocked()
    assert not woke
    await pair.primary.create_disk("vm2", "a", 128 << 10)
    pair.repl.attach_vm("vm2")  # what the daemon does right after creating a VM
    await trio.testing.wait_all_tasks_blocked()
    assert woke == [["vm2"]]
    pair.repl.attach_vm("vm2")  # a VM already replicated adds no link, and wakes nobody
    woke.clear()
    pair.nursery.start_soon(watcher)
    await trio.testing.wait_all_tasks_blocked()
    assert not woke
