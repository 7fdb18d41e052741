"""What clients see when things fail: the errno mapping, and the adapter's handling of I/O errors.

The adapter tests call the pyfuse3 handlers directly (no mount), with a
disk whose reads and writes fail as a broken device would; ENOSPC is checked
end to end with a store on a tiny tmpfs.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest

from colofs.core import errors as E
from colofs.core.store import Store
from colofs.fs.config import make_config
from colofs.fs.control import MountInfo
from colofs.fs.errnos import errno_for
from colofs.fs.operations import Operations
from tests.fs.mounts import mountctl

MiB = 1 << 20


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (E.NotFound("x"), errno.ENOENT),
        (E.AlreadyExists("x"), errno.EEXIST),
        (E.InUse("x"), errno.EBUSY),
        (E.InvalidName("x"), errno.EINVAL),
        (E.BadRange("x"), errno.EINVAL),
        (E.BadArgument("x"), errno.EINVAL),
        (E.SequenceError("x"), errno.EINVAL),
        (E.RoleError("x"), errno.EPERM),
        (E.StoreError("x"), errno.EIO),
        (E.MapCorrupt("x"), errno.EIO),
        (E.DiskIOError("x", errno.ENOSPC), errno.ENOSPC),
        (E.DiskIOError("x", errno.EDQUOT), errno.EDQUOT),
        (E.DiskIOError("x", errno.EIO), errno.EIO),
        (E.DiskIOError("x", errno.EROFS), errno.EIO),
        (E.DiskIOError("x"), errno.EIO),
        (OSError(errno.ENOSPC, "full"), errno.ENOSPC),
        (ValueError("bug"), errno.EIO),
        (pyfuse3.FUSEError(errno.EFBIG), errno.EFBIG),
    ],
)
def test_errno_mapping(exc, code):
    assert errno_for(exc) == code


class _Broken:
    """I/O methods of a core disk whose device fails."""

    def __init__(self, code: int) -> None:
        self.code = code

    async def read(self, offset: int, length: int) -> bytearray:
        raise E.DiskIOError(f"vm/d: reading {length} bytes of base at {offset} failed: boom", self.code)

    async def write(self, offset: int, data: bytes) -> None:
        raise E.DiskIOError(f"vm/d: writing active at {offset} failed: boom", self.code)

    async def flush(self) -> None:
        raise OSError(self.code, os.strerror(self.code))


async def _ops(tmp_path: Path) -> tuple[Operations, Store, int]:
    store = await Store.open(str(tmp_path / "store"), role="secondary", create=True)
    await store.create_disk("vm", "d", 1 * MiB)
    cfg = make_config(store=str(tmp_path / "store"), mountpoint=str(tmp_path / "mnt"), role="secondary")
    ops = Operations(store, MountInfo(cfg, os.getpid(), 0.0))
    vm_attr = await ops.lookup(pyfuse3.ROOT_INODE, b"vm", SimpleNamespace(pid=1))
    attr = await ops.lookup(vm_attr.st_ino, b"d.raw", SimpleNamespace(pid=1))
    fi = await ops.open(attr.st_ino, os.O_RDWR, SimpleNamespace(pid=1))
    return ops, store, fi.fh


@pytest.mark.parametrize(("code", "seen"), [(errno.EIO, errno.EIO), (errno.ENOSPC, errno.ENOSPC),
                                            (errno.EROFS, errno.EIO)])
async def test_io_errors_reach_the_client_and_the_log(tmp_path, caplog, code, seen):
    ops, store, fh = await _ops(tmp_path)
    try:
        real = store.vms["vm"].disks["d"]
        broken = _Broken(code)
        for name in ("read", "write", "flush"):
            setattr(real, name, getattr(broken, name))
        caplog.set_level(logging.INFO)
        for call, what in ((ops.read(fh, 8192, 4096), "read of 4096 bytes at 8192"),
                           (ops.write(fh, 12288, b"x" * 512), "write of 512 bytes at 12288"),
                           (ops.fsync(fh, True), "fsync")):
            with pytest.raises(pyfuse3.FUSEError) as e:
                await call
            assert e.value.errno == seen
            assert any(f"vm/d: {what} failed" in r.getMessage() and r.levelno == logging.ERROR
                       for r in caplog.records), what
        assert ops.control.status_of(ops.inodes.get(pyfuse3.ROOT_INODE))["vms"]["vm"]["disks"]["d"]["io_errors"] == 3
    finally:
        store.abandon()


async def test_unexpected_exceptions_become_eio_not_a_dead_mount(tmp_path, caplog):
    ops, store, fh = await _ops(tmp_path)
    try:
        async def buggy(*args: object) -> None:
            raise KeyError("a bug")

        store.vms["vm"].disks["d"].read = buggy  # type: ignore[method-assign]
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.read(fh, 0, 4096)
        assert e.value.errno == errno.EIO
        assert "Traceback" in caplog.text or any(r.exc_info for r in caplog.records)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.getattr(123456789, SimpleNamespace(pid=1))
        assert e.value.errno == errno.ENOENT
    finally:
        store.abandon()


def test_enospc_passes_through_the_mount(mounts, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    m = mounts(mount=False)
    m.store = small / "store"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(small)], check=True, timeout=30)
    try:
        m.mount()
        mountctl("create", m.mnt, "vm1/d0", "--size", "64M")
        fd = os.open(m.path("vm1", "d0.raw"), os.O_RDWR | os.O_DIRECT)
        buf = mmap.mmap(-1, MiB)
        buf.write(b"\x5a" * MiB)
        with pytest.raises(OSError) as e:
            for i in range(16):
                os.pwrite(fd, buf, i * MiB)
        assert e.value.errno == errno.ENOSPC
        os.close(fd)
        assert "No space left on device" in m.log()
        # The store's file system is full: closing it cleanly fails too, and umount says so.
        res = mountctl("umount", m.mnt, check=False)
        m.mounted = False
        assert res.returncode == 1 and "No space left on device" in res.stderr
    finally:
        m.cleanup()
        subprocess.run(["umount", "-l", str(small)], check=False, timeout=30)
