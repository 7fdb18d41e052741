"""What clients see when things fail: the errno mapping, and the adapter's handling of I/O errors.

A handler that hits a bug must answer EIO instead of killing the mount
(checked by calling the handler directly); ENOSPC is checked end to end
with a store on a tiny tmpfs, and real device errors in
``tests/faults/test_device_errors.py`` with a store on a failing file
system.
"""

from __future__ import annotations

import errno
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


async def _ops(tmp_path: Path) -> tuple[Operations, Store, int]:
    store = await Store.open(str(tmp_path / "store"), role="secondary", create=True)
    await store.create_disk("vm", "d", 1 * MiB)
    cfg = make_config(store=str(tmp_path / "store"), mountpoint=str(tmp_path / "mnt"), role="secondary")
    ops = Operations(store, MountInfo(cfg, os.getpid(), 0.0))
    vm_attr = await ops.lookup(pyfuse3.ROOT_INODE, b"vm", SimpleNamespace(pid=1))
    attr = await ops.lookup(vm_attr.st_ino, b"d.raw", SimpleNamespace(pid=1))
    fi = await ops.open(attr.st_ino, os.O_RDWR, SimpleNamespace(pid=1))
    return ops, store, fi.fh


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
