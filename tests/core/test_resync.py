"""Resynchronisation data is applied like primary writes: base changes, V does not, a crash undoes it."""

from __future__ import annotations

import os

import pytest

from colofs.core import PrimaryWrite, Store
from colofs.core.errors import RoleError, SequenceError

SIZE = 64 * 1024


async def test_resync_keeps_the_view_and_sets_the_sequence(open_store) -> None:
    store = await open_store()
    disk = await store.create_disk("vm", "d", SIZE)
    vm = store.vm("vm")
    await vm.apply_primary(1, [PrimaryWrite("d", 0, b"a" * 5000)])
    await vm.checkpoint(1)
    await disk.write(100, b"svm")
    await vm.apply_resync([PrimaryWrite("d", 4096, b"r" * 8192), PrimaryWrite("d", 0, b"b" * 10)])
    view = bytearray(b"a" * 5000 + bytes(SIZE - 5000))
    view[100:103] = b"svm"
    assert bytes(await disk.read(0, SIZE)) == bytes(view)
    with open(os.path.join(disk.path, "base.raw"), "rb") as f:
        base = f.read()
    assert base[:10] == b"b" * 10 and base[4096 : 4096 + 8192] == b"r" * 8192
    assert vm.state.last_applied == 1
    with pytest.raises(SequenceError, match="behind the last checkpoint 1"):
        await vm.finish_resync(0)
    await vm.finish_resync(7)
    assert vm.state.last_applied == 7
    await vm.apply_primary(8, [PrimaryWrite("d", 0, b"c")])
    # A crash rolls the resync back with everything else since the checkpoint.
    store.abandon()
    store2 = await Store.open(store.path, role="secondary")
    try:
        assert store2.vm("vm").recovery.resume_seq == 1
        assert bytes(await store2.disk("vm", "d").read(0, SIZE)) == b"a" * 5000 + bytes(SIZE - 5000)
    finally:
        store2.abandon()


async def test_resync_refused_on_a_primary(open_store) -> None:
    store = await open_store("primary")
    await store.create_disk("vm", "d", SIZE)
    with pytest.raises(RoleError, match="resync refused"):
        await store.vm("vm").apply_resync([PrimaryWrite("d", 0, b"x")])


async def test_primary_records_confirmed_checkpoints(open_store) -> None:
    store = await open_store("primary")
    disk = await store.create_disk("vm", "d", SIZE)
    vm = store.vm("vm")
    for i in range(5):
        await disk.write(i, b"x")
    assert await vm.record_confirmed_checkpoint(3) == 3
    assert vm.state.last_checkpoint == 3
    with pytest.raises(SequenceError, match=r"outside \[3, 5\]"):
        await vm.record_confirmed_checkpoint(2)
    with pytest.raises(SequenceError, match=r"outside \[3, 5\]"):
        await vm.record_confirmed_checkpoint(6)
    # A primary takes no checkpoint of its own: the two meanings have two names.
    with pytest.raises(RoleError, match="records the one its secondary holds"):
        await vm.checkpoint(5)
    assert vm.state.last_checkpoint == 3
    assert await vm.record_confirmed_checkpoint() == 5  # an unreplicated primary's: up to the last write
