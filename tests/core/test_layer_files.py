"""Emptying hidden and active by renaming fresh files over them: what a crash may leave, and what gets freed."""

from __future__ import annotations

import os
import shutil

from colofs.core import PrimaryWrite, Store
from colofs.core.blocklog import file_header_len
from colofs.core.disk import Disk
from colofs.core.vm import VM

SIZE = 256 * 1024


def deleted_fds_under(path: str) -> list[str]:
    """Descriptors of this process that point at unlinked files below ``path``."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(path) and target.endswith(" (deleted)"):
            out.append(target)
    return out


async def one_disk(open_store) -> tuple[Store, VM, Disk]:
    store = await open_store()
    await store.create_disk("vm", "d", SIZE)
    return store, store.vm("vm"), store.disk("vm", "d")


async def test_checkpoint_starts_fresh_files_and_frees_the_old(open_store) -> None:
    store, vm, disk = await one_disk(open_store)
    await vm.apply_primary(1, [PrimaryWrite("d", 0, b"p" * 65536)])
    await disk.write(131072, b"s" * 65536)
    logs = [os.path.join(store.path, "vm", "d", name) for name in ("hidden.log", "active.log")]
    inodes = [os.stat(p).st_ino for p in logs]
    assert os.path.getsize(logs[1]) > 65536
    assert len(disk.hidden) == 16  # ZERO records: the fresh disk's holes cost no data

    await vm.checkpoint(1)

    assert [os.path.getsize(p) for p in logs] == [file_header_len(4096)] * 2  # the header only
    assert [os.stat(p).st_ino for p in logs] != inodes
    assert not [n for n in os.listdir(os.path.dirname(logs[0])) if n.endswith(".new")]
    # The new generation's copies and writes land in the new files; the view stays the checkpoint's.
    await vm.apply_primary(2, [PrimaryWrite("d", 4096, b"q" * 4096)])
    await disk.write(200000, b"t" * 5000)
    assert (len(disk.hidden), os.path.getsize(logs[0]) > 0) == (1, True)
    assert bytes(await disk.read(200000, 5000)) == b"t" * 5000
    assert bytes(await disk.read(0, 8192)) == b"p" * 8192
    await store.close()
    assert vm.reaper.pending == 0
    assert deleted_fds_under(store.path) == []


async def test_a_crash_before_the_rename_leaves_the_old_log_which_holds_nothing_current(open_store) -> None:
    """The state names the new generation, but the directory still names the old file (and a stray new one)."""
    store, vm, disk = await one_disk(open_store)
    await vm.apply_primary(1, [PrimaryWrite("d", 0, b"a" * 8192)])
    await vm.checkpoint(1)
    await vm.apply_primary(2, [PrimaryWrite("d", 0, b"b" * 8192)])
    await disk.write(65536, b"s" * 4096)
    folder = os.path.join(store.path, "vm", "d")
    saved = {name: os.path.join(folder, name + ".saved") for name in ("hidden.log", "active.log")}
    for name, copy in saved.items():
        shutil.copyfile(os.path.join(folder, name), copy)
    await vm.checkpoint(2)
    store.abandon()
    for name, copy in saved.items():
        os.replace(copy, os.path.join(folder, name))
    with open(os.path.join(folder, "hidden.log.new"), "wb") as f:
        f.write(b"half made")

    store2 = await Store.open(store.path, role="secondary")
    try:
        vm2, disk2 = store2.vm("vm"), store2.disk("vm", "d")
        assert vm2.recovery.resume_seq == 2
        assert (len(disk2.hidden), len(disk2.active)) == (0, 0)
        assert bytes(await disk2.read(0, 8192)) == b"b" * 8192
        assert bytes(await disk2.read(65536, 4096)) == bytes(4096)
        assert not os.path.exists(os.path.join(folder, "hidden.log.new"))
    finally:
        store2.abandon()


async def test_failover_leaves_a_plain_primary_disk_that_survives_reopen(open_store) -> None:
    store, vm, disk = await one_disk(open_store)
    await vm.apply_primary(1, [PrimaryWrite("d", 0, b"p" * 100000)])
    await disk.write(50000, b"s" * 100000)
    expected = bytes(await disk.read(0, SIZE))
    moved = await vm.failover()
    assert moved == -(-150000 // 4096)  # every block the writes touched
    folder = os.path.join(store.path, "vm", "d")
    assert [os.path.getsize(os.path.join(folder, n)) for n in ("hidden.log", "active.log")] == [file_header_len(4096)] * 2
    store.abandon()  # a crash right after the failover returned

    store2 = await Store.open(store.path, role="primary")
    try:
        assert bytes(await store2.disk("vm", "d").read(0, SIZE)) == expected
        assert deleted_fds_under(store.path) == []
    finally:
        store2.abandon()
