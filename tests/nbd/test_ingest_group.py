"""Ingest answers a write once it is queued in order and applies what accumulated as one group: one hidden sync."""

from __future__ import annotations

import errno
import os
import random
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio
import trio.testing

from colofs.nbd import ingest
from colofs.nbd import protocol as p
from tests.nbd.conftest import SIZE, Served
from tests.nbd.rawclient import RawClient, Reply
from tests.waiting import wait_until

BS = 4096
Op = tuple[int, int, int, bytes, int]  # type, offset, length, payload, flags


class Syncs:
    """``os.fdatasync`` as the core calls it, counted by file name; a file's syncs may be held or made to fail."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        self.hold: str | None = None  # syncs of this file wait for ``release``
        self.fail: str | None = None  # syncs of this file fail with EIO
        self.holding = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()
        orig = os.fdatasync

        def fdatasync(fd: int) -> None:
            name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
            with self._lock:
                self.calls.append(name)
            if name == self.fail:
                raise OSError(errno.EIO, "injected fdatasync failure")
            if name == self.hold:
                self.holding.set()
                assert self.release.wait(60), "the test never released the held sync"
            orig(fd)

        monkeypatch.setattr(os, "fdatasync", fdatasync)

    def count(self, name: str) -> int:
        with self._lock:
            return self.calls.count(name)


def requests(c: RawClient, ops: list[Op]) -> tuple[bytes, list[int]]:
    """The bytes of ``ops`` pipelined (sent in one go), and their cookies."""
    out = []
    cookies = []
    for typ, off, length, payload, flags in ops:
        cookie = next(c.cookies)
        if typ == p.CMD_READ:
            c.reads[cookie] = length
        out.append(p.pack_request(typ, cookie, off, length, flags) + payload)
        cookies.append(cookie)
    return b"".join(out), cookies


async def pipeline(c: RawClient, ops: list[Op]) -> list[Reply]:
    """Send ``ops`` at once; their replies in the order they came."""
    data, cookies = requests(c, ops)
    await c.send(data)
    replies = [await c.reply() for _ in ops]
    assert sorted(r.cookie for r in replies) == sorted(cookies)
    return replies


def write(off: int, data: bytes, flags: int = 0) -> Op:
    return (p.CMD_WRITE, off, len(data), data, flags)


def zeroes(off: int, length: int) -> Op:
    return (p.CMD_WRITE_ZEROES, off, length, b"", 0)


async def socket_client(s: Served, name: str) -> tuple[RawClient, socket.socket]:
    """A client over a real socket pair, and a duplicate of its end to peek at what the server sent."""
    a, b = trio.socket.socketpair()
    s.server.active += 1
    s.nursery.start_soon(s.server.handle, trio.SocketStream(b), "test")
    c = RawClient(trio.SocketStream(a))
    assert (await c.go(name))[-1][0] == p.REP_ACK
    return c, socket.socket(fileno=os.dup(a.fileno()))


def nothing_sent(peek: socket.socket) -> bool:
    try:
        return not peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True


@contextmanager
def released(syncs: Syncs) -> Iterator[None]:
    """However the test ends, a held sync is let go (no thread left waiting)."""
    try:
        yield
    finally:
        syncs.release.set()


def disk_image(s: Served) -> bytes:
    d = s.store.disk("vm", "d")
    return os.pread(d.base_fd, SIZE, 0)


async def test_pipelined_writes_cost_one_hidden_sync(serve, monkeypatch) -> None:
    s = await serve("secondary")
    disk = s.store.disk("vm", "d")
    c = await s.connect("vm/d:ingest")
    syncs = Syncs(monkeypatch)
    ops = [write(i * 2 * BS, bytes([i + 1]) * BS) for i in range(32)]
    replies = await pipeline(c, ops)
    assert all(r.error == 0 for r in replies), [(r.error, r.message) for r in replies]
    assert (await c.call(p.CMD_FLUSH, 0, 0)).error == 0  # answered once every write before it is applied
    assert syncs.count("hidden.log") == 1, syncs.calls  # one group, one durable save (was one per write)
    assert s.store.vm("vm").state.last_applied == 32  # still one sequence number per NBD write
    assert len(disk.hidden) == 32
    for i in range(32):
        assert await c.read(i * 2 * BS, BS) == bytes([i + 1]) * BS


async def test_a_group_is_bounded_and_a_long_write_zeroes_spans_groups(serve, monkeypatch) -> None:
    monkeypatch.setattr(ingest, "GROUP_BYTES", 64 << 10)
    monkeypatch.setattr(ingest, "ZERO_PIECE", 16 << 10)
    s = await serve("secondary")
    c = await s.connect("vm/d:ingest")
    replies = await pipeline(c, [write(0, b"x" * (1 << 20))])  # base holds data: hidden saves it
    assert replies[0].error == 0
    await s.store.vm("vm").checkpoint()
    syncs = Syncs(monkeypatch)
    ops = [write(i * BS, b"a" * BS) for i in range(32)] + [zeroes(256 << 10, 200 << 10)]
    replies = await pipeline(c, ops)
    assert all(r.error == 0 for r in replies), [(r.error, r.message) for r in replies]
    assert (await c.call(p.CMD_FLUSH, 0, 0)).error == 0
    # 128 KiB of writes: two groups of 64 KiB; 200 KiB of zeros in 16 KiB pieces: four groups, the last of 8 KiB.
    assert syncs.count("hidden.log") == 6, syncs.calls
    want = b"a" * (128 << 10) + b"x" * (128 << 10) + bytes(200 << 10) + b"x" * ((1 << 20) - (456 << 10))
    assert await c.read(0, 1 << 20) == want


async def test_later_writes_win_and_the_svm_gets_the_exact_image_at_the_checkpoint(serve) -> None:
    s = await serve("secondary")
    vm = s.store.vm("vm")
    pri = await s.connect("vm/d:ingest")
    svm = await s.connect("vm/d")
    rng = random.Random(13)
    model = bytearray(SIZE)
    for rnd in range(4):
        before = bytes(model)
        ops: list[Op] = []
        for i in range(rng.randrange(20, 60)):
            off = rng.randrange(0, 64) * 1024 + rng.randrange(0, 3) * 512  # a small area: many overlaps
            length = rng.randrange(1, 5) * 1024 + rng.randrange(0, 512)
            if rng.random() < 0.15:
                ops.append(zeroes(off, length))
                model[off : off + length] = bytes(length)
            else:
                data = bytes([rnd * 64 + i % 64 + 1]) * length
                ops.append(write(off, data, p.CMD_FLAG_FUA if rng.random() < 0.1 else 0))
                model[off : off + length] = data
        replies = await pipeline(pri, ops)
        assert all(r.error == 0 for r in replies), [(r.error, r.message) for r in replies]
        assert await pri.read(0, SIZE) == model  # the primary's image, in order
        assert await svm.read(0, SIZE) == before  # copy-before-write kept the last checkpoint's
        assert (await svm.write(rng.randrange(0, 64) * 1024, b"S" * 1024)).error == 0  # dropped at the checkpoint
        await vm.checkpoint()
        assert await svm.read(0, SIZE) == model
        assert disk_image(s) == model


async def test_writes_are_answered_while_applied_and_a_flush_waits_for_them(serve, monkeypatch) -> None:
    # The reply rule changed: a write is answered once queued (it used to wait for its group's hidden sync).
    s = await serve("secondary")
    c, peek = await socket_client(s, "vm/d:ingest")
    syncs = Syncs(monkeypatch)
    syncs.hold = "hidden.log"
    with peek, released(syncs):
        data, cookies = requests(c, [write(i * BS, b"h" * BS) for i in range(32)])
        await c.send(data)
        replies = [await c.reply() for _ in cookies]  # all answered while the apply is held
        assert all(r.error == 0 for r in replies)
        await wait_until(syncs.holding.is_set, what="the queue's hidden sync")
        flush = await c.request(p.CMD_FLUSH, 0, 0)
        await trio.testing.wait_all_tasks_blocked()
        assert nothing_sent(peek), "a flush was answered before the writes before it were applied"
        syncs.release.set()
        reply = await c.reply()
    assert reply.cookie == flush and reply.error == 0
    assert syncs.count("hidden.log") == 1
    assert disk_image(s)[: 32 * BS] == b"h" * (32 * BS)


async def test_a_read_sees_the_writes_answered_before_it(serve) -> None:
    s = await serve("secondary")
    c = await s.connect("vm/d:ingest")
    ops: list[Op] = [write(i * BS, bytes([i + 1]) * BS) for i in range(16)] + [(p.CMD_READ, 0, 16 * BS, b"", 0)]
    replies = await pipeline(c, ops)
    assert all(r.error == 0 for r in replies)
    read = next(r for r in replies if r.data)
    assert read.data == b"".join(bytes([i + 1]) * BS for i in range(16))


async def test_a_checkpoint_holds_every_write_answered_before_it(serve, monkeypatch) -> None:
    s = await serve("secondary")
    vm = s.store.vm("vm")
    c = await s.connect("vm/d:ingest")
    syncs = Syncs(monkeypatch)
    syncs.hold = "hidden.log"
    done = trio.Event()

    async def checkpoint() -> None:
        await vm.checkpoint()
        done.set()

    with released(syncs):
        replies = await pipeline(c, [write(i * BS, b"k" * BS) for i in range(32)])
        assert all(r.error == 0 for r in replies)
        await wait_until(syncs.holding.is_set, what="the queue's hidden sync")
        s.nursery.start_soon(checkpoint)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set(), "a checkpoint was taken before answered writes were applied"
        syncs.release.set()
        await done.wait()
    assert vm.state.last_checkpoint == 32
    assert disk_image(s)[: 32 * BS] == b"k" * (32 * BS)
    assert len(s.store.disk("vm", "d").hidden) == 0  # they are in the checkpoint, not after it


async def test_fua_in_a_group_waits_for_base_and_flush_for_every_earlier_write(serve, monkeypatch) -> None:
    s = await serve("secondary")
    c, peek = await socket_client(s, "vm/d:ingest")
    syncs = Syncs(monkeypatch)
    syncs.hold = "base.raw"
    with peek, released(syncs):
        data, cookies = requests(c, [write(0, b"f" * BS), write(BS, b"g" * BS, p.CMD_FLAG_FUA)])
        await c.send(data)
        await wait_until(syncs.holding.is_set, what="base's sync for the FUA write")
        await trio.testing.wait_all_tasks_blocked()
        assert nothing_sent(peek), "a group with a FUA write was answered before base was durable"
        syncs.release.set()
        replies = [await c.reply() for _ in cookies]
    assert all(r.error == 0 for r in replies)
    assert syncs.calls == ["hidden.log", "base.raw"]
    syncs.calls.clear()
    ops = [write(i * BS, b"w" * BS) for i in range(4, 12)] + [(p.CMD_FLUSH, 0, 0, b"", 0)]
    replies = await pipeline(c, ops)
    assert all(r.error == 0 for r in replies)
    flush_cookie = max(r.cookie for r in replies)
    assert replies[-1].cookie == flush_cookie  # the flush is answered after every write before it
    assert syncs.calls == ["hidden.log", "base.raw"]  # the group's save, then base for the flush


async def test_a_failed_apply_fails_the_flush_and_every_later_request(serve, monkeypatch, caplog) -> None:
    # The reply rule changed: the writes were answered already; what follows them learns of the failure.
    s = await serve("secondary")
    c = await s.connect("vm/d:ingest")
    syncs = Syncs(monkeypatch)
    syncs.fail = "hidden.log"
    replies = await pipeline(c, [write(i * BS, b"e" * BS) for i in range(8)])
    assert [r.error for r in replies] == [0] * 8
    assert (await c.call(p.CMD_FLUSH, 0, 0)).error == p.EIO
    assert syncs.count("hidden.log") == 1
    later = await pipeline(c, [write(64 * BS, b"l" * BS), (p.CMD_READ, 0, BS, b"", 0), (p.CMD_FLUSH, 0, 0, b"", 0)])
    assert [r.error for r in later] == [p.EIO] * 3, [(r.error, r.message) for r in later]
    assert syncs.count("hidden.log") == 1  # nothing after the failed write is applied
    assert any("applying 8 answered writes failed" in r.message for r in caplog.records)
