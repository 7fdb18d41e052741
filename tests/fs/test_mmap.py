"""mmap on the mounted file: writes through a mapping survive an unmount and remount."""

from __future__ import annotations

import mmap
import os
import random

import pytest

from tests.fs.mounts import mountctl

MiB = 1 << 20


@pytest.mark.parametrize("role", ["secondary", "primary"])
@pytest.mark.parametrize("msync", [True, False])
def test_mmap_write_then_read_after_remount(mounts, role, msync):
    m = mounts(role)
    mountctl("create", m.mnt, "vm1/d0", "--size", "8M")
    f = m.path("vm1", "d0.raw")
    rnd = random.Random(11)
    expected = bytearray(8 * MiB)
    fd = os.open(f, os.O_RDWR)
    try:
        with mmap.mmap(fd, 8 * MiB) as mm:
            for _ in range(50):
                off = rnd.randrange(0, 8 * MiB - 9000)
                data = rnd.randbytes(rnd.randrange(1, 9000))
                mm[off : off + len(data)] = data
                expected[off : off + len(data)] = data
            if msync:
                mm.flush()
            assert mm[:] == expected
    finally:
        os.close(fd)
    m.remount()  # without msync, the unmount writes the dirty pages back
    fd = os.open(f, os.O_RDONLY)
    try:
        with mmap.mmap(fd, 8 * MiB, prot=mmap.PROT_READ) as mm:
            assert mm[:] == expected
    finally:
        os.close(fd)
    with open(f, "rb") as r:
        assert r.read() == expected
