"""A checkpoint's and a failover's switch: what it syncs while the VM waits, and ``kill -9`` inside it.

The new state file and the fresh logs are written and synced before every
disk is held; held, the switch only renames them into place and syncs the
state's directory. The logs' directory is synced by the first sync that
relies on them. A kill at any point of it must leave either the old
checkpoint or the new one, whole (docs/design.md, invariants 3-5).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import trio

from colofs.core import PrimaryWrite, Store, logsync
from colofs.core.blocklog import NEW_SUFFIX
from colofs.core.cbw import CopyBeforeWrite
from tests.core.crash_stream import primary_image
from tests.core.crash_switch import DISK_SIZE, SVM_AT, SVM_DATA

SIZE = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("operation", ["checkpoint", "failover"])
async def test_the_switch_holds_the_disks_for_the_state_files_rename_only(open_store, monkeypatch, operation: str) -> None:
    store = await open_store()
    await store.create_disk("vm", "d", SIZE)
    vm, disk = store.vm("vm"), store.disk("vm", "d")
    await vm.apply_primary(1, [PrimaryWrite("d", 0, b"A" * SIZE)])
    await vm.checkpoint(1)
    await vm.apply_primary(2, [PrimaryWrite("d", 0, b"B" * 65536)])
    await disk.write(SIZE // 2, b"S" * 65536)
    held: list[str] = []  # the syncs made while every disk was held
    calls: list[str] = []
    fdatasync, fsync = os.fdatasync, os.fsync

    def watch(kind: str, real):  # type: ignore[no-untyped-def]
        def call(fd: int) -> None:
            calls.append(kind)
            if disk.lock.held():
                held.append(f"{kind} {os.readlink(f'/proc/self/fd/{fd}')}")
            real(fd)
        return call

    monkeypatch.setattr(os, "fdatasync", watch("fdatasync", fdatasync))
    monkeypatch.setattr(os, "fsync", watch("fsync", fsync))
    if operation == "checkpoint":
        await vm.checkpoint(2)
    else:
        await vm.failover()
    monkeypatch.undo()
    assert held == [f"fsync {store.path}/vm"]
    assert calls.count("fdatasync") >= 3  # base and the two fresh logs, before the disks were held
    assert not [n for n in os.listdir(disk.path) if n.endswith(NEW_SUFFIX)]
    assert bytes(await disk.read(SIZE // 2, 65536)) == b"S" * 65536 if operation == "failover" else True


def kill_at(path: str, operation: str, point: str) -> None:
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.core.crash_switch", path, operation, point],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert child.stdout is not None
        lines = []
        while not (line := child.stdout.readline()).startswith("at "):
            assert line, f"the child exited before reaching {point}: {lines}"
            lines.append(line)
        assert line.split() == ["at", point]
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL


@pytest.mark.parametrize(("point", "resume"), [("prepared", 4), ("state", 8), ("renamed", 8)])
def test_kill_inside_a_checkpoints_switch_keeps_one_checkpoint_whole(tmp_path, point: str, resume: int) -> None:
    path = str(tmp_path / "store")
    kill_at(path, "checkpoint", point)

    async def check() -> None:
        store = await Store.open(path, role="secondary")
        try:
            vm = store.vm("vm")
            disk = vm.disk("disk0")
            assert (vm.recovery.resume_seq, vm.state.last_applied) == (resume, resume)
            assert len(disk.hidden) == len(disk.active) == 0
            with open(os.path.join(disk.path, "base.raw"), "rb") as f:
                assert f.read() == primary_image(7, resume), f"base is not the primary's image at {resume}"
            assert bytes(await disk.read(0, DISK_SIZE)) == primary_image(7, resume)  # the SVM's write is gone
            assert not [n for n in os.listdir(disk.path) if n.endswith(NEW_SUFFIX)]
            await store.close()
        except BaseException:
            store.abandon()
            raise

    trio.run(check)


@pytest.mark.parametrize("point", ["start", "prepared", "state", "renamed"])
def test_kill_inside_a_failovers_switch_then_reopen_serves_the_svms_image(tmp_path, point: str) -> None:
    """Killed before its start is durable, the failover never happened: the secondary rolls back."""
    path = str(tmp_path / "store")
    kill_at(path, "failover", point)
    image = primary_image(7, 4)  # V: the checkpoint's image (primary writes since are not the SVM's) ...
    if point != "start":
        image[SVM_AT : SVM_AT + len(SVM_DATA)] = SVM_DATA  # ... and the SVM's write

    async def check() -> None:
        store = await Store.open(path, role="primary" if point != "start" else "secondary")
        try:
            vm = store.vm("vm")
            disk = vm.disk("disk0")
            role = "primary" if point != "start" else "secondary"
            assert (vm.state.role, vm.state.phase) == (role, "normal")
            assert len(disk.hidden) == len(disk.active) == 0
            if role == "primary":
                with open(os.path.join(disk.path, "base.raw"), "rb") as f:
                    assert f.read() == image
            assert bytes(await disk.read(0, DISK_SIZE)) == image
            await store.close()
        except BaseException:
            store.abandon()
            raise

    trio.run(check)


async def test_the_first_sync_after_a_switch_makes_the_renames_durable_before_it_returns(open_store, monkeypatch) -> None:
    """Before base changes for a batch, before a flush returns, before a clean close records the lengths."""
    store = await open_store()
    await store.create_disk("vm", "d", SIZE)
    vm, disk = store.vm("vm"), store.disk("vm", "d")
    await vm.apply_primary(1, [PrimaryWrite("d", 0, b"A" * SIZE)])
    events: list[str] = []
    fsync_dirs, cbw_store = logsync.fsync_dirs, CopyBeforeWrite.store

    def dirs(paths: list[str]) -> None:
        fsync_dirs(paths)
        events.append("dirs " + " ".join(os.path.relpath(p, store.path) for p in paths))

    def store_base(self: CopyBeforeWrite, extents) -> None:  # type: ignore[no-untyped-def]
        events.append("base")
        cbw_store(self, extents)

    monkeypatch.setattr(logsync, "fsync_dirs", dirs)
    monkeypatch.setattr(CopyBeforeWrite, "store", store_base)
    await vm.checkpoint(1)
    assert events == [] and disk.hidden.rename_unsynced and disk.active.rename_unsynced
    await vm.apply_primary(2, [PrimaryWrite("d", 0, b"B" * 8192)])
    await vm.apply_primary(3, [PrimaryWrite("d", 8192, b"C" * 8192)])
    assert events == ["dirs vm/d", "base", "base"]  # once, before the first batch's base write
    assert not disk.hidden.rename_unsynced and disk.active.rename_unsynced
    await disk.write(SIZE // 2, b"S" * 4096)
    await disk.flush()  # the SVM's flush: active's rename is durable when it returns
    assert events[3:] == ["dirs vm/d"] and not disk.active.rename_unsynced
    await vm.checkpoint(3)
    events.clear()
    await store.close()  # a clean close records the logs' lengths: their names must be durable
    assert events == ["dirs vm/d"]
