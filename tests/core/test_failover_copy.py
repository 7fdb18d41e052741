"""A failover copies long runs of active into base in the kernel (``copy_file_range``), and stays correct.

Active has no digests to check, so a run of its blocks that is contiguous
in the log goes file to file; hidden's blocks and short runs are still read
through the view (digests checked) and written. Where the file system has
no ``copy_file_range`` the commit reads and writes instead; a copy that
fails half way leaves a failover that a restart completes (invariant 4).
"""

from __future__ import annotations

import errno
import os

import pytest

from colofs.core import PrimaryWrite, Store
from colofs.core.commitcopy import COPY_MIN
from colofs.core.errors import DiskIOError
from colofs.core.state import FAILOVER, PRIMARY

BS = 4096
SIZE = 8 << 20
LONG = 1 << 20  # a run of active well past COPY_MIN


def read_base(store: Store, offset: int, length: int) -> bytes:
    with open(os.path.join(store.path, "vm", "d", "base.raw"), "rb") as f:
        f.seek(offset)
        return f.read(length)


async def buffered(open_store):  # type: ignore[no-untyped-def]
    """A secondary with primary writes over data (hidden holds the old blocks), a long SVM run and short ones in active.

    Returns the store, VM, disk and the SVM's image V, which the failover must leave in base.
    """
    store = await open_store()
    await store.create_disk("vm", "d", SIZE)
    vm, disk = store.vm("vm"), store.disk("vm", "d")
    image = bytearray(b"A" * SIZE)
    await vm.apply_primary(1, [PrimaryWrite("d", 0, bytes(image))])
    await vm.checkpoint(1)
    # The primary's writes since the checkpoint: base gets B's, hidden keeps the A's, V (the SVM's view) the A's.
    await vm.apply_primary(2, [PrimaryWrite("d", 0, b"B" * (2 << 20))])
    long_run = bytes(range(256)) * (LONG // 256)
    await disk.write(3 << 20, long_run)
    image[3 << 20 : (3 << 20) + LONG] = long_run
    for i in range(8):  # short runs: scattered single blocks
        off = (5 << 20) + i * 8 * BS
        await disk.write(off, b"S" * BS)
        image[off : off + BS] = b"S" * BS
    await disk.write(BS, b"T" * BS)  # over a block hidden holds: V is active's
    image[BS : 2 * BS] = b"T" * BS
    return store, vm, disk, bytes(image)


def counting_copies(monkeypatch: pytest.MonkeyPatch, fail_on: int = 0, error: int = errno.EIO) -> list[int]:
    """Count ``os.copy_file_range``'s bytes; from call ``fail_on`` on (1-based, 0: never) raise ``error``."""
    copied: list[int] = []
    real = os.copy_file_range

    def copy(src: int, dst: int, count: int, offset_src: int | None = None, offset_dst: int | None = None) -> int:
        if fail_on and len(copied) + 1 >= fail_on:
            raise OSError(error, os.strerror(error))
        n = real(src, dst, count, offset_src, offset_dst)
        copied.append(n)
        return n

    monkeypatch.setattr(os, "copy_file_range", copy)
    return copied


async def test_a_failover_copies_long_runs_of_active_in_the_kernel(open_store, monkeypatch) -> None:
    store, vm, disk, image = await buffered(open_store)
    copied = counting_copies(monkeypatch)
    await vm.failover()
    assert sum(copied) == LONG  # the long run only: not hidden's blocks, not the short runs
    assert LONG >= COPY_MIN > BS
    assert vm.state.role == PRIMARY
    assert read_base(store, 0, SIZE) == image
    assert bytes(await disk.read(0, SIZE)) == image


async def test_without_copy_file_range_the_commit_reads_and_writes(open_store, monkeypatch) -> None:
    store, vm, disk, image = await buffered(open_store)
    counting_copies(monkeypatch, fail_on=1, error=errno.EXDEV)
    await vm.failover()
    assert disk._copy_ok is False  # noticed once, not retried for every run
    assert read_base(store, 0, SIZE) == image


async def test_a_copy_failing_half_way_leaves_a_failover_a_restart_completes(open_store, monkeypatch) -> None:
    store, vm, disk, image = await buffered(open_store)
    disk.commit_chunk = 256 << 10  # several steps over the long run
    copied = counting_copies(monkeypatch, fail_on=2)
    with pytest.raises(DiskIOError, match="copying"):
        await vm.failover()
    assert copied and disk.lock.held() == 0
    assert vm.state.phase == FAILOVER
    assert bytes(await disk.read(0, SIZE)) == image  # V is served throughout
    monkeypatch.undo()
    store.abandon()  # as if the process died here
    reopened = await open_store()
    rvm = reopened.vm("vm")
    assert rvm.recovery.action == "failover-completed"
    assert rvm.state.role == PRIMARY
    assert read_base(reopened, 0, SIZE) == image


async def test_a_snapshot_keeps_the_blocks_a_kernel_copy_overwrites(open_store, monkeypatch) -> None:
    """Copy-before-write still saves base's old blocks for a snapshot before a copy changes them."""
    store, vm, disk, image = await buffered(open_store)
    (snap,) = await vm.snapshot("s")  # a secondary's snapshot: the last checkpoint, all A's
    copied = counting_copies(monkeypatch)
    await vm.failover()
    assert sum(copied) == LONG
    assert read_base(store, 0, SIZE) == image
    assert bytes(await snap.read(0, SIZE)) == b"A" * SIZE
