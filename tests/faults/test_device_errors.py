"""Real I/O errors from the store's file system reach the VM as EIO (or ENOSPC), logged with disk and offset.

The store sits on ``faultfs``, a passthrough FUSE file system that fails
chosen reads and writes, so the colofs daemon meets errors from real system
calls, as it would from a failing disk, and must keep serving everything
else.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fs.mounts import Mount, mountctl
from tests.mountable import mount_skip_reason
from tests.waiting import wait_until_sync

_SKIP = mount_skip_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=f"mount test {_SKIP}")
MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def faultfs(tmp_path: Path) -> Iterator[Path]:
    src, mnt = tmp_path / "faultfs-src", tmp_path / "faultfs"
    src.mkdir()
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "tests.faults.faultfs", str(src), str(mnt)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield mnt
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, timeout=30, check=False)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fail(fs: Path, **rule: object) -> None:
    os.setxattr(fs, "user.faultfs.rule", json.dumps(rule).encode())


def heal(fs: Path) -> None:
    os.setxattr(fs, "user.faultfs.rule", b" ")


def aligned(n: int, fill: int) -> mmap.mmap:
    buf = mmap.mmap(-1, n)
    buf.write(bytes([fill]) * n)
    return buf


def test_device_errors_reach_the_vm_and_the_log(faultfs: Path, tmp_path: Path) -> None:
    m = Mount(tmp_path, "primary", "c")
    m.store = faultfs / "store"
    try:
        m.mount()
        mountctl("create", m.mnt, "vm/d", "--size", "16M")
        disk = m.path("vm", "d.raw")
        fd = os.open(disk, os.O_RDWR | os.O_DIRECT)
        try:
            os.pwrite(fd, aligned(MiB, 0x5A), 0)
            os.fsync(fd)
            buf = aligned(4096, 0)

            # A failing read of base: EIO for that range only.
            fail(faultfs, path="store/vm/d/base.raw", op="read", offset=8192, length=4096, errno=errno.EIO)
            with pytest.raises(OSError) as e:
                os.preadv(fd, [buf], 8192)
            assert e.value.errno == errno.EIO
            assert os.preadv(fd, [buf], 0) == 4096 and buf[:4096] == b"\x5a" * 4096
            heal(faultfs)
            assert os.preadv(fd, [buf], 8192) == 4096 and buf[:4096] == b"\x5a" * 4096

            # A failing write of base: EIO, and ENOSPC passes through as itself.
            for code in (errno.EIO, errno.ENOSPC):
                fail(faultfs, path="store/vm/d/base.raw", op="write", offset=2 * MiB, length=MiB, errno=code)
                with pytest.raises(OSError) as e:
                    os.pwrite(fd, aligned(4096, 1), 2 * MiB + 4096)
                assert e.value.errno == code
                heal(faultfs)
            os.pwrite(fd, aligned(4096, 2), 2 * MiB + 4096)
            os.preadv(fd, [buf], 2 * MiB + 4096)
            assert buf[:4096] == b"\x02" * 4096
        finally:
            os.close(fd)
        log = wait_until_sync(lambda: (lg := m.log()) and "vm/d: read of 4096 bytes at 8192" in lg and lg,
                              what="the failed read in the mount's log")
        assert "vm/d: read of 4096 bytes at 8192" in log and "Input/output error" in log
        assert f"vm/d: write of 4096 bytes at {2 * MiB + 4096}" in log
        assert m.status()["vms"]["vm"]["disks"]["d"]["io_errors"] >= 3
        m.umount()
    finally:
        if os.path.ismount(faultfs):
            heal(faultfs)
        m.cleanup()
