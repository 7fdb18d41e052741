"""O_DIRECT handles are served with FOPEN_DIRECT_IO: they stay coherent with the page cache of other handles.

An O_DIRECT open of a disk file gets ``direct_io`` (the kernel then sends
no ``GETXATTR security.capability`` before each write). Buffered handles of
the same file keep the page cache; whatever order the two kinds of handle
write and read in, each sees the other's data, and a checkpoint or remount
keeps it.
"""

from __future__ import annotations

import errno
import mmap
import os
import random

import pytest

from tests.fs.mounts import mountctl

MiB = 1 << 20
BS = 4096


def _aligned(data: bytes) -> mmap.mmap:
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    return buf


def _direct_read(fd: int, off: int, n: int) -> bytes:
    buf = mmap.mmap(-1, n)
    assert os.preadv(fd, [buf], off) == n
    return bytes(buf)


@pytest.mark.parametrize("role", ["secondary", "primary"])
def test_direct_and_buffered_handles_see_each_other(mounts, role):
    m = mounts(role)
    mountctl("create", m.mnt, "vm1/d0", "--size", "4M")
    f = m.path("vm1", "d0.raw")
    expected = bytearray(4 * MiB)
    fb = os.open(f, os.O_RDWR)
    fd = os.open(f, os.O_RDWR | os.O_DIRECT)
    try:
        # A buffered handle has the block cached; a direct write must replace what it sees.
        assert os.pread(fb, BS, 0) == bytes(BS)
        os.pwrite(fd, _aligned(b"A" * BS), 0)
        expected[0:BS] = b"A" * BS
        assert os.pread(fb, BS, 0) == b"A" * BS
        # A dirty buffered page (writeback cache) is what a direct read returns.
        os.pwrite(fb, b"B" * BS, BS)
        expected[BS : 2 * BS] = b"B" * BS
        assert _direct_read(fd, BS, BS) == b"B" * BS
        # A direct write after a buffered one to the same block wins, also after fsync.
        os.pwrite(fb, b"C" * BS, 2 * BS)
        os.pwrite(fd, _aligned(b"D" * BS), 2 * BS)
        expected[2 * BS : 3 * BS] = b"D" * BS
        os.fsync(fb)
        assert os.pread(fb, BS, 2 * BS) == b"D" * BS
        # Random interleaving, unaligned direct requests included (FUSE takes any alignment).
        rnd = random.Random(5)
        for _ in range(200):
            off = rnd.randrange(0, 4 * MiB - 20000)
            n = rnd.randrange(1, 20000)
            data = rnd.randbytes(n)
            if rnd.random() < 0.5:
                os.pwrite(fd, data, off)
            else:
                os.pwrite(fb, data, off)
            expected[off : off + n] = data
            roff = rnd.randrange(0, 4 * MiB - 20000)
            rn = rnd.randrange(1, 20000)
            got = os.pread(fd if rnd.random() < 0.5 else fb, rn, roff)
            assert got == expected[roff : roff + rn]
        os.fsync(fd)
    finally:
        os.close(fd)
        os.close(fb)
    m.remount()
    with open(f, "rb") as r:
        assert r.read() == expected


def test_direct_handle_cannot_be_mapped_shared(sec):
    """The one thing a direct_io handle refuses; a buffered handle of the same file maps fine."""
    mountctl("create", sec.mnt, "vm1/d0", "--size", "1M")
    f = sec.path("vm1", "d0.raw")
    fd = os.open(f, os.O_RDWR | os.O_DIRECT)
    try:
        with pytest.raises(OSError) as exc:
            mmap.mmap(fd, MiB)
        assert exc.value.errno == errno.ENODEV
    finally:
        os.close(fd)
    fb = os.open(f, os.O_RDWR)
    try:
        with mmap.mmap(fb, MiB) as mm:
            mm[:4] = b"abcd"
            mm.flush()
    finally:
        os.close(fb)
    with open(f, "rb") as r:
        assert r.read(4) == b"abcd"
