"""async (COLO) and sync (protocol C) writes, the degraded state, and the persisted mode."""

from __future__ import annotations

import pytest
import trio

from colofs.repl import ReplConfigError, load_mode
from tests.repl.conftest import wait_until
from tests.waiting import DEADLINE

SIZE = 256 << 10


async def test_sync_waits_for_the_secondary_async_does_not(pair, repl_errors) -> None:
    proxy = await pair.start_proxied(SIZE)
    pvm = pair.primary.vm("vm")
    link = pair.link()
    assert pair.repl.mode("vm") == "async"

    proxy.hold_down = True  # acknowledgements stop reaching the primary
    with trio.fail_after(DEADLINE):  # bounds a hang only: an async write never waits for the ack
        await pvm.disk("d0").write(0, b"async")
    assert link.acked < pvm.state.last_applied

    await pair.repl.set_mode("vm", "sync")
    done = trio.Event()
    seq = pvm.state.last_applied + 1  # the sync write's sequence number
    svm = pair.secondary.vm("vm")

    async def sync_write() -> None:
        await pvm.disk("d0").write(4096, b"sync")
        done.set()

    pair.nursery.start_soon(sync_write)
    # The secondary applying the write (its receipt and ack now held by the proxy) comes after the
    # write would have completed had it not waited for the secondary.
    await wait_until(lambda: svm.state.last_applied >= seq, what="the secondary to apply the sync write")
    assert not done.is_set(), "a sync write completed before the secondary acknowledged it"
    assert pvm.state.last_applied == seq
    assert bytes(await pvm.disk("d0").read(4096, 4)) == b"sync"  # on the primary disk already
    proxy.release()
    with trio.fail_after(DEADLINE):
        await done.wait()
    assert link.tracking.received >= seq or link.acked >= seq  # it completed on the receipt (or the ack)
    await wait_until(lambda: link.acked >= seq, what="the ack of the applied write")
    assert pair.secondary.vm("vm").state.last_applied >= seq
    assert pair.repl.status("vm")["degraded"] is False

    # The secondary goes away: sync writes complete locally and the VM is reported degraded.
    await pair.stop_secondary()
    proxy.cut_all()
    await wait_until(lambda: link.state != "streaming", what="the link to drop")
    with trio.fail_after(DEADLINE):  # bounds a hang only: degraded sync writes do not wait
        for i in range(10):
            await pvm.disk("d0").write(i * 4096, b"degraded")
    st = pair.repl.status("vm")
    assert st["degraded"] is True and st["sync_degraded_writes"] >= 10 and st["mode"] == "sync"
    assert not repl_errors()


async def test_mode_is_persisted_and_validated(pair) -> None:
    await pair.open_stores()
    await pair.primary.create_disk("vm", "d0", SIZE)
    await pair.start_secondary()
    await pair.start_primary()
    with pytest.raises(ReplConfigError, match="one of async, sync"):
        await pair.repl.set_mode("vm", "full")
    await pair.repl.set_mode("vm", "sync")
    assert load_mode(pair.primary.vm("vm")) == "sync"
    await pair.stop_primary()
    await pair.start_primary()
    assert pair.repl.mode("vm") == "sync" and pair.link().tracking.mode == "sync"
    await pair.repl.set_mode("vm", "async")
    assert load_mode(pair.primary.vm("vm")) == "async"
