"""A VM's worker answers as one colofs process does, where the worker's side decides it.

- A ``create``/``import`` naming a VM the store does not hold makes the VM
  with its disk, or nothing: a refused one leaves no VM directory, and the
  worker started for it ends ``unclaimed`` (the supervisor forgets the VM).
- Closing the VM at the end can fail (a full store): the worker tells its
  supervisor why, as one process's umount says why.
- The summary a worker sends has what a new events listener is greeted with
  (epoch, last sequence number, the peer's state).
"""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
from pathlib import Path

import pytest
import trio

from colofs.core import Store
from colofs.workers.attach import EXIT_UNCLAIMED
from colofs.workers.channel import RemoteError
from colofs.workers.oncommand import ON_COMMAND
from tests.fs.workerstub import MiB, supervising

NEW_VM = {ON_COMMAND: True}


async def test_a_refused_first_import_leaves_the_store_without_the_vm(tmp_path: Path) -> None:
    async with supervising(tmp_path, "secondary") as (sup, nursery):
        os.mkdir(sup.vm_mount)
        await sup.start(nursery, create_vm="secondary", extra=NEW_VM)
        assert (await sup.wait_for("opened")).get("pending") is True
        assert sup.channel is not None
        with pytest.raises(RemoteError) as e:
            await sup.channel.call("import_disk", timeout=60, vm="vm0", disk="d0", source="/dev/null")
        assert e.value.errno == errno.EINVAL and "character device" in e.value.message, e.value.message
        assert not os.path.exists(os.path.join(sup.store, "vm0"))
        assert await sup.exit_status() == EXIT_UNCLAIMED
        assert not sup.got("ready") and not sup.mounted()
        assert not os.path.exists(os.path.join(sup.store, "vm0"))


async def test_a_refused_create_then_a_good_one_makes_and_serves_the_vm(tmp_path: Path) -> None:
    async with supervising(tmp_path, "primary") as (sup, nursery):
        os.mkdir(sup.vm_mount)
        await sup.start(nursery, create_vm="primary", extra=NEW_VM)
        await sup.wait_for("opened")
        assert sup.channel is not None
        with pytest.raises(RemoteError) as e:
            await sup.channel.call("create_disk", timeout=60, vm="vm0", disk="d0", size=1000, block_size=4096)
        assert e.value.errno == errno.EINVAL and "multiple of 512" in e.value.message, e.value.message
        assert not os.path.exists(os.path.join(sup.store, "vm0"))
        made = await sup.channel.call("create_disk", timeout=60, vm="vm0", disk="d0", size=MiB, block_size=4096)
        assert made["ok"] and made["size"] == MiB, made
        await sup.wait_for("ready")
        assert os.stat(os.path.join(sup.vm_mount, "d0.raw")).st_size == MiB
        assert [m["role"] for m in sup.got("opened")] == ["primary", "primary"]
        summary = sup.got("summary")[-1]
        assert summary["epoch"] == 1 and summary["last_seq"] is not None and summary["link"], summary


async def test_a_vm_that_cannot_be_closed_is_reported_with_the_reason(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(small)], check=True, timeout=30)
    try:
        async with supervising(small, "secondary", create_store=False) as (sup, nursery):
            store = await Store.open(sup.store, role="secondary", create=True)
            await store.create_disk("vm0", "d0", 64 * MiB)
            await store.close()
            os.mkdir(sup.vm_mount)
            await sup.start(nursery)
            await sup.wait_for("ready")
            await trio.to_thread.run_sync(fill, os.path.join(sup.vm_mount, "d0.raw"))
            assert sup.channel is not None
            await sup.channel.notify("stop")
            assert await sup.exit_status() == 1
            failed = sup.got("failed")
            assert failed and failed[0]["mounted"] is True, sup.messages
            assert "No space left on device" in failed[0]["error"], failed
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False, timeout=30)


def fill(path: str) -> None:
    """Write through the mount until the store's file system is full (ENOSPC)."""
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, MiB)
        buf.write(b"\x5a" * MiB)
        with pytest.raises(OSError) as e:
            for i in range(16):
                os.pwrite(fd, buf, i * MiB)
        assert e.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
