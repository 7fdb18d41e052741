"""The file tree: creating VMs and disks, fixed sizes, stable attributes, refused changes."""

from __future__ import annotations

import errno
import mmap
import os
import time

import pytest

from tests.fs.mounts import mountctl, run
from tests.waiting import wait_until_sync

MiB = 1 << 20


def test_mkdir_and_qemu_img_create_make_a_disk(sec):
    sec.path("vm1").mkdir()
    run("qemu-img", "create", "-f", "raw", sec.path("vm1", "d0.raw"), "64M")
    st = os.stat(sec.path("vm1", "d0.raw"))
    assert st.st_size == 64 * MiB
    assert sorted(os.listdir(sec.mnt)) == ["vm1"]
    assert os.listdir(sec.path("vm1")) == ["d0.raw"]
    status = sec.status()
    assert status["vms"]["vm1"]["disks"]["d0"]["size"] == 64 * MiB
    assert status["vms"]["vm1"]["role"] == "secondary"
    info = run("qemu-img", "info", "--output=json", sec.path("vm1", "d0.raw")).stdout
    assert '"virtual-size": 67108864' in info
    # The disk survives a remount with the same size and inode number.
    ino = st.st_ino
    sec.remount()
    st2 = os.stat(sec.path("vm1", "d0.raw"))
    assert (st2.st_size, st2.st_ino) == (64 * MiB, ino)


def test_pending_file_gets_its_block_size_and_size_from_truncate(sec):
    sec.path("vm1").mkdir()
    f = sec.path("vm1", "big.raw")
    f.touch()
    assert os.stat(f).st_size == 0
    assert sec.status("vm1")["pending"] == ["big.raw"]
    os.setxattr(f, "user.colofs.block_size", b"65536")
    assert os.getxattr(f, "user.colofs.block_size") == b"65536\n"
    os.truncate(f, 8 * MiB)
    d = sec.status("vm1/big")
    assert (d["size"], d["block_size"]) == (8 * MiB, 65536)
    with pytest.raises(OSError) as e:
        os.setxattr(f, "user.colofs.block_size", b"4096")  # a disk's block size is fixed
    assert e.value.errno == errno.EINVAL


def test_pending_file_can_be_removed_and_only_raw_files_are_created(sec):
    sec.path("vm1").mkdir()
    p = sec.path("vm1", "tmp.raw")
    p.touch()
    fd = os.open(p, os.O_WRONLY)
    try:
        os.pwrite(fd, b"x", 0)  # the page cache takes it; no disk yet, so its writeback fails
        with pytest.raises(OSError) as e:
            os.fsync(fd)
        assert e.value.errno == errno.EFBIG
    finally:
        os.close(fd)
    _wait_size(p, 0)  # the kernel's cached size was reset
    p.unlink()
    assert os.listdir(sec.path("vm1")) == []
    for bad, code in [(sec.path("vm1", "notes.txt"), errno.EINVAL), (sec.path("top.raw"), errno.EPERM),
                      (sec.path("vm1", "-bad.raw"), errno.EINVAL)]:
        with pytest.raises(OSError) as e:
            bad.touch()
        assert e.value.errno == code, bad
    with pytest.raises(OSError) as e:
        sec.path("vm1", "sub").mkdir()
    assert e.value.errno == errno.EPERM


def test_size_is_fixed_and_disks_cannot_be_removed_or_renamed(sec):
    mountctl("create", sec.mnt, "vm1/d0", "--size", "16M")
    f = sec.path("vm1", "d0.raw")
    fd = os.open(f, os.O_RDWR)
    try:
        os.pwrite(fd, b"keep me", 4096)
        os.fsync(fd)
        for size in (0, 8 * MiB, 32 * MiB):
            with pytest.raises(OSError) as e:
                os.ftruncate(fd, size)
            assert e.value.errno == errno.EPERM
        os.ftruncate(fd, 16 * MiB)  # its own size is fine
    finally:
        os.close(fd)
    with pytest.raises(OSError) as e:
        os.truncate(f, 0)
    assert e.value.errno == errno.EPERM
    with pytest.raises(OSError) as e:
        os.open(f, os.O_RDWR | os.O_TRUNC)
    assert e.value.errno == errno.EPERM
    res = run("qemu-img", "create", "-f", "raw", f, "16M", check=False)  # would truncate to 0 first
    assert res.returncode != 0 and "Operation not permitted" in res.stderr
    assert os.stat(f).st_size == 16 * MiB
    for action in (f.unlink, lambda: os.rename(f, sec.path("vm1", "e.raw"))):
        with pytest.raises(OSError) as e:
            action()
        assert e.value.errno == errno.EPERM
    with pytest.raises(OSError) as e:
        sec.path("vm1").rmdir()
    # With a worker per VM the directory is its worker's mountpoint, which the kernel refuses first.
    assert e.value.errno == (errno.EBUSY if os.path.ismount(sec.path("vm1")) else errno.EPERM)
    with open(f, "rb") as r:
        r.seek(4096)
        assert r.read(7) == b"keep me"
    assert "a disk's size is fixed" in sec.log()


def _wait_size(f, size: int) -> None:
    """The daemon resets the kernel's cached size after its reply to a refused write: wait for it."""
    wait_until_sync(lambda: os.stat(f).st_size == size, what=f"{f} to show {size} bytes again")


def _resets(m) -> int:
    """How many cached-size resets the daemon has logged."""
    return m.log().count("cached size is back")


def test_writes_past_the_end_fail_with_efbig(sec):
    mountctl("create", sec.mnt, "vm1/d0", "--size", "4M")
    f = sec.path("vm1", "d0.raw")
    buf = mmap.mmap(-1, 8192)
    buf.write(b"\xaa" * 8192)
    fd = os.open(f, os.O_RDWR | os.O_DIRECT)
    try:
        for n, off in enumerate((4 * MiB, 4 * MiB - 4096, 8 * MiB), 1):
            with pytest.raises(OSError) as e:
                os.pwrite(fd, buf, off)
            assert e.value.errno == errno.EFBIG
            # The daemon resets the kernel's size after each refusal, after its reply. Waiting for
            # each reset's log line before the next refusal keeps them one per write (none merges
            # into one under way), so none can land later and truncate the page cache under the
            # buffered write below.
            wait_until_sync(lambda n=n: _resets(sec) >= n, what=f"cached-size reset {n} in the log")
        assert os.pread(fd, 4096, 4 * MiB) == b""  # reads at the end see EOF
    finally:
        os.close(fd)
    assert _resets(sec) == 3
    _wait_size(f, 4 * MiB)
    # Buffered: the page cache takes the write, its writeback fails, fsync reports it.
    fd = os.open(f, os.O_RDWR)
    try:
        os.pwrite(fd, b"x" * 100, 4 * MiB - 50)
        with pytest.raises(OSError) as e:
            os.fsync(fd)
        assert e.value.errno == errno.EFBIG
    finally:
        os.close(fd)
    _wait_size(f, 4 * MiB)  # the kernel's cached size was reset
    with open(f, "rb") as r:
        r.seek(4 * MiB - 50)
        assert r.read() == bytes(50)
    assert "ends past the disk's size" in sec.log()


def test_attributes_are_stable(sec):
    mountctl("create", sec.mnt, "vm1/d0", "--size", "4M")
    f = sec.path("vm1", "d0.raw")
    st1 = os.stat(f)
    time.sleep(1.1)  # lets the clock pass a second boundary: attributes must not follow it
    st2 = os.stat(f)
    assert (st1.st_ino, st1.st_mtime_ns, st1.st_size) == (st2.st_ino, st2.st_mtime_ns, st2.st_size)
    assert st1.st_ino != os.stat(sec.path("vm1")).st_ino
    assert os.stat(sec.mnt).st_ino == 1
    vfs = os.statvfs(sec.mnt)
    assert vfs.f_blocks > 0
