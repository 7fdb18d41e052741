"""The primary side: local writes reach base and the write sink, in sequence order, with backpressure."""

from __future__ import annotations

import os

import trio

from tests.sink import RecordingSink
from tests.waiting import DEADLINE, wait_until, wait_until_sync

SIZE = 1 << 20


async def test_writes_are_forwarded_in_seq_order(open_store) -> None:
    store = await open_store("primary")
    disk = await store.create_disk("vm", "d", SIZE)
    vm = store.vm("vm")
    q = RecordingSink()
    vm.forward = q
    await disk.write(10, b"abc")
    await disk.write(4090, b"x" * 20)
    batch = await q.get_batch(1 << 20)
    assert [(w.seq, w.disk, w.offset, bytes(w.data)) for w in batch] == [
        (1, "d", 10, b"abc"),
        (2, "d", 4090, b"x" * 20),
    ]
    with open(os.path.join(disk.path, "base.raw"), "rb") as f:
        base = f.read()
    assert base[10:13] == b"abc" and base[4090:4110] == b"x" * 20
    assert vm.state.last_applied == 2


async def test_full_queue_holds_writers_back_until_drained(open_store) -> None:
    store = await open_store("primary")
    disk = await store.create_disk("vm", "d", SIZE)
    vm = store.vm("vm")
    q = RecordingSink(max_bytes=8192)
    vm.forward = q
    done: list[int] = []

    async def writer(i: int) -> None:
        await disk.write(i * 4096, bytes([i + 1]) * 4096)
        done.append(i)

    async with trio.open_nursery() as n:
        for i in range(6):
            n.start_soon(writer, i)
        # The four writers that do not fit are parked in the sink's wait_room: a positive
        # sign that they are held back, rather than a guess at how long writing takes.
        await wait_until(
            lambda: q.waiting == 4,
            what="four writers waiting for room in the sink",
        )
        assert len(done) == 2 and q.bytes_queued == 8192  # the rest wait for room
        got = []
        while len(got) < 6:
            got += await q.get_batch(4096)
    assert sorted(done) == list(range(6))
    assert [w.seq for w in got] == list(range(1, 7))
    # Each forwarded write carries exactly what base holds.
    for w in got:
        assert bytes(await disk.read(w.offset, len(w.data))) == bytes(w.data)


async def test_same_block_writes_forward_in_base_order(open_store) -> None:
    store = await open_store("primary")
    disk = await store.create_disk("vm", "d", SIZE)
    vm = store.vm("vm")
    q = RecordingSink()
    vm.forward = q

    async with trio.open_nursery() as n:
        for i in range(20):
            n.start_soon(disk.write, 100, bytes([i + 1]) * 10)
    batch = await q.get_batch(1 << 20)
    assert [w.seq for w in batch] == list(range(1, 21))
    # The last write in seq order is the one base holds.
    assert bytes(await disk.read(100, 10)) == bytes(batch[-1].data)


async def test_no_seq_is_lost_while_the_state_file_is_written(open_store) -> None:
    """Writes that complete during a state save (a checkpoint here) keep their sequence numbers."""
    store = await open_store("primary")
    disk = await store.create_disk("vm", "d", SIZE)
    vm = store.vm("vm")
    q = RecordingSink()
    vm.forward = q
    done = trio.Event()

    async def writer() -> None:
        for i in range(300):
            await disk.write((i % 200) * 512, b"w" * 512)
            await trio.sleep(0)
        done.set()

    async def checkpointer() -> None:
        while not done.is_set():
            await vm.record_confirmed_checkpoint(vm.state.last_applied)
            await trio.sleep(0)

    async with trio.open_nursery() as n:
        n.start_soon(writer)
        n.start_soon(checkpointer)
    got = await q.get_batch(1 << 30)
    assert [w.seq for w in got] == list(range(1, 301))
    assert vm.state.last_applied == 300


async def test_primary_never_reuses_seqs_after_a_crash(open_store) -> None:
    from colofs.core import Store

    store = await open_store("primary")
    disk = await store.create_disk("vm", "d", SIZE)
    for i in range(5):
        await disk.write(i, b"x")
    vm = store.vm("vm")
    assert vm.state.last_applied == 5 and vm.state.seq_reserved >= 5
    reserved = vm.state.seq_reserved
    store.abandon()
    store2 = await Store.open(store.path, role="primary")
    try:
        vm2 = store2.vm("vm")
        assert vm2.state.last_applied == reserved
        q = RecordingSink()
        vm2.forward = q
        await vm2.disk("d").write(0, b"y")
        assert [w.seq for w in await q.get_batch(1 << 20)] == [reserved + 1]
        assert vm2.state.seq_reserved > reserved + 1
    finally:
        store2.abandon()


async def test_secondary_adopts_a_newer_epoch_only(open_store) -> None:
    from colofs.core import Store

    store = await open_store("secondary")
    await store.create_disk("vm", "d", SIZE)
    vm = store.vm("vm")
    await vm.adopt_epoch(5)
    assert vm.state.epoch == 5
    await vm.adopt_epoch(3)
    assert vm.state.epoch == 5
    await store.close()
    store2 = await Store.open(store.path, role="secondary")
    try:
        assert store2.vm("vm").state.epoch == 5
    finally:
        store2.abandon()


async def test_base_writeback_is_started_every_few_mib_off_the_loop(open_store, monkeypatch) -> None:
    """Large writes to base ask the writeback thread to start writing back every WRITEBACK_EVERY bytes."""
    from colofs.core import cbw

    kicked: list[int] = []
    monkeypatch.setattr(cbw, "WRITEBACK_EVERY", 128 << 10)
    store = await open_store("primary")
    monkeypatch.setattr(store.io.writeback, "kick", kicked.append)
    disk = await store.create_disk("vm", "d", SIZE)
    for i in range(5):  # 320 KiB in runs of 64 KiB: two kicks at 128 KiB each
        await disk.write(i * 65536, bytes([i]) * 65536)
    assert kicked == [disk.base_fd, disk.base_fd]
    assert bytes(await disk.read(4 * 65536, 4)) == b"\x04" * 4


async def test_small_scattered_writes_to_base_leave_writeback_to_the_kernel(open_store, monkeypatch) -> None:
    """A primary's 4 KiB overwrites never kick writeback: each kick cost them CPU and rewrote hot pages."""
    from colofs.core import cbw

    kicked: list[int] = []
    monkeypatch.setattr(cbw, "WRITEBACK_EVERY", 64 << 10)
    store = await open_store("primary")
    monkeypatch.setattr(store.io.writeback, "kick", kicked.append)
    disk = await store.create_disk("vm", "d", SIZE)
    for i in range(64):  # 256 KiB of 4 KiB writes, four times WRITEBACK_EVERY
        await disk.write((i * 7919 % 256) * 4096, bytes([i]) * 4096)
    assert kicked == []
    await disk.write(0, b"\x01" * (64 << 10))  # one run as large as WRITEBACK_MIN_RUN still counts
    assert kicked == [disk.base_fd]


def test_writeback_thread_coalesces_requests_per_file(monkeypatch) -> None:
    import threading

    from colofs.core import ioctx

    calls: list[int] = []
    release = threading.Event()

    def fake(fd: int) -> None:
        release.wait(DEADLINE)
        calls.append(fd)

    monkeypatch.setattr(ioctx, "start_writeback", fake)
    wb = ioctx.Writeback()
    wb.kick(7)  # taken at once; the thread then blocks in it
    wait_until_sync(lambda: not wb._fds, what="the writeback thread to take fd 7")
    for _ in range(5):
        wb.kick(8)  # queued meanwhile: served by one call
    release.set()
    wait_until_sync(lambda: 8 in calls, what="the call for fd 8")
    wb.kick(9)  # a marker: once it is served, any further call for fd 8 would have come before it
    wait_until_sync(lambda: 9 in calls, what="the call for fd 9")
    assert calls == [7, 8, 9]
    wb.close()  # the thread ends: the store joins it at close
    assert wb._thread is None
