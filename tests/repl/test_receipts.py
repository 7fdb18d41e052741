"""Sync writes complete on the secondary's RECEIPT (it has the write), not on the ACK of its durable apply.

The receipt is negotiated in HELLO: a primary that does not ask gets none,
and a receipt it did not ask for, for a seq it has not sent, or going
backwards, ends the connection and changes nothing. A secondary that dies
with writes it only received loses nothing: the primary sends them again.
"""

from __future__ import annotations

import logging
import random
from dataclasses import replace

import pytest
import trio

from colofs.core import Store
from colofs.repl.handshake import FEATURE_RECEIPTS, handshake
from colofs.wire import FrameStream, NonceRegistry
from colofs.wire.messages import Attach, Attached, Batch, Ping, Pong, Receipt, Role
from colofs.wire.route import peek_route, read_route
from tests.repl.child import SecondaryChild
from tests.repl.conftest import base_of, wait_until
from tests.repl.test_end_to_end import rand_write
from tests.waiting import DEADLINE

SIZE = 256 << 10


class HeldApply:
    """Holds the secondary VM's applies (the durable part) until :meth:`release`; the rest of it runs."""

    def __init__(self, vm: object) -> None:
        self.vm = vm
        self.entered = trio.Event()
        self.gate = trio.Event()
        self._apply = vm.apply_primary  # type: ignore[attr-defined]
        vm.apply_primary = self  # type: ignore[attr-defined]

    async def __call__(self, start: int, writes: list) -> int:
        self.entered.set()
        await self.gate.wait()
        return await self._apply(start, writes)

    def release(self) -> None:
        self.gate.set()
        del self.vm.apply_primary  # type: ignore[attr-defined]


async def test_sync_write_completes_on_the_receipt_while_the_apply_is_held(pair, repl_errors) -> None:
    proxy = await pair.start_proxied(SIZE)
    pvm = pair.primary.vm("vm")
    svm = pair.secondary.vm("vm")
    link = pair.link()
    await pair.repl.set_mode("vm", "sync")
    held = HeldApply(svm)
    done = trio.Event()
    seq = pvm.state.last_applied + 1

    async def sync_write() -> None:
        await pvm.disk("d0").write(8192, b"received")
        done.set()

    try:
        proxy.hold_down = True  # what the secondary sends (its receipt) stops on the way
        pair.nursery.start_soon(sync_write)
        with trio.fail_after(DEADLINE):  # bounds a hang only
            await held.entered.wait()  # the batch passed the reader (receipt sent) and reached the apply
        assert not done.is_set(), "a sync write completed before its receipt reached the primary"
        proxy.release()
        with trio.fail_after(DEADLINE):  # without receipts it waits for the held apply: a hang, bounded
            await done.wait()
        assert svm.state.last_applied < seq, "the apply was held, yet the write is applied"
        assert link.acked < seq
        st = pair.repl.status("vm")
        assert st["received_seq"] >= seq and st["acked_seq"] < seq and st["receipts"] is True
        assert st["sync_degraded_writes"] == 0 and st["degraded"] is False
        assert bytes(await pvm.disk("d0").read(8192, 8)) == b"received"
    finally:
        held.release()
    await pair.caught_up()
    await pair.link().replicate_checkpoint()
    await pair.assert_identical()
    assert pair.server.sessions["vm"].stats["receipts"] >= 1
    assert not repl_errors()


@pytest.mark.parametrize("old", ["primary", "secondary"])
async def test_a_peer_without_receipts_gets_the_old_behaviour(pair, repl_errors, old) -> None:
    """Either side not announcing receipts: none are sent, sync writes complete on the applied ACK."""
    await pair.open_stores()
    await pair.primary.create_disk("vm", "d0", SIZE)
    pair.cfg = replace(pair.cfg, receipts=old != "secondary")
    await pair.start_secondary()
    await pair.start_primary(config=replace(pair.cfg, receipts=old != "primary"))
    await pair.caught_up()
    await pair.repl.set_mode("vm", "sync")
    pvm = pair.primary.vm("vm")
    for i in range(5):
        await pvm.disk("d0").write(i * 4096, b"old peer")
        assert pair.link().acked >= pvm.state.last_applied  # completed on the ACK of the apply
    st = pair.repl.status("vm")
    assert st["receipts"] is False and st["received_seq"] == 0 and st["sync_degraded_writes"] == 0
    assert pair.server.sessions["vm"].stats["receipts"] == 0
    assert not repl_errors()


class RawSecondary:
    """A hand-driven secondary: the handshake and ATTACHED done right, then the receipts a test chooses.

    It serves one connection: the primary's attempts after it are closed unanswered, so nothing of
    a later attach covers what the refused receipt left."""

    def __init__(self, announce: int) -> None:
        self.announce = announce
        self.port = 0
        self.batches: list[Batch] = []
        self.got_batch = trio.Event()
        self.fs: FrameStream | None = None
        self.closed = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._one, listeners)

    async def _one(self, stream: trio.SocketStream) -> None:
        if self.fs is not None:
            await trio.aclose_forcefully(stream)
            return
        try:
            if await peek_route(stream.socket, 5):  # the primary names the VM first, in clear
                await read_route(stream, 5)
            fs = FrameStream(stream)
            await handshake(fs, None, "raw-secondary", Role.SECONDARY, initiator=False, nonces=NonceRegistry(),
                            timeout=5, features=self.announce)
            self.fs = fs
            att = await fs.receive()
            assert isinstance(att, Attach)
            await fs.send(Attached(att.vm, att.epoch, att.next_seq - 1, 0, 0))
            while True:
                msg = await fs.receive()
                if isinstance(msg, Ping):
                    await fs.send(Pong(msg.token))
                elif isinstance(msg, Batch):
                    self.batches.append(msg)
                    self.got_batch.set()
        except Exception:
            self.closed.set()
        finally:
            await trio.aclose_forcefully(stream)


@pytest.mark.parametrize(("offer", "receipts", "error"), [
    (False, "ok", "did not ask for receipts"),
    (True, "ahead", "outside what was sent"),
    (True, "backwards", "outside what was sent"),
], ids=["not-asked-for", "not-yet-sent", "backwards"])
async def test_a_bad_receipt_is_refused_and_changes_nothing(pair, caplog, offer, receipts, error) -> None:
    caplog.set_level(logging.INFO, logger="colofs")
    raw = RawSecondary(FEATURE_RECEIPTS)
    await pair.nursery.start(raw.serve)
    pair.primary = await Store.open(pair.pdir, role="primary", create=True)
    await pair.primary.create_disk("vm", "d0", SIZE)
    await pair.start_primary(peer_port=raw.port, key=None, config=replace(pair.cfg, receipts=offer))
    link = pair.link()
    await wait_until(lambda: link.state == "streaming", what="the link to stream")
    pvm = pair.primary.vm("vm")
    for i in range(3):
        await pvm.disk("d0").write(i * 4096, b"x" * 4096)
    await wait_until(lambda: sum(len(b.writes) for b in raw.batches) == 3, what="three writes sent")
    assert raw.fs is not None
    last = raw.batches[-1].last_seq
    if receipts == "ok":
        await raw.fs.send(Receipt(last))
    elif receipts == "ahead":
        await raw.fs.send(Receipt(last + 1))
    else:
        await raw.fs.send(Receipt(last))
        await wait_until(lambda: link.tracking.received == last, what="the first receipt to be taken")
        await raw.fs.send(Receipt(last - 1))
    await wait_until(lambda: raw.closed.is_set(), what="the primary to drop the connection")
    await wait_until(lambda: any(error in r.getMessage() for r in caplog.records), what=f"the log to say {error!r}")
    assert link.tracking.received == (last if receipts == "backwards" else 0)
    assert link.acked == 0  # a receipt never counts as an ACK: nothing retained was dropped
    assert link.tracking.retained.start == 1


async def _last_applied(path: str) -> tuple[int, int]:
    store = await Store.open(path, role="secondary")
    try:
        st = store.vm("vm").state
        return st.last_applied, st.last_checkpoint
    finally:
        store.abandon()


async def test_secondary_killed_with_writes_only_received_loses_nothing(pair, repl_errors) -> None:
    """SIGKILL after receipts, before the apply: the restarted secondary gets the writes again."""
    rng = random.Random(13)
    size = 1 << 20
    pair.primary = await Store.open(pair.pdir, role="primary", create=True)
    await pair.primary.create_disk("vm", "d0", size)
    pvm = pair.primary.vm("vm")
    child = SecondaryChild(pair.sdir)
    await child.start(pair.nursery)
    await pair.start_primary(peer_port=child.port, key=None)
    img = bytearray(size)

    async def write(n: int) -> None:
        for _ in range(n):
            off, data = rand_write(rng, size)
            await pvm.disk("d0").write(off, data)
            img[off : off + len(data)] = data

    await write(30)
    c1 = (await pair.link().replicate_checkpoint()).seq
    await child.kill()
    await child.start(pair.nursery, "hold-apply")  # takes the stream, never applies it
    await pair.repl.set_mode("vm", "sync")
    link = pair.link()
    await wait_until(lambda: link.state == "streaming", what="the link to stream to the holding secondary")
    resyncs = pair.repl.status("vm")["resyncs"]
    with trio.fail_after(DEADLINE):  # bounds a hang only: each completes on its receipt
        await write(10)
    st = pair.repl.status("vm")
    assert st["received_seq"] == pvm.state.last_applied > st["acked_seq"] == c1
    assert st["sync_degraded_writes"] == 0
    await child.kill()
    assert await _last_applied(pair.sdir) == (c1, c1), "the writes only received were applied"

    await child.start(pair.nursery)
    res = await link.replicate_checkpoint(timeout=DEADLINE)
    assert res.seq == pvm.state.last_applied
    st = pair.repl.status("vm")
    assert st["resyncs"] == resyncs and st["full_syncs"] == 0, "resent from the retained writes"
    await child.kill()
    store = await Store.open(pair.sdir, role="secondary")
    try:
        svm = store.vm("vm")
        assert svm.state.last_checkpoint == res.seq
        assert base_of(svm.disk("d0")) == bytes(img) == bytes(await pvm.disk("d0").read(0, size))
    finally:
        store.abandon()
    assert not repl_errors()
