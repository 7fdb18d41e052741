"""A connection's requests served at once: a sync primary keeps the client's depth, and what must stay ordered does."""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio
import trio.testing

from colofs.core.forward import ForwardedWrite
from colofs.nbd import protocol as p
from colofs.nbd.service import NbdService
from tests.nbd.conftest import Served
from tests.nbd.rawclient import RawClient, Reply
from tests.sink import RecordingSink
from tests.waiting import DEADLINE, wait_until

BS = 4096


class HeldReceipts(RecordingSink):
    """A sync-mode forwarding sink whose secondary acknowledges a write only when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.items: list[ForwardedWrite] = []
        self.receipted: set[int] = set()
        self.waited: list[int] = []  # seqs whose writers were let go, in that order
        self.fail_at: int | None = None  # an offset whose write the sink refuses (the disk is full, say)
        self.all = False  # every write acknowledged at once
        self._changed = trio.Event()

    def put_nowait(self, item: ForwardedWrite) -> None:
        if item.offset == self.fail_at:
            raise OSError(errno.ENOSPC, "no room for the forwarded write")
        super().put_nowait(item)
        self.items.append(item)

    async def wait_acked(self, seq: int) -> None:
        while seq not in self.receipted and not self.all:
            await self._changed.wait()
        self.waited.append(seq)

    def receipt(self, *seqs: int) -> None:
        self.receipted.update(seqs or (w.seq for w in self.items))
        self._changed.set()
        self._changed = trio.Event()

    def release_all(self) -> None:
        """Let every writer go (a test's end: the requests under way are shielded from the teardown)."""
        self.all = True
        self.receipt()

    def seq_at(self, offset: int) -> int:
        return next(w.seq for w in self.items if w.offset == offset)


@pytest.fixture
async def held(serve) -> AsyncIterator[Callable[[], Awaitable[tuple[Served, HeldReceipts]]]]:
    """``await held()``: a sync-mode primary whose receipts the test gives; all given at the end, even on failure."""
    sinks: list[HeldReceipts] = []

    async def make() -> tuple[Served, HeldReceipts]:
        s = await serve("primary")
        sinks.append(HeldReceipts())
        s.store.vm("vm").forward = sinks[-1]
        return s, sinks[-1]

    try:
        yield make
    finally:
        for sink in sinks:
            sink.release_all()


async def _sync_primary(held) -> tuple[Served, HeldReceipts, RawClient]:
    s, sink = await held()
    return s, sink, await s.connect()


async def _replies(c: RawClient, n: int) -> list[Reply]:
    with trio.fail_after(DEADLINE):
        return [await c.reply() for _ in range(n)]


async def test_writes_of_one_connection_wait_for_their_receipts_together(held) -> None:
    s, sink, c = await _sync_primary(held)
    cookies = [await c.request(p.CMD_WRITE, i * BS, BS, payload=bytes([i + 1]) * BS) for i in range(8)]
    # Every write is in base and handed on while none has its receipt: served one by one, only the first would be.
    await wait_until(lambda: len(sink.items) == 8, what="all 8 writes forwarded before any receipt")
    assert sink.waited == []
    sink.receipt()
    got = await _replies(c, 8)
    assert sorted(r.cookie for r in got) == cookies and all(r.error == 0 for r in got)
    disk = s.store.disk("vm", "d")
    assert bytes(await disk.read(0, 8 * BS)) == b"".join(bytes([i + 1]) * BS for i in range(8))
    await c.disconnect()


async def test_replies_come_as_requests_complete_each_with_its_cookie(held) -> None:
    s, sink, c = await _sync_primary(held)
    slow = await c.request(p.CMD_WRITE, 0, BS, payload=b"s" * BS)
    fast = await c.request(p.CMD_WRITE, 8 * BS, BS, payload=b"f" * BS)
    read = await c.request(p.CMD_READ, 16 * BS, BS)
    c.reads[read] = BS
    await wait_until(lambda: len(sink.items) == 2, what="both writes forwarded")
    sink.receipt(sink.seq_at(8 * BS))  # the second write's receipt comes first
    first = await _replies(c, 2)
    assert {r.cookie for r in first} == {fast, read}
    assert all(r.error == 0 for r in first)
    assert next(r for r in first if r.cookie == read).data == bytes(BS)
    sink.receipt(sink.seq_at(0))
    (last,) = await _replies(c, 1)
    assert last.cookie == slow and last.error == 0
    await c.disconnect()


async def test_overlapping_requests_keep_their_order(held) -> None:
    s, sink, c = await _sync_primary(held)
    sink.all = True  # only the order is looked at
    n = 24
    cookies = []
    for i in range(n):  # each block written twice, then read, then one write over two blocks
        off = i * 2 * BS
        cookies.append(await c.request(p.CMD_WRITE, off, BS, payload=b"a" * BS))
        cookies.append(await c.request(p.CMD_WRITE, off, BS, payload=b"b" * BS))
        cookies.append(r := await c.request(p.CMD_READ, off, BS))
        c.reads[r] = BS
        cookies.append(await c.request(p.CMD_WRITE, off + BS // 2, BS, payload=b"c" * BS))
    got = {r.cookie: r for r in await _replies(c, len(cookies))}
    assert sorted(got) == sorted(cookies) and all(r.error == 0 for r in got.values())
    for i in range(n):
        assert got[cookies[4 * i + 2]].data == b"b" * BS  # after both writes before it, before the one after
    by_offset: dict[int, list[bytes]] = {}
    for w in sink.items:
        by_offset.setdefault(w.offset, []).append(bytes(w.data[:1]))
    assert all(by_offset[i * 2 * BS] == [b"a", b"b"] for i in range(n))
    disk = s.store.disk("vm", "d")
    assert bytes(await disk.read(0, BS)) == b"b" * (BS // 2) + b"c" * (BS // 2)
    await c.disconnect()


async def test_a_flush_waits_for_every_write_before_it(held) -> None:
    s, sink, c = await _sync_primary(held)
    disk = s.store.disk("vm", "d")
    flushed_after: list[list[int]] = []
    real_flush = disk.flush

    async def flush() -> None:  # what the writes before it had reached when the flush ran
        flushed_after.append(sorted(sink.waited))
        await real_flush()

    disk.flush = flush  # type: ignore[method-assign]
    writes = [await c.request(p.CMD_WRITE, i * BS, BS, payload=b"w" * BS) for i in range(4)]
    fl = await c.request(p.CMD_FLUSH, 0, 0)
    later = await c.request(p.CMD_WRITE, 32 * BS, BS, payload=b"l" * BS)  # after the flush: not covered, not held
    await wait_until(lambda: len(sink.items) == 5, what="the writes forwarded, the one after the flush too")
    sink.receipt(sink.seq_at(32 * BS))
    (first,) = await _replies(c, 1)
    assert first.cookie == later and flushed_after == []
    sink.receipt()
    got = await _replies(c, 5)
    assert [r.cookie for r in got][-1] == fl and sorted(r.cookie for r in got[:4]) == writes
    assert all(r.error == 0 for r in got)
    assert flushed_after == [sorted(w.seq for w in sink.items if w.offset < 4 * BS) + [sink.seq_at(32 * BS)]]
    await c.disconnect()


async def test_a_failed_write_answers_its_own_cookie(held) -> None:
    s, sink, c = await _sync_primary(held)
    sink.fail_at = 4 * BS
    held = await c.request(p.CMD_WRITE, 0, BS, payload=b"h" * BS)
    bad = await c.request(p.CMD_WRITE, 4 * BS, BS, payload=b"x" * BS)
    past = await c.request(p.CMD_WRITE, s.store.disk("vm", "d").size, BS, payload=b"x" * BS)
    await wait_until(lambda: len(sink.items) == 1, what="the good write forwarded")
    first = {r.cookie: r for r in await _replies(c, 2)}  # both failures, while the good write waits
    assert first[bad].error == p.ENOSPC and first[past].error == p.ENOSPC
    sink.receipt()
    (ok,) = await _replies(c, 1)
    assert ok.cookie == held and ok.error == 0
    await c.disconnect()


async def test_a_stop_lets_the_writes_under_way_finish(held, tmp_path) -> None:
    s, sink = await held()
    path = str(tmp_path / "nbd.sock")
    svc = await NbdService.start(s.nursery, s.store, None, socket_path=path, tcp=None)
    c = await RawClient.connect_unix(path)
    assert (await c.go("vm/d"))[-1][0] == p.REP_ACK
    big = os.urandom(1 << 20)  # large enough to be received into its own buffer
    for i in range(4):
        await c.request(p.CMD_WRITE, i << 20, 1 << 20, payload=big)
    await wait_until(lambda: len(sink.items) == 4, what="the 4 writes forwarded, waiting for receipts")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(svc.stop, DEADLINE)
        await trio.testing.wait_all_tasks_blocked()  # the stop has cancelled all it may cancel
        assert svc.server.active == 1 and sink.waited == []  # the connection waits for its writes
        sink.receipt()
    assert sorted(sink.waited) == [w.seq for w in sink.items] and svc.server.active == 0
    disk = s.store.disk("vm", "d")
    assert [bytes(await disk.read(i << 20, 1 << 20)) for i in range(4)] == [big] * 4
    await c.close()


class _FullAsyncSink(HeldReceipts):
    """An ``async``-mode sink with no room: a write waits in ``wait_room`` (served in line, not as a task)."""

    mode = "async"

    async def wait_room(self, nbytes: int) -> None:
        self.waiting += 1
        await trio.sleep_forever()


async def test_a_write_served_in_line_is_cancelled_once_the_grace_is_over(serve, tmp_path) -> None:
    s = await serve("primary")
    sink = _FullAsyncSink()
    s.store.vm("vm").forward = sink
    path = str(tmp_path / "nbd.sock")
    svc = await NbdService.start(s.nursery, s.store, None, socket_path=path, tcp=None)
    c = await RawClient.connect_unix(path)
    assert (await c.go("vm/d"))[-1][0] == p.REP_ACK
    await c.request(p.CMD_WRITE, 0, BS, payload=b"w" * BS)
    await wait_until(lambda: sink.waiting, what="the write waiting for room in the sink")
    with trio.fail_after(DEADLINE):
        await svc.stop(grace=0.2)
    assert svc.server.active == 0 and not os.path.exists(path)
    await c.close()


async def test_async_writes_and_reads_in_line_keep_their_order(serve) -> None:
    s = await serve("primary")
    sink = HeldReceipts()
    sink.mode = "async"  # type: ignore[attr-defined]
    sink.all = True
    s.store.vm("vm").forward = sink
    c = await s.connect()
    cookies, reads = [], {}
    for i in range(40):
        cookies.append(await c.request(p.CMD_WRITE, i * BS, BS, payload=bytes([i + 1]) * BS))
        reads[r := await c.request(p.CMD_READ, i * BS, BS)] = bytes([i + 1]) * BS
        c.reads[r] = BS
        cookies.append(await c.request(p.CMD_WRITE, i * BS, BS, payload=b"z" * BS))
    got = {r.cookie: r for r in await _replies(c, len(cookies) + len(reads))}
    assert sorted(got) == sorted(cookies + list(reads)) and all(r.error == 0 for r in got.values())
    assert all(got[r].data == want for r, want in reads.items())
    assert bytes(await s.store.disk("vm", "d").read(0, 40 * BS)) == b"z" * 40 * BS
    await c.disconnect()
