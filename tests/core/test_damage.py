"""Damage to a VM's files is never taken for a torn tail, never served, and quarantines that VM only.

The setup of each crash test: a disk checkpointed with 'A', then primary
writes of 'B' over blocks 0-63 in several acknowledged groups, then a crash
(the store abandoned, as a killed process leaves it) and some damage to
hidden.log. Recovery must either roll all 64 blocks back (no damage) or
quarantine the VM with the file, offset and reason, keeping hidden.log as it
was; it must never serve 'B' as the checkpoint's image.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from colofs.core import PrimaryWrite, Store
from colofs.core.blocklog import file_header_len
from colofs.core.errors import BlockDamaged, RoleError, VMDamaged
from colofs.core.state import load_vm_state, save_vm_state

BS = 4096
SIZE = 1 << 20
GROUPS = 4  # acknowledged groups of 16 blocks each over blocks 0-63
PER_GROUP = 16


async def setup_crashed(open_store) -> tuple[str, str]:
    """Two VMs; 'vm' crashed after 4 groups of 'B' over its checkpoint of 'A'. Returns (store path, hidden path)."""
    store = await open_store()
    await store.create_disk("vm", "d", SIZE)
    await store.create_disk("other", "d", SIZE)
    vm = store.vm("vm")
    await vm.apply_primary(1, [PrimaryWrite("d", 0, b"A" * (64 * BS))])
    await vm.checkpoint(1)
    for g in range(GROUPS):
        await vm.apply_primary(2 + g, [PrimaryWrite("d", g * PER_GROUP * BS, b"B" * (PER_GROUP * BS))])
    other = store.vm("other")
    await other.apply_primary(1, [PrimaryWrite("d", 0, b"O" * 8192)])
    await other.checkpoint(1)
    store.abandon()
    return store.path, os.path.join(store.path, "vm", "d", "hidden.log")


def segment_offsets(hidden: str) -> list[int]:
    """File offsets of the segments (each: one header block, then PER_GROUP data blocks)."""
    first = file_header_len(BS)
    return [first + g * (PER_GROUP + 1) * BS for g in range(GROUPS)]


def flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x20]))


async def assert_quarantined(path: str, hidden: str, offset: int | None, reason: str) -> None:
    """Quarantined naming ``hidden``, the other VM served, ``hidden`` kept as it was (or still absent)."""
    missing = not os.path.exists(hidden)
    size = 0 if missing else os.path.getsize(hidden)
    content = b"" if missing else open(hidden, "rb").read()
    store = await Store.open(path, role="secondary")
    try:
        vm = store.vm("vm")
        st = vm.status()
        assert st["phase"] == "damaged", st
        damage = st["damage"]
        assert damage["file"] == hidden
        assert damage["offset"] == offset
        assert reason in damage["reason"]
        assert vm.disks == {}  # nothing of it is served
        with pytest.raises(VMDamaged, match="quarantined"):
            await vm.checkpoint()
        # The other VM of the store opens and serves.
        assert bytes(await store.disk("other", "d").read(0, 8192)) == b"O" * 8192
    finally:
        store.abandon()
    # The evidence is kept: hidden.log neither truncated nor rewritten (nor made afresh if it was deleted).
    if missing:
        assert not os.path.exists(hidden)
    else:
        assert os.path.getsize(hidden) == size
        with open(hidden, "rb") as f:
            assert f.read() == content
    # A restart keeps the quarantine and its original cause.
    store = await Store.open(path, role="secondary")
    try:
        assert store.vm("vm").status()["damage"]["offset"] == offset
        assert reason in store.vm("vm").status()["damage"]["reason"]
    finally:
        store.abandon()


async def test_undamaged_crash_rolls_all_64_blocks_back(open_store) -> None:
    path, _ = await setup_crashed(open_store)
    store = await Store.open(path, role="secondary")
    try:
        vm = store.vm("vm")
        assert (vm.recovery.action, vm.recovery.blocks) == ("rolled-back", 64)
        assert bytes(await store.disk("vm", "d").read(0, 64 * BS)) == b"A" * (64 * BS)
    finally:
        store.abandon()


@pytest.mark.parametrize("group", [0, GROUPS - 1])
async def test_flipped_data_byte_quarantines(open_store, group: int) -> None:
    path, hidden = await setup_crashed(open_store)
    seg = segment_offsets(hidden)[group]
    flip(hidden, seg + BS + 5 * BS + 100)  # in the 6th data block of the group
    await assert_quarantined(path, hidden, seg, "data that fails its checksum")


@pytest.mark.parametrize("group", [0, GROUPS - 1])
async def test_flipped_record_byte_quarantines(open_store, group: int) -> None:
    path, hidden = await setup_crashed(open_store)
    seg = segment_offsets(hidden)[group]
    flip(hidden, seg + 40 + 3 * 16)  # the 4th record's block number
    await assert_quarantined(path, hidden, seg, "a header that fails its checksum")


@pytest.mark.parametrize("group", [0, GROUPS - 1])
async def test_truncation_inside_an_acknowledged_group_quarantines(open_store, group: int) -> None:
    path, hidden = await setup_crashed(open_store)
    cut = segment_offsets(hidden)[group] + BS + 7 * BS
    os.truncate(hidden, cut)
    await assert_quarantined(path, hidden, cut, "the file ends early")


async def test_hidden_log_cut_to_zero_bytes_quarantines(open_store) -> None:
    """All acknowledged groups gone at once: an empty file is not taken for a fresh log."""
    path, hidden = await setup_crashed(open_store)
    os.truncate(hidden, 0)
    await assert_quarantined(path, hidden, None, "an empty file")


async def test_deleted_hidden_log_quarantines_naming_it(open_store) -> None:
    path, hidden = await setup_crashed(open_store)
    os.unlink(hidden)
    await assert_quarantined(path, hidden, None, "missing")


async def test_snapshot_log_cut_to_zero_bytes_after_a_crash_quarantines(open_store) -> None:
    store = await open_store()
    await store.create_disk("vm", "d", SIZE)
    await store.create_disk("other", "d", SIZE)
    vm = store.vm("vm")
    await vm.apply_primary(1, [PrimaryWrite("d", 0, b"A" * (8 * BS))])
    await vm.checkpoint(1)
    (snap,) = await vm.snapshot("s")
    await store.vm("other").apply_primary(1, [PrimaryWrite("d", 0, b"O" * 8192)])
    await store.vm("other").checkpoint(1)
    await vm.apply_primary(2, [PrimaryWrite("d", 0, b"B" * (8 * BS))])
    await vm.checkpoint(2)  # the snapshot's target now holds the 'A's
    target = snap.target.path
    assert os.path.getsize(target) > file_header_len(BS)
    store.abandon()
    os.truncate(target, 0)
    await assert_quarantined(store.path, target, None, "an empty file")


async def test_fresh_disk_and_disk_just_checkpointed_open_clean_after_a_crash(open_store) -> None:
    """Empty logs are never mistaken for lost ones: a new disk, and one whose logs a checkpoint emptied."""
    store = await open_store()
    await store.create_disk("new", "d", SIZE)
    await store.create_disk("vm", "d", SIZE)
    vm = store.vm("vm")
    await vm.apply_primary(1, [PrimaryWrite("d", 0, b"A" * (8 * BS))])
    await vm.checkpoint(1)
    await vm.apply_primary(2, [PrimaryWrite("d", 0, b"B" * (8 * BS))])
    await vm.checkpoint(2)
    store.abandon()
    folder = os.path.join(store.path, "vm", "d")
    assert [os.path.getsize(os.path.join(folder, n)) for n in ("hidden.log", "active.log")] == [file_header_len(BS)] * 2
    for _ in range(2):  # and again after that recovery
        store = await Store.open(store.path, role="secondary")
        try:
            assert store.vm("new").damage is None and store.vm("vm").damage is None
            assert (store.vm("vm").recovery.action, store.vm("vm").recovery.blocks) == ("rolled-back", 0)
            assert bytes(await store.disk("vm", "d").read(0, 8 * BS)) == b"B" * (8 * BS)
            assert bytes(await store.disk("new", "d").read(0, BS)) == bytes(BS)
        finally:
            store.abandon()


async def test_vm_whose_empty_logs_have_no_header_opens_and_gets_them(open_store) -> None:
    """A VM stored before logs got their header at creation: its empty logs are fresh, not lost, once."""
    store = await open_store()
    await store.create_disk("vm", "d", SIZE)
    await store.vm("vm").apply_primary(1, [PrimaryWrite("d", 0, b"A" * BS)])
    await store.vm("vm").checkpoint(1)
    store.abandon()
    state_path = os.path.join(store.path, "vm", "state")
    state = load_vm_state(state_path, "vm")
    save_vm_state(state_path, replace(state, log_headers=False))
    folder = os.path.join(store.path, "vm", "d")
    logs = [os.path.join(folder, n) for n in ("hidden.log", "active.log")]
    for lg in logs:
        os.truncate(lg, 0)
    store = await Store.open(store.path, role="secondary")
    try:
        assert store.vm("vm").damage is None
        assert store.vm("vm").state.log_headers
        assert bytes(await store.disk("vm", "d").read(0, BS)) == b"A" * BS
    finally:
        store.abandon()
    assert [os.path.getsize(lg) for lg in logs] == [file_header_len(BS)] * 2
    assert load_vm_state(state_path, "vm").log_headers
    os.truncate(logs[0], 0)  # from now on an empty log is damage
    store = await Store.open(store.path, role="secondary")
    try:
        assert store.vm("vm").status()["damage"]["file"] == logs[0]
    finally:
        store.abandon()


async def test_a_group_never_acknowledged_is_a_torn_tail_and_dropped(open_store) -> None:
    """Blocks saved to hidden whose sync never completed: base was not touched, the tail is dropped silently."""
    path, hidden = await setup_crashed(open_store)
    store = await Store.open(path, role="secondary")
    vm = store.vm("vm")
    disk = store.disk("vm", "d")
    await vm.apply_primary(2, [PrimaryWrite("d", 0, b"C" * (8 * BS))])
    end = disk.hidden.end
    # The next group dies between its append and its sync: a torn segment past the commit record.
    await disk.cbw.save(list(range(40, 56)))  # blocks holding 'A' (holes would be saved as records, no data)
    store.abandon()
    size = os.path.getsize(hidden)
    assert size > end
    with open(hidden, "r+b") as f:
        f.seek(end + BS + 3 * BS)
        f.write(b"torn")
    store = await Store.open(path, role="secondary")
    try:
        vm = store.vm("vm")
        assert vm.damage is None
        assert (vm.recovery.action, vm.recovery.blocks) == ("rolled-back", 8)
        assert bytes(await store.disk("vm", "d").read(0, 64 * BS)) == b"A" * (64 * BS)
    finally:
        store.abandon()


async def test_flipped_byte_on_a_clean_store_is_eio_and_quarantines(open_store) -> None:
    store = await open_store()
    await store.create_disk("vm", "d", SIZE)
    await store.create_disk("other", "d", SIZE)
    vm = store.vm("vm")
    await vm.apply_primary(1, [PrimaryWrite("d", 0, b"A" * (8 * BS))])
    await vm.checkpoint(1)
    await vm.apply_primary(2, [PrimaryWrite("d", 0, b"B" * (8 * BS))])
    await store.close()
    hidden = os.path.join(store.path, "vm", "d", "hidden.log")
    data_off = file_header_len(BS) + BS
    flip(hidden, data_off + 2 * BS + 7)  # block 2's saved 'A'

    store = await Store.open(store.path, role="secondary")
    try:
        vm = store.vm("vm")
        disk = store.disk("vm", "d")
        assert vm.damage is None  # a clean open reads no data
        assert bytes(await disk.read(0, 2 * BS)) == b"A" * (2 * BS)  # undamaged blocks are served
        with pytest.raises(BlockDamaged, match="block 2 fails its digest"):
            await disk.read(2 * BS + 100, 10)  # a partial block is checked whole
        st = vm.status()
        assert st["phase"] == "damaged"
        assert (st["damage"]["file"], st["damage"]["offset"]) == (hidden, data_off + 2 * BS)
        # Quarantined: every disk of the VM is EIO now, not only the damaged block.
        with pytest.raises(VMDamaged):
            await disk.read(0, BS)
        with pytest.raises(VMDamaged):
            await disk.write(0, b"x" * BS)
        with pytest.raises(VMDamaged):
            await vm.apply_primary(3, [PrimaryWrite("d", 0, b"C" * BS)])
        with pytest.raises(VMDamaged):
            await vm.snapshot("s")
        with pytest.raises(VMDamaged):
            await store.create_disk("vm", "e", SIZE)
        assert bytes(await store.disk("other", "d").read(0, BS)) == bytes(BS)
        await store.close()
    finally:
        store.abandon()
    store = await Store.open(store.path, role="secondary")
    try:
        assert store.vm("vm").status()["phase"] == "damaged"
        assert store.vm("vm").disks == {}
    finally:
        store.abandon()


async def test_damaged_snapshot_block_is_eio(open_store) -> None:
    store = await open_store("primary")
    await store.create_disk("vm", "d", SIZE)
    disk = store.disk("vm", "d")
    await disk.write(0, b"A" * (4 * BS))
    (snap,) = await store.vm("vm").snapshot("s")
    await disk.write(0, b"B" * (4 * BS))  # copies the 'A's into the snapshot's target
    flip(snap.target.path, file_header_len(BS) + BS + BS + 1)
    with pytest.raises(BlockDamaged, match="block 1 fails its digest"):
        await snap.read(0, 4 * BS)
    assert store.vm("vm").status()["phase"] == "damaged"


@pytest.mark.parametrize("how", ["missing", "garbled"])
async def test_missing_or_garbled_state_quarantines_that_vm_only(open_store, how: str) -> None:
    store = await open_store()
    await store.create_disk("vm", "d", SIZE)
    await store.create_disk("other", "d", SIZE)
    await store.disk("other", "d").write(0, b"O" * BS)
    await store.close()
    state = os.path.join(store.path, "vm", "state")
    if how == "missing":
        os.unlink(state)
    else:
        with open(state, "r+b") as f:
            f.seek(30)
            f.write(b"#")
    store = await Store.open(store.path, role="secondary")
    try:
        st = store.vm("vm").status()
        assert st["phase"] == "damaged"
        assert st["damage"]["file"] == state
        assert ("missing" if how == "missing" else "checksum") in st["damage"]["reason"]
        assert bytes(await store.disk("other", "d").read(0, BS)) == b"O" * BS
    finally:
        store.abandon()


async def test_repair_moves_the_damaged_vm_aside_and_starts_an_empty_secondary(open_store) -> None:
    path, hidden = await setup_crashed(open_store)
    flip(hidden, segment_offsets(hidden)[1] + BS + 1)
    kept = open(hidden, "rb").read()
    store = await Store.open(path, role="secondary")
    try:
        epoch = store.vm("vm").state.epoch
        with pytest.raises(RoleError, match="not damaged"):
            await store.repair_vm("other")
        aside = await store.repair_vm("vm")
        assert os.path.basename(aside).startswith(".damaged-vm-")
        assert open(os.path.join(aside, "d", "hidden.log"), "rb").read() == kept
        vm = store.vm("vm")
        assert vm.damage is None and vm.disks == {}
        assert (vm.state.role, vm.state.epoch, vm.state.last_checkpoint) == ("secondary", epoch, 0)
    finally:
        store.abandon()
    store = await Store.open(path, role="secondary")  # the aside directory is not a VM
    try:
        assert sorted(store.vms) == ["other", "vm"] and store.vm("vm").damage is None
    finally:
        store.abandon()
