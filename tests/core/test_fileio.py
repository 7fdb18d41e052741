"""The file I/O policy on file systems that behave differently from ext4."""

from __future__ import annotations

import os
import subprocess

import pytest

from colofs.core import PrimaryWrite, Store
from tests.mountable import root_skip_reason
from tests.waiting import DEADLINE, wait_until


@pytest.fixture
def tmpfs(tmp_path):
    if (why := root_skip_reason()) is not None:
        pytest.skip(f"tmpfs test {why}")
    path = tmp_path / "tmpfs"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)], check=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=30)


async def test_store_on_a_file_system_without_rwf_nowait(tmpfs) -> None:
    """tmpfs refuses RWF_NOWAIT reads (EOPNOTSUPP): large reads must still work."""
    store = await Store.open(os.path.join(tmpfs, "store"), role="secondary", create=True)
    try:
        disk = await store.create_disk("vm", "d", 8 << 20)
        vm = store.vm("vm")
        data = os.urandom(3 << 20)
        await vm.apply_primary(1, [PrimaryWrite("d", 4096, data)])
        await vm.checkpoint(1)
        for _ in range(2):  # the second time the refusal is remembered
            assert bytes(await disk.read(4096, len(data))) == data
        await disk.write(100, data)
        assert bytes(await disk.read(100, len(data))) == data
    finally:
        store.abandon()


async def test_concurrent_syncs_of_one_file_share_device_flushes(tmp_path) -> None:
    """Sixteen writers syncing one file at once: every write durable, far fewer than 16 fdatasyncs."""
    import trio

    from colofs.core.ioctx import GroupSync

    syncs = GroupSync()
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    calls = 0
    real = os.fdatasync

    def counting(f: int) -> None:
        nonlocal calls
        calls += 1
        real(f)

    try:
        os.fdatasync = counting  # count the real system calls; they still happen
        async def writer(i: int) -> None:
            os.pwrite(fd, bytes([i]) * 4096, i * 4096)
            await syncs.datasync(fd)

        async with trio.open_nursery() as n:
            for i in range(16):
                n.start_soon(writer, i)
    finally:
        os.fdatasync = real
        os.close(fd)
    assert 1 <= calls <= 3
    with open(tmp_path / "f", "rb") as f:
        assert f.read() == b"".join(bytes([i]) * 4096 for i in range(16))


async def test_two_stores_syncs_share_no_state(tmp_path) -> None:
    """A sync in one store's context never waits for another store's: group commit is per context.

    Store A's ``fdatasync`` is held in its thread; store B syncing the same
    file must still run its own rather than join A's (process-wide state
    would make B wait for A).
    """
    import threading

    import trio

    from colofs.core.ioctx import GroupSync

    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    real = os.fdatasync
    release = threading.Event()
    calls: list[str] = []

    def held(f: int) -> None:
        first = not calls
        calls.append(threading.current_thread().name)
        if first:
            release.wait(2 * DEADLINE)  # A's sync: held until B's has gone through
        real(f)

    a, b = GroupSync(), GroupSync()
    try:
        os.fdatasync = held
        async with trio.open_nursery() as n:
            n.start_soon(a.datasync, fd)
            try:
                await wait_until(lambda: len(calls) == 1, what="store A's fdatasync to start")
                with trio.fail_after(DEADLINE):
                    await b.datasync(fd)
                assert len(calls) == 2
            finally:
                release.set()  # A's thread ends whatever happened, so the nursery can close
    finally:
        release.set()
        os.fdatasync = real
        os.close(fd)


async def test_worker_pool_runs_calls_concurrently_and_returns_their_outcome() -> None:
    """Four calls that only finish together: they run at once; values and exceptions come back."""
    import threading

    import trio

    from colofs.core.ioctx import WorkerPool

    pool = WorkerPool(16)
    barrier = threading.Barrier(4, timeout=DEADLINE)  # bounds a hang only
    results: list[int] = []

    async def one(i: int) -> None:
        results.append(await pool.run(lambda: barrier.wait() * 0 + i))

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as n:
            for i in range(4):
                n.start_soon(one, i)
    assert sorted(results) == [0, 1, 2, 3]
    with pytest.raises(ZeroDivisionError):
        await pool.run(lambda: 1 // 0)
    assert pool.in_flight == 0
    await trio.to_thread.run_sync(pool.close)  # every thread ends
    assert pool._threads == []


@pytest.mark.parametrize("busy", [False, True])
async def test_small_reads_missing_the_page_cache(tmp_path, busy: bool) -> None:
    """Cold small reads on the loop: exact data, with and without other requests waiting.

    When others wait, a read that misses the page cache yields after starting
    its device read; sixteen at once must each get their own bytes.
    """
    import random

    import trio

    from colofs.core.ioctx import IOContext

    data = os.urandom(4 << 20)
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    io = IOContext("auto")
    io.pending = (lambda: True) if busy else None
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        rng = random.Random(7)

        async def reader() -> None:
            for _ in range(40):
                off = rng.randrange(0, len(data) - 8192)
                n = rng.choice([1, 512, 4096, 8192])
                buf = bytearray(n)
                await io.read_into(fd, memoryview(buf), off)
                assert bytes(buf) == data[off : off + n]
            tail = bytearray(4096)  # past EOF: zeros
            await io.read_into(fd, memoryview(tail), len(data) - 100)
            assert bytes(tail) == data[-100:] + bytes(3996)

        async with trio.open_nursery() as nursery:
            for _ in range(16):
                nursery.start_soon(reader)
        assert io.kicked == 0
    finally:
        io.close()
        os.close(fd)
