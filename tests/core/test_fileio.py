"""The file I/O policy on file systems that behave differently from ext4."""

from __future__ import annotations

import os
import subprocess

import pytest

from colofs.core import PrimaryWrite, Store


@pytest.fixture
def tmpfs(tmp_path):
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

    from colofs.core import fileio

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
            await fileio.datasync(fd)

        async with trio.open_nursery() as n:
            for i in range(16):
                n.start_soon(writer, i)
    finally:
        os.fdatasync = real
        os.close(fd)
    assert 1 <= calls <= 3
    with open(tmp_path / "f", "rb") as f:
        assert f.read() == b"".join(bytes([i]) * 4096 for i in range(16))
