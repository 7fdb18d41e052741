"""What ingesting primary writes costs the secondary: undo copies of zero blocks are records, not data.

A block of base that reads as zeros (a hole of a fresh disk) is saved in
hidden as a ZERO record, so ingesting into a fresh disk writes almost
nothing to hidden.log; a block saved once since the checkpoint is never
saved again. Recovery, snapshots and failover read those records as zeros.
"""

from __future__ import annotations

import errno
import os
import struct

import pytest

from colofs.core import PrimaryWrite, Store
from colofs.core.blocklog import BlockLog, file_header_len
from colofs.core.cbw import CopyBeforeWrite
from colofs.core.errors import DiskIOError, MapCorrupt
from colofs.core.ioctx import IOContext
from colofs.core.logformat import SEG_HDR, ZERO_AT, ZERO_BIT, records_digest, segment_header_len

BS = 4096
SIZE = 1 << 20


async def fresh(open_store):
    store = await open_store()
    await store.create_disk("vm", "d", SIZE)
    return store, store.vm("vm"), store.disk("vm", "d")


def hidden_size(store: Store) -> int:
    return os.path.getsize(os.path.join(store.path, "vm", "d", "hidden.log"))


def read_base(store: Store, offset: int, length: int) -> bytes:
    with open(os.path.join(store.path, "vm", "d", "base.raw"), "rb") as f:
        f.seek(offset)
        return f.read(length)


async def test_ingest_into_a_fresh_disk_writes_no_data_to_hidden(open_store) -> None:
    store, vm, disk = await fresh(open_store)
    writes = [PrimaryWrite("d", b * BS, bytes([b]) * BS) for b in range(1, 129, 2)]  # 64 scattered blocks
    writes.append(PrimaryWrite("d", 200 * BS, b"s" * (16 * BS)))  # and a run of 16
    await vm.apply_primary(1, writes)

    assert len(disk.hidden) == 80
    assert all(disk.hidden.map[b] == ZERO_AT for b in disk.hidden.map)
    # The file header and one segment header holding 80 records: no block of data.
    assert hidden_size(store) == file_header_len(BS) + segment_header_len(80, BS)
    assert bytes(await disk.read(0, 256 * BS)) == bytes(256 * BS)  # V is still the checkpoint's (zeros)
    assert read_base(store, 3 * BS, BS) == bytes([3]) * BS


async def test_a_crash_rolls_zero_records_back_to_zeros(open_store) -> None:
    store, vm, disk = await fresh(open_store)
    await vm.apply_primary(1, [PrimaryWrite("d", 0, b"A" * (4 * BS))])  # blocks 0-3 hold data at the checkpoint
    await vm.checkpoint(1)
    # Blocks 2-5: two saved with data ('A'), two as ZERO records (holes), in one segment.
    await vm.apply_primary(2, [PrimaryWrite("d", 2 * BS, b"B" * (4 * BS))])
    assert sorted(disk.hidden.map.items()) == [
        (2, disk.hidden.map[2]), (3, disk.hidden.map[3]), (4, ZERO_AT), (5, ZERO_AT)]
    assert hidden_size(store) == file_header_len(BS) + segment_header_len(4, BS) + 2 * BS
    store.abandon()  # the process dies: base holds B's, hidden the undo records

    store2 = await Store.open(store.path, role="secondary")
    try:
        disk2 = store2.disk("vm", "d")
        expected = b"A" * (4 * BS) + bytes(2 * BS)
        assert read_base(store2, 0, 6 * BS) == expected
        assert bytes(await disk2.read(0, 6 * BS)) == expected
        assert store2.vm("vm").state.last_applied == 1
    finally:
        await store2.close()


async def test_a_block_saved_since_the_checkpoint_is_not_saved_again(open_store) -> None:
    store, vm, disk = await fresh(open_store)
    await vm.apply_primary(1, [PrimaryWrite("d", 0, b"A" * (8 * BS))])
    await vm.checkpoint(1)
    await vm.apply_primary(2, [PrimaryWrite("d", 0, b"B" * (8 * BS))])
    size = hidden_size(store)
    await vm.apply_primary(3, [PrimaryWrite("d", 0, b"C" * (8 * BS)), PrimaryWrite("d", 2 * BS, b"D" * BS)])
    assert hidden_size(store) == size  # nothing appended: the checkpoint's blocks are there already
    assert bytes(await disk.read(0, 8 * BS)) == b"A" * (8 * BS)


async def test_a_snapshot_of_a_secondary_keeps_zero_records(open_store) -> None:
    store, vm, disk = await fresh(open_store)
    await vm.apply_primary(1, [PrimaryWrite("d", 0, b"A" * BS)])
    await vm.checkpoint(1)
    await vm.apply_primary(2, [PrimaryWrite("d", 0, b"B" * (3 * BS))])  # block 0 with data, 1-2 zero records
    (snap,) = await vm.snapshot("s")
    assert sorted(snap.target.map.items()) == [(0, snap.target.map[0]), (1, ZERO_AT), (2, ZERO_AT)]
    assert bytes(await snap.read(0, 4 * BS)) == b"A" * BS + bytes(3 * BS)


async def test_failover_commits_zero_records_as_zeros(open_store) -> None:
    store, vm, disk = await fresh(open_store)
    await vm.apply_primary(1, [PrimaryWrite("d", 0, b"P" * (6 * BS))])  # V: zeros; base: P's
    await disk.write(4 * BS, b"S" * BS)  # the SVM's own block on top of one of them
    assert await vm.failover() == 6
    expected = bytes(4 * BS) + b"S" * BS + bytes(BS)
    assert read_base(store, 0, 6 * BS) == expected
    assert bytes(await disk.read(0, 6 * BS)) == expected


def test_zero_records_survive_a_clean_close_and_a_crash(tmp_path) -> None:
    path = str(tmp_path / "h.log")
    log = BlockLog.create(path, BS, 1, mutable=False, label="t")
    log.append([7, 8], [b"x" * (2 * BS)], [1, 2, 3])
    log.append([], [], [9])
    log.drop([2])
    end = log.end
    log.close()
    for expected in (end, None):  # clean close, then as after a crash
        again = BlockLog.open(path, BS, 1, mutable=False, label="t", expected_len=expected, verify_data=True)
        try:
            assert again.map == {7: again.map[7], 8: again.map[7] + BS, 1: ZERO_AT, 3: ZERO_AT, 9: ZERO_AT}
            assert set(again.sums or {}) == {7, 8}
            assert again.end == end
        finally:
            again.close()


def test_a_zero_record_in_an_unflagged_segment_is_damage(tmp_path) -> None:
    """A reader must not take a ZERO record for a PUT of a huge block number (or the reverse)."""
    path = str(tmp_path / "h.log")
    log = BlockLog.create(path, BS, 1, mutable=False, label="t")
    log.append([], [], [5])
    end = log.end
    log.close()
    off = file_header_len(BS)
    with open(path, "r+b") as f:
        f.seek(off)
        head = bytearray(f.read(SEG_HDR.size + 16))
        magic, gen, nrec, flags, dd, _ = SEG_HDR.unpack(head[: SEG_HDR.size])
        assert struct.unpack("<Q", head[SEG_HDR.size : SEG_HDR.size + 8])[0] == 5 | ZERO_BIT
        new_head = SEG_HDR.pack(magic, gen, nrec, 0, dd, 0)[:32]  # the flag cleared, digest recomputed
        digest = records_digest(new_head, bytes(head[SEG_HDR.size :]))
        f.seek(off)
        f.write(new_head + struct.pack("<Q", digest))
    with pytest.raises(MapCorrupt, match="zero record"):
        BlockLog.open(path, BS, 1, mutable=False, label="t", expected_len=end, verify_data=True)


async def test_a_failover_step_that_fails_releases_its_locks_and_resumes(open_store) -> None:
    """Invariant 4: a commit failing half way leaves V served, the SVM writing, and failover resumable."""
    store, vm, disk = await fresh(open_store)
    await vm.apply_primary(1, [PrimaryWrite("d", 0, b"A" * (16 * BS))])
    await vm.checkpoint(1)
    await vm.apply_primary(2, [PrimaryWrite("d", 0, b"B" * (16 * BS))])
    await disk.write(20 * BS, b"S" * (4 * BS))
    disk.commit_chunk = 4 * BS
    real_write = disk.cbw.write
    calls = 0

    async def failing(extents, **kw) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise DiskIOError("injected: base write failed", errno.EIO)
        await real_write(extents, **kw)

    disk.cbw.write = failing
    with pytest.raises(DiskIOError, match="injected"):
        await vm.failover()
    assert disk.lock.held() == 0  # neither the failed step nor the one read ahead keeps its lock
    expected = b"A" * (16 * BS) + bytes(4 * BS) + b"S" * (4 * BS)
    assert bytes(await disk.read(0, 24 * BS)) == expected  # V is served throughout
    await disk.write(12 * BS, b"T" * BS)  # the SVM's writes go on
    disk.cbw.write = real_write
    assert await vm.failover() > 0
    expected = expected[: 12 * BS] + b"T" * BS + expected[13 * BS :]
    assert read_base(store, 0, 24 * BS) == expected


async def test_holes_of_base_are_not_read_and_fresh_data_is_never_taken_for_a_hole(tmp_path) -> None:
    """A hole is known zeros (no read); data just written, still only in the page cache, is data."""
    path = str(tmp_path / "base.raw")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    io = IOContext()
    try:
        os.ftruncate(fd, 64 * BS)
        os.pwrite(fd, b"D" * BS, 20 * BS)  # not synced: delayed allocation, if the file system has it
        os.pwrite(fd, bytes(BS), 40 * BS)  # zeros written as data
        reads: list[int] = []

        class Counting:
            """The store's I/O context, counting reads."""

            def __getattr__(self, name: str) -> object:
                return getattr(io, name)

            async def read_into(self, rfd: int, mv: memoryview, off: int) -> None:
                reads.append(off // BS)
                await io.read_into(rfd, mv, off)

        cbw = CopyBeforeWrite(fd, BS, "t", Counting())  # type: ignore[arg-type]
        target = BlockLog.create(str(tmp_path / "t.log"), BS, 1, mutable=False, label="t")
        cbw.attach(target)
        await cbw.save([1, 2, 3, 9, 10])
        assert reads == []  # all holes: nothing read from base
        assert all(target.map[b] == ZERO_AT for b in (1, 2, 3, 9, 10))
        await cbw.save([5, 20, 30, 40])
        assert 20 in reads
        assert target.map[40] == ZERO_AT and target.map[5] == ZERO_AT and target.map[30] == ZERO_AT
        assert target.map[20] != ZERO_AT
        buf = bytearray(BS)
        os.preadv(target.fd, [buf], target.map[20])
        assert bytes(buf) == b"D" * BS
        target.close()
    finally:
        io.close()
        os.close(fd)
