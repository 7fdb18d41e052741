"""Every kind of bad input raises its own exception, names the disk and the problem, and writes nothing."""

from __future__ import annotations

import os

import pytest

from colofs.core import PrimaryWrite, Store
from colofs.core.blocklog import file_header_len
from colofs.core.errors import (
    AlreadyExists,
    BadArgument,
    BadRange,
    InvalidName,
    MapCorrupt,
    MapMissing,
    MapTruncated,
    NotFound,
    RoleError,
    SequenceError,
    StateCorrupt,
    StateMissing,
    StoreError,
    StoreVersionError,
)
from tests.core.conftest import snapshot_tree

SIZE = 64 * 1024


async def make(open_store, role: str = "secondary") -> Store:
    store = await open_store(role)
    await store.create_disk("vm", "disk0", SIZE)
    return store


def store_dir(store: Store) -> str:
    return store.path


async def test_write_past_end_and_negative(open_store) -> None:
    store = await make(open_store)
    disk = store.disk("vm", "disk0")
    before = snapshot_tree(store.path)
    for off, data in [(SIZE - 10, b"x" * 11), (SIZE, b"x"), (-1, b"x"), (1 << 60, b"x")]:
        with pytest.raises(BadRange, match="vm/disk0"):
            await disk.write(off, data)
    with pytest.raises(BadRange, match="negative"):
        await disk.read(0, -5)
    with pytest.raises(BadRange, match="past the disk's size"):
        await disk.read(SIZE - 1, 2)
    assert snapshot_tree(store.path) == before


async def test_primary_batch_past_end_changes_nothing(open_store) -> None:
    store = await make(open_store)
    vm = store.vm("vm")
    before = snapshot_tree(store.path)
    # The first write is fine, the second is not: the whole batch is refused.
    batch = [PrimaryWrite("disk0", 0, b"a" * 100), PrimaryWrite("disk0", SIZE - 1, b"bb")]
    with pytest.raises(BadRange, match="vm/disk0.*past the disk's size"):
        await vm.apply_primary(1, batch)
    with pytest.raises(BadRange, match="negative"):
        await vm.apply_primary(1, [PrimaryWrite("disk0", -4, b"a")])
    with pytest.raises(BadRange, match="empty write"):
        await vm.apply_primary(1, [PrimaryWrite("disk0", 0, b"")])
    with pytest.raises(NotFound, match="no disk 'nope'"):
        await vm.apply_primary(1, [PrimaryWrite("nope", 0, b"a")])
    with pytest.raises(BadArgument, match="empty batch"):
        await vm.apply_primary(1, [])
    assert vm.state.last_applied == 0
    assert snapshot_tree(store.path) == before


async def test_sequence_backwards_replayed_or_skipping(open_store) -> None:
    store = await make(open_store)
    vm = store.vm("vm")
    await vm.apply_primary(1, [PrimaryWrite("disk0", 0, b"1" * 10), PrimaryWrite("disk0", 5, b"2")])
    assert vm.state.last_applied == 2
    before = snapshot_tree(store.path)
    with pytest.raises(SequenceError, match="seq 2 replays or goes backwards.*next expected seq is 3"):
        await vm.apply_primary(2, [PrimaryWrite("disk0", 0, b"x")])
    with pytest.raises(SequenceError, match="seq 1 replays"):
        await vm.apply_primary(1, [PrimaryWrite("disk0", 0, b"x")])
    with pytest.raises(SequenceError, match="seq 5 skips"):
        await vm.apply_primary(5, [PrimaryWrite("disk0", 0, b"x")])
    assert snapshot_tree(store.path) == before
    assert vm.state.last_applied == 2


async def test_checkpoint_for_unapplied_sequence(open_store) -> None:
    store = await make(open_store)
    vm = store.vm("vm")
    await vm.apply_primary(1, [PrimaryWrite("disk0", 0, b"1")])
    await store.disk("vm", "disk0").write(100, b"svm")
    with pytest.raises(SequenceError, match="checkpoint at seq 7, but the last applied seq is 1"):
        await vm.checkpoint(7)
    with pytest.raises(SequenceError, match="checkpoint at seq 0"):
        await vm.checkpoint(0)
    # Nothing was dropped by the refused checkpoints.
    assert bytes(await store.disk("vm", "disk0").read(100, 3)) == b"svm"
    assert vm.state.last_checkpoint == 0
    assert await vm.checkpoint(1) == 1


async def test_roles_refuse_what_does_not_fit(open_store) -> None:
    store = await make(open_store, role="primary")
    vm = store.vm("vm")
    with pytest.raises(RoleError, match="VM vm: primary writes refused, the VM is primary"):
        await vm.apply_primary(1, [PrimaryWrite("disk0", 0, b"x")])
    with pytest.raises(RoleError, match="failover of a primary"):
        await vm.failover()


async def test_bad_creation_arguments(open_store) -> None:
    store = await open_store()
    with pytest.raises(BadArgument, match="block size must be a power of two"):
        await store.create_disk("vm", "d", SIZE, block_size=3000)
    with pytest.raises(BadArgument, match="block size"):
        await store.create_disk("vm", "d", SIZE, block_size=256)
    with pytest.raises(BadArgument, match="positive multiple of 512"):
        await store.create_disk("vm", "d", 1000)
    with pytest.raises(BadArgument, match="positive multiple of 512"):
        await store.create_disk("vm", "d", 0)
    for bad in ["", "a/b", ".hidden", "x" * 65, "with space", "snap@shot", "\x00"]:
        with pytest.raises(InvalidName):
            await store.create_disk("vm", bad, SIZE)
    await store.create_disk("vm", "d", SIZE)
    with pytest.raises(AlreadyExists, match="vm/d already exists"):
        await store.create_disk("vm", "d", SIZE)
    with pytest.raises(NotFound, match="no disk 'e'"):
        store.disk("vm", "e")
    with pytest.raises(NotFound, match="no VM 'other'"):
        store.vm("other")


# -- damaged stores: each raises its own error; the VM is quarantined, nothing rewritten --


async def closed_store(open_store) -> str:
    store = await make(open_store)
    vm = store.vm("vm")
    await vm.apply_primary(1, [PrimaryWrite("disk0", 0, b"p" * 9000)])
    await store.disk("vm", "disk0").write(3, b"s" * 5000)
    await store.close()
    return store.path


async def store_open_fails(path: str, exc: type[Exception], match: str) -> None:
    before = snapshot_tree(path)
    with pytest.raises(exc, match=match):
        await Store.open(path, role="secondary")
    assert snapshot_tree(path) == before


async def reopen_fails(path: str, exc: type[Exception], match: str) -> None:
    """Opening the VM raises ``exc``; opening the store quarantines that VM and rewrites none of its files."""
    from colofs.core.ioctx import IOContext
    from colofs.core.vm import VM

    before = snapshot_tree(path)
    with pytest.raises(exc, match=match):
        await VM.open(os.path.join(path, "vm"), IOContext())
    assert snapshot_tree(path) == before
    store = await Store.open(path, role="secondary")
    try:
        vm = store.vm("vm")
        assert vm.damage is not None and vm.status()["phase"] == "damaged"
        assert vm.disks == {}
    finally:
        store.abandon()
    after = snapshot_tree(path)
    marker = os.path.join("vm", "damaged.json")
    if exc is not StoreVersionError:
        assert {k for k in after if marker in k}, "the damage is recorded"
    assert {k: v for k, v in after.items() if marker not in k} == before


async def test_missing_state(open_store) -> None:
    path = await closed_store(open_store)
    os.unlink(os.path.join(path, "vm", "state"))
    # Without its state file the VM is quarantined, naming the file; it never silently vanishes.
    await reopen_fails(path, StateMissing, "VM vm: state file .* is missing")


async def test_truncated_state(open_store) -> None:
    path = await closed_store(open_store)
    state = os.path.join(path, "vm", "state")
    data = open(state, "rb").read()
    open(state, "wb").write(data[: len(data) // 2])
    await reopen_fails(path, StateCorrupt, "VM vm: state file is truncated")


async def test_corrupt_state(open_store) -> None:
    path = await closed_store(open_store)
    state = os.path.join(path, "vm", "state")
    data = bytearray(open(state, "rb").read())
    i = data.index(b'"epoch":1') + len(b'"epoch":')
    data[i] = ord("7")
    open(state, "wb").write(bytes(data))
    await reopen_fails(path, StateCorrupt, "VM vm: state file fails its checksum")


async def test_state_of_another_version(open_store) -> None:
    path = await closed_store(open_store)
    state = os.path.join(path, "vm", "state")
    data = open(state, "rb").read().replace(b"COLOFS-VM-STATE 1", b"COLOFS-VM-STATE 2", 1)
    open(state, "wb").write(data)
    await reopen_fails(path, StoreVersionError, "state format '2', this colofs reads format 1")


async def test_store_of_another_version(open_store) -> None:
    path = await closed_store(open_store)
    marker = os.path.join(path, "colofs-store")
    data = open(marker, "rb").read().replace(b"COLOFS-STORE 1", b"COLOFS-STORE 9", 1)
    open(marker, "wb").write(data)
    await store_open_fails(path, StoreVersionError, "store format '9'")


async def test_not_a_store(tmp_path) -> None:
    os.mkdir(tmp_path / "plain")
    with pytest.raises(StateMissing, match="not a colofs store"):
        await Store.open(str(tmp_path / "plain"), role="secondary")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    with pytest.raises(StoreError, match="non-empty directory"):
        await Store.open(str(tmp_path / "full"), role="secondary", create=True)


@pytest.mark.parametrize("layer", ["hidden.log", "active.log"])
async def test_missing_map(open_store, layer: str) -> None:
    path = await closed_store(open_store)
    os.unlink(os.path.join(path, "vm", "disk0", layer))
    await reopen_fails(path, MapMissing, f"vm/disk0 .*{layer} is missing")


@pytest.mark.parametrize("layer", ["hidden.log", "active.log"])
async def test_truncated_map(open_store, layer: str) -> None:
    path = await closed_store(open_store)
    log_path = os.path.join(path, "vm", "disk0", layer)
    os.truncate(log_path, os.path.getsize(log_path) - 4096)
    await reopen_fails(path, MapTruncated, "vm/disk0 .* bytes, the state recorded")


@pytest.mark.parametrize("layer", ["hidden.log", "active.log"])
async def test_corrupt_map_header(open_store, layer: str) -> None:
    path = await closed_store(open_store)
    log_path = os.path.join(path, "vm", "disk0", layer)
    with open(log_path, "r+b") as f:
        f.seek(4096 + 40)  # the first record's block number (after the 4 KiB log header)
        f.write(b"\xff")
    await reopen_fails(path, MapCorrupt, "vm/disk0 .*fails its checksum at offset 4096")


async def test_corrupt_map_after_crash_is_not_mistaken_for_a_torn_tail(open_store) -> None:
    store = await make(open_store)
    vm = store.vm("vm")
    await vm.apply_primary(1, [PrimaryWrite("disk0", 0, b"o" * 12288)])  # data, so hidden saves data, not records
    await vm.checkpoint(1)
    await vm.apply_primary(2, [PrimaryWrite("disk0", 0, b"p" * 100)])
    await vm.apply_primary(3, [PrimaryWrite("disk0", 8192, b"q" * 100)])
    store.abandon()  # crash: the next open must roll back from hidden
    hidden = os.path.join(store.path, "vm", "disk0", "hidden.log")
    with open(hidden, "r+b") as f:
        f.seek(8192)  # data of the first segment (after the log header and its segment header)
        f.write(b"garbage")
    await reopen_fails(store.path, MapCorrupt, "data that fails its checksum .*at offset 4096")


async def test_torn_tail_after_crash_is_dropped(open_store) -> None:
    store = await make(open_store)
    vm = store.vm("vm")
    disk = store.disk("vm", "disk0")
    await vm.apply_primary(1, [PrimaryWrite("disk0", 0, b"p" * 100)])
    store.abandon()
    hidden = os.path.join(store.path, "vm", "disk0", "hidden.log")
    size = os.path.getsize(hidden)
    # A segment whose header made it to disk but whose data did not.
    with open(hidden, "rb") as f:
        seg = f.read(4096)
    with open(hidden, "ab") as f:
        f.write(seg + b"\x01" * 100)
    store2 = await Store.open(store.path, role="secondary")
    try:
        assert store2.vm("vm").recovery.action == "rolled-back"
        assert store2.vm("vm").recovery.resume_seq == 0
        assert bytes(await store2.disk("vm", "disk0").read(0, 100)) == bytes(100)
        assert os.path.getsize(hidden) == file_header_len(4096) < size  # emptied to its header
    finally:
        store2.abandon()
    del disk


async def test_clone_of_a_clone_is_refused(open_store) -> None:
    store = await make(open_store)
    vm = store.vm("vm")
    await vm.clone("disk0", "c1")
    with pytest.raises(BadArgument, match="vm/disk0@c1 is a clone; clone a snapshot"):
        await vm.clone("disk0", "c2", from_snapshot="c1")
    with pytest.raises(NotFound, match="no snapshot or clone 'nope'"):
        await vm.clone("disk0", "c3", from_snapshot="nope")


async def test_concurrent_snapshots_of_one_name(open_store) -> None:
    """Two creations racing for one name: one wins, the other is refused, the winner's log intact."""
    import trio

    store = await make(open_store, role="primary")
    vm = store.vm("vm")
    disk = store.disk("vm", "disk0")
    await disk.write(0, b"before" * 100)
    results: list[str] = []

    async def take() -> None:
        try:
            await vm.snapshot("s", ["disk0"])
            results.append("ok")
        except AlreadyExists:
            results.append("refused")

    async with trio.open_nursery() as n:
        n.start_soon(take)
        n.start_soon(take)
    assert sorted(results) == ["ok", "refused"]
    await disk.write(0, b"after!" * 100)
    assert bytes(await disk.snapshots["s"].read(0, 600)) == b"before" * 100
