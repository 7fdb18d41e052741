"""Requests that overlap in time: isolation, read-modify-write, checkpoint and failover under live I/O.

Reads are pushed off the page cache (``POSIX_FADV_DONTNEED``) and, in one
run of each test, sent to worker threads, so they really suspend in the
middle, which is where an unserialised copy-before-write would let the SVM
see the primary's data.
"""

from __future__ import annotations

import os
import random

import pytest
import trio
import trio.testing

from colofs.core import PrimaryWrite
from colofs.core.ioctx import IOContext
from colofs.core.rangelock import RangeLock
from tests.core.model import ModelDisk

SIZE = 256 * 1024
BS = 4096


def evict(fd: int) -> None:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


@pytest.fixture(params=["thread", "loop", "auto-busy"])
def read_path(request: pytest.FixtureRequest) -> IOContext:
    """Run each test with small reads in worker threads (they suspend mid-request), on the loop,
    and on the loop as under load (a page-cache miss starts its device read, then yields to
    the other requests before it waits for the data)."""
    io = IOContext("auto" if request.param == "auto-busy" else request.param)
    if request.param == "auto-busy":
        io.pending = lambda: True
    return io


@pytest.fixture
def open_store(open_store, read_path: IOContext):
    """The stores of these tests read through the I/O context of ``read_path``."""

    async def _open(role: str = "secondary", create: bool = True):
        return await open_store(role=role, create=create, io=read_path)

    return _open


async def test_reads_never_see_primary_writes_in_flight(open_store) -> None:
    store = await open_store()
    disk = await store.create_disk("vm", "d", SIZE, block_size=BS)
    vm = store.vm("vm")
    rng = random.Random(1)
    initial = rng.randbytes(SIZE)
    await disk.write(0, initial[:100])  # some SVM data in active too
    view = bytearray(initial[:100]) + bytearray(SIZE - 100)
    # Base starts zero; V is `view` and must never change while the primary writes.
    stop = trio.Event()
    reads = 0

    async def primary() -> None:
        seq = 0
        for _ in range(60):
            writes = []
            for _ in range(4):
                n = rng.choice([512, 4096, 20000, 65536])
                off = rng.randrange(0, SIZE - n)
                writes.append(PrimaryWrite("d", off, rng.randbytes(n)))
            seq = await vm.apply_primary(seq + 1, writes)
            await trio.sleep(0)
        stop.set()

    async def reader(seed: int) -> None:
        nonlocal reads
        r = random.Random(seed)
        while not stop.is_set():
            n = r.choice([1, 4096, 10000, 65536])
            off = r.randrange(0, SIZE - n)
            evict(disk.base_fd)
            evict(disk.hidden.fd)
            got = await disk.read(off, n)
            assert bytes(got) == bytes(view[off : off + n])
            reads += 1
            await trio.sleep(0)  # reads of holes never suspend; let the primary run

    async with trio.open_nursery() as n:
        n.start_soon(primary)
        for i in range(4):
            n.start_soon(reader, i)
    assert reads > 50


async def test_concurrent_partial_writes_to_one_block(open_store) -> None:
    """Sixteen 256-byte writes into the same blocks at once: read-modify-write must not lose any."""
    store = await open_store()
    disk = await store.create_disk("vm", "d", SIZE, block_size=BS)
    vm = store.vm("vm")
    await vm.apply_primary(1, [PrimaryWrite("d", 0, b"\x07" * SIZE)])
    expected = bytearray(SIZE)  # the primary's write is not part of V
    rng = random.Random(2)
    pieces = [(blk * BS + i * 256, bytes([blk * 16 + i + 1]) * 256) for blk in range(4) for i in range(16)]
    rng.shuffle(pieces)
    for off, data in pieces:
        expected[off : off + len(data)] = data

    async def put(off: int, data: bytes) -> None:
        evict(disk.base_fd)
        evict(disk.hidden.fd)
        await disk.write(off, data)

    async with trio.open_nursery() as n:
        for off, data in pieces:
            n.start_soon(put, off, data)
    assert bytes(await disk.read(0, SIZE)) == bytes(expected)


async def test_checkpoint_is_atomic_with_svm_writes(open_store) -> None:
    """A write done before the checkpoint began is dropped; one begun after it returned survives.

    The interleaving is driven by the writes themselves, not by time: the checkpoint starts once
    the writers have finished ``BEFORE`` writes, they keep writing while it runs, and they stop
    only after it has returned and ``AFTER`` more writes have begun.
    """
    store = await open_store()
    disk = await store.create_disk("vm", "d", SIZE, block_size=BS)
    vm = store.vm("vm")
    before, after = 40, 40
    phase = 0  # 0: before the checkpoint, 1: during it, 2: after it returned
    log: list[tuple[int, bytes, int, int]] = []  # block, data, phase at start, phase at end
    enough_before = trio.Event()
    enough_after = trio.Event()
    begun_after = 0

    async def writer(k: int) -> None:
        nonlocal begun_after
        i = 0
        while not enough_after.is_set():
            blk = (i * 7 + k) % (SIZE // BS)
            data = (i * 4 + k).to_bytes(4, "little") * (BS // 4)
            began = phase
            if began == 2:
                begun_after += 1
                if begun_after >= after:
                    enough_after.set()
            evict(disk.base_fd)
            await disk.write(blk * BS, data)
            log.append((blk, data, began, phase))
            if len(log) >= before:
                enough_before.set()
            i += 1
            await trio.sleep(0)

    async def checkpointer() -> None:
        nonlocal phase
        await enough_before.wait()
        phase = 1
        await vm.checkpoint()
        phase = 2

    async with trio.open_nursery() as n:
        for k in range(4):
            n.start_soon(writer, k)
        n.start_soon(checkpointer)
    assert any(b == 0 and e == 0 for _, _, b, e in log), "no write finished before the checkpoint"
    assert any(b == 2 for _, _, b, _ in log), "no write began after the checkpoint"
    last: dict[int, tuple[bytes, int, int]] = {}
    for blk, data, began, ended in log:
        last[blk] = (data, began, ended)
    for blk, (data, began, ended) in last.items():
        got = bytes(await disk.read(blk * BS, BS))
        if began == 2:
            assert got == data
        elif ended == 0:
            assert got == bytes(BS), f"block {blk} kept a write from before the checkpoint"
        else:
            assert got in (data, bytes(BS))


async def test_failover_commit_under_live_svm_io(open_store) -> None:
    store = await open_store()
    disk = await store.create_disk("vm", "d", SIZE, block_size=BS)
    vm = store.vm("vm")
    model = ModelDisk(SIZE, BS)
    rng = random.Random(3)
    seq = 0
    for _ in range(20):
        writes = []
        for _ in range(3):
            n = rng.choice([100, 4096, 30000])
            off = rng.randrange(0, SIZE - n)
            writes.append(PrimaryWrite("d", off, rng.randbytes(n)))
        seq = await vm.apply_primary(seq + 1, writes)
        for w in writes:
            model.primary_write(w.offset, bytes(w.data))
        n = rng.choice([7, 4096, 12000])
        off = rng.randrange(0, SIZE - n)
        data = rng.randbytes(n)
        await disk.write(off, data)
        model.svm_write(off, data)
    assert len(disk.hidden) and len(disk.active)
    disk.commit_chunk = 2 * BS  # many small steps, so SVM I/O really interleaves
    done = trio.Event()
    checked = 0

    async def svm() -> None:
        nonlocal checked
        r = random.Random(4)
        while not done.is_set():
            n = r.choice([1, 512, 4096, 9000])
            off = r.randrange(0, SIZE - n)
            if r.random() < 0.5:
                data = r.randbytes(n)
                await disk.write(off, data)
                # V semantics hold during the commit: the write is visible whole.
                model.svm_write(off, data)
            else:
                evict(disk.base_fd)
                got = await disk.read(off, n)
                assert bytes(got) == model.read(off, n)
                checked += 1
            await trio.sleep(0)

    async def fail_over() -> None:
        await vm.failover()
        done.set()

    async with trio.open_nursery() as n:
        n.start_soon(svm)
        n.start_soon(fail_over)
    assert checked > 5
    assert vm.state.role == "primary" and vm.state.epoch == 2
    assert len(disk.hidden) == len(disk.active) == 0
    with open(os.path.join(disk.path, "base.raw"), "rb") as f:
        assert f.read() == model.view()


async def test_rangelock_fifo_and_sharing() -> None:
    lock = RangeLock()
    order: list[str] = []
    a = await lock.acquire(0, 10, False)
    b = await lock.acquire(5, 15, False)  # shared with shared: no wait
    assert lock.held() == 2

    async def want(name: str, lo: int, hi: int, excl: bool) -> None:
        req = await lock.acquire(lo, hi, excl)
        order.append(name)
        await trio.sleep(0)  # hold the range across a yield, as a real request does
        lock.release(req)

    async with trio.open_nursery() as n:
        n.start_soon(want, "writer", 8, 9, True)
        await trio.testing.wait_all_tasks_blocked()  # the writer is queued behind a and b
        # A reader behind a waiting writer on the same range waits its turn...
        n.start_soon(want, "reader-behind", 8, 9, False)
        # ...while a request on a disjoint range goes ahead at once.
        n.start_soon(want, "disjoint", 100, 101, True)
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["disjoint"]
        lock.release(a)
        lock.release(b)
    assert order == ["disjoint", "writer", "reader-behind"]
    assert lock.held() == 0


async def test_rangelock_cancelled_waiter_leaves_no_trace() -> None:
    lock = RangeLock()
    held = await lock.acquire(0, 4, True)
    with trio.move_on_after(0.01) as scope:
        await lock.acquire(2, 3, False)
    assert scope.cancelled_caught
    lock.release(held)
    assert lock.held() == 0
    req = await lock.acquire(0, 4, True)  # free again, without waiting
    lock.release(req)


@pytest.mark.parametrize("bs", [512, 4096, 65536])
async def test_unaligned_io_across_block_sizes(open_store, bs: int) -> None:
    store = await open_store()
    size = 64 * bs
    disk = await store.create_disk("vm", f"d{bs}", size, block_size=bs)
    vm = store.vm("vm")
    model = ModelDisk(size, bs)
    rng = random.Random(bs)
    seq = 0
    for i in range(40):
        n = rng.randrange(1, 3 * bs)
        off = rng.randrange(0, size - n)
        data = rng.randbytes(n)
        if i % 2:
            seq = await vm.apply_primary(seq + 1, [PrimaryWrite(f"d{bs}", off, data)])
            model.primary_write(off, data)
        else:
            await disk.write(off, data)
            model.svm_write(off, data)
        # The last byte and a straddling read.
        assert bytes(await disk.read(size - 1, 1)) == model.read(size - 1, 1)
        lo = rng.randrange(0, size - bs)
        assert bytes(await disk.read(lo, bs)) == model.read(lo, bs)
    assert bytes(await disk.read(0, size)) == model.view()


async def test_range_lock_try_acquire_is_the_uncontended_fast_path() -> None:
    """try_acquire grants exactly when acquire would not wait, and never jumps a queued waiter."""
    lock = RangeLock()
    a = lock.try_acquire(0, 4, False)
    assert a is not None
    b = lock.try_acquire(2, 6, False)  # shared with shared: granted
    assert b is not None
    assert lock.try_acquire(3, 5, True) is None  # exclusive over held shared spans
    c = lock.try_acquire(10, 12, True)  # disjoint: granted
    assert c is not None
    got = trio.Event()

    async def writer() -> None:
        req = await lock.acquire(0, 2, True)
        got.set()
        lock.release(req)

    async with trio.open_nursery() as n:
        n.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        assert lock.try_acquire(1, 2, False) is None  # a queued exclusive waiter goes first
        assert lock.try_acquire(20, 22, False) is not None
        lock.release(a)
        lock.release(b)
    assert got.is_set()
    lock.release(c)
    assert lock.held() == 1
