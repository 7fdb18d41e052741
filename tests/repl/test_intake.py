"""Intake: which batches a secondary's reader may receipt, ahead of the applier that checks them again."""

from __future__ import annotations

from types import SimpleNamespace

from colofs.repl.intake import Intake
from colofs.wire.messages import (
    Batch,
    Checkpoint,
    DiskAdd,
    DiskInfo,
    ResyncDone,
    ResyncQuery,
    Write,
)

DISKS = {"d0": SimpleNamespace(size=1 << 20, block_size=4096)}


def batch(first: int, n: int = 1, disk: int = 0, offset: int = 0, length: int = 4096) -> Batch:
    return Batch(first, tuple(Write(disk, offset, b"x" * length) for _ in range(n)))


def intake(next_seq: int = 11, synced: bool = True) -> Intake:
    return Intake(next_seq=next_seq, disk_names=["d0"], disks=DISKS, synced=synced, max_disks=4)


def test_batches_in_order_are_receipted_up_to_their_last_seq() -> None:
    it = intake()
    assert it.take(batch(11, 3)) == 13
    assert it.take(Checkpoint(13, 1)) is None
    assert it.take(batch(14)) == 14
    assert it.stopped is None


def test_a_batch_out_of_order_or_off_the_disk_stops_receipts_for_good() -> None:
    for bad in (batch(12), batch(10), batch(11, disk=1), batch(11, offset=(1 << 20) - 100)):
        it = intake()
        assert it.take(bad) is None
        assert it.stopped is not None
        assert it.take(batch(11)) is None  # the applier refuses the bad one: nothing after it is receipted


def test_no_receipt_during_a_resync_or_before_the_owed_full_sync() -> None:
    it = intake(synced=False)
    assert it.take(batch(11)) is None  # the applier refuses a stream write before the full sync
    it = intake(synced=False)
    assert it.take(ResyncQuery(0, 0, 16)) is None
    assert it.take(batch(11)) is None
    it = intake(synced=False)
    it.take(ResyncQuery(0, 0, 16))
    assert it.take(ResyncDone(40)) is None
    assert it.take(batch(41, 2)) == 42


def test_disk_add_extends_the_table_in_order() -> None:
    it = intake()
    assert it.take(DiskAdd(1, DiskInfo("d1", 8192, 4096))) is None
    assert it.take(batch(11, disk=1, length=8192)) == 11
    assert it.take(batch(12, disk=1, offset=4096, length=8192)) is None  # past d1's end
    it = intake()
    it.take(DiskAdd(2, DiskInfo("d1", 8192, 4096)))  # skips index 1
    assert it.stopped is not None and it.take(batch(11)) is None
    it = intake()
    it.take(DiskAdd(1, DiskInfo("d0", 1 << 20, 4096)))  # already at index 0
    assert it.stopped is not None
