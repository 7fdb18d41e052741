"""Which async batches wait for company: a small one does, one of half ``batch_max_bytes`` or more goes at once.

A batch waiting for company is not woken by more writes, only by the end of
its delay or a checkpoint marker; in a stream of large writes a wait let the
queue grow by everything written meanwhile. The clock here is a MockClock
that moves only when the test moves it, so "at once" means no time passed.
"""

from __future__ import annotations

import trio
import trio.testing

from colofs.core import Store
from colofs.core.forward import ForwardedWrite
from colofs.repl import batching
from colofs.repl.config import ASYNC, ReplConfig
from colofs.repl.framing import FrameSender
from colofs.repl.linkstate import Conn, LinkState
from colofs.repl.sender import VMLink
from colofs.wire import NonceRegistry
from colofs.wire.messages import Batch
from colofs.wire.stream import FrameStream

SIZE = 8 << 20


async def _drain(fs: FrameStream, got: trio.MemorySendChannel[Batch]) -> None:
    while True:
        msg = await fs.receive()
        if isinstance(msg, Batch):
            await got.send(msg)


async def _with_link(tmp_path, body) -> None:  # type: ignore[no-untyped-def]
    store = await Store.open(str(tmp_path / "p"), role="primary", create=True)
    try:
        await store.create_disk("vm", "d0", SIZE)
        vm = store.vm("vm")
        cfg = ReplConfig()
        link = VMLink(vm, ("127.0.0.1", 1), None, node_id="p", config=cfg, nonces=NonceRegistry())
        assert link.tracking.mode == ASYNC
        a, b = trio.socket.socketpair()
        ours, theirs = FrameStream(trio.SocketStream(a)), FrameStream(trio.SocketStream(b))
        conn = Conn(ours, FrameSender(ours), "s")
        conn.disk_index = {"d0": 0}
        conn.next_seq = 1
        link.life.move(LinkState.STREAMING)
        tx, got = trio.open_memory_channel[Batch](8)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain, theirs, tx)
            await body(link, conn, cfg, got, nursery)
            nursery.cancel_scope.cancel()
        await ours.aclose()
        await theirs.aclose()
    finally:
        await store.close()


async def test_a_batch_of_half_the_limit_is_sent_without_waiting(tmp_path, mock_clock) -> None:
    async def body(link, conn, cfg, got, nursery) -> None:  # type: ignore[no-untyped-def]
        half = cfg.batch_max_bytes // 4
        for seq in range(1, 3):  # half of batch_max_bytes in two writes
            link.tracking.put_nowait(ForwardedWrite(seq, "d0", seq * half, bytes([seq]) * half))
        start = trio.current_time()
        nursery.start_soon(link.batching.send_ready, conn, None)
        await trio.testing.wait_all_tasks_blocked()
        assert conn.sent_upto == 2
        batch = await got.receive()  # encoded in a worker thread: no time passes on this clock meanwhile
        assert (batch.first_seq, batch.last_seq) == (1, 2)
        assert trio.current_time() == start

    await _with_link(tmp_path, body)


async def test_a_small_batch_still_waits_for_company(tmp_path, mock_clock) -> None:
    async def body(link, conn, cfg, got, nursery) -> None:  # type: ignore[no-untyped-def]
        link.tracking.put_nowait(ForwardedWrite(1, "d0", 0, b"a" * 4096))
        nursery.start_soon(link.batching.send_ready, conn, None)
        await trio.testing.wait_all_tasks_blocked()
        link.tracking.put_nowait(ForwardedWrite(2, "d0", 4096, b"b" * 4096))  # company, during the wait
        assert conn.sent_upto == 0
        mock_clock.jump(batching.ASYNC_BATCH_DELAY)
        await trio.testing.wait_all_tasks_blocked()
        assert conn.sent_upto == 2
        batch = await got.receive()
        assert (batch.first_seq, batch.last_seq) == (1, 2)

    await _with_link(tmp_path, body)


async def test_a_waiting_batch_goes_out_once_the_queued_writes_would_fill_it(tmp_path, mock_clock) -> None:
    async def body(link, conn, cfg, got, nursery) -> None:  # type: ignore[no-untyped-def]
        link.tracking.put_nowait(ForwardedWrite(1, "d0", 0, b"a" * 4096))
        start = trio.current_time()
        nursery.start_soon(link.batching.send_ready, conn, None)
        await trio.testing.wait_all_tasks_blocked()
        per = cfg.batch_max_bytes // 8
        seq = 1
        while conn.sent_upto == 0:  # the wait ends by the write that fills the batch, not the clock
            seq += 1
            assert seq < 20, "a full batch was not sent"
            link.tracking.put_nowait(ForwardedWrite(seq, "d0", seq * per, bytes([seq]) * per))
            await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() == start
        batch = await got.receive()
        assert batch.first_seq == 1 and sum(len(w.data) for w in batch.writes) <= cfg.batch_max_bytes
        assert seq == 9  # 4 KiB + 8 x 1/8 reaches the limit with the 8th write of 1/8

    await _with_link(tmp_path, body)
