"""The primary side: local writes reach base and the forwarding queue, in sequence order, with backpressure."""

from __future__ import annotations

import os

import trio

from colofs.core.forward import ForwardQueue

SIZE = 1 << 20


async def test_writes_are_forwarded_in_seq_order(open_store) -> None:
    store = await open_store("primary")
    disk = await store.create_disk("vm", "d", SIZE)
    vm = store.vm("vm")
    q = ForwardQueue()
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
    q = ForwardQueue(max_bytes=8192, max_writes=100)
    vm.forward = q
    done: list[int] = []

    async def writer(i: int) -> None:
        await disk.write(i * 4096, bytes([i + 1]) * 4096)
        done.append(i)

    async with trio.open_nursery() as n:
        for i in range(6):
            n.start_soon(writer, i)
        await trio.sleep(0.05)
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
    q = ForwardQueue()
    vm.forward = q

    async with trio.open_nursery() as n:
        for i in range(20):
            n.start_soon(disk.write, 100, bytes([i + 1]) * 10)
    batch = await q.get_batch(1 << 20)
    assert [w.seq for w in batch] == list(range(1, 21))
    # The last write in seq order is the one base holds.
    assert bytes(await disk.read(100, 10)) == bytes(batch[-1].data)
