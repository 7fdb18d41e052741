"""QEMU's own tools on the mounted file: qemu-io patterns, qemu-img info/convert/compare."""

from __future__ import annotations

import pytest

from tests.fs.conftest import random_image
from tests.fs.mounts import mountctl, run

MiB = 1 << 20
SIZE = 64 * MiB

# (offset, length): aligned, unaligned, sub-sector, block-straddling, multi-request, last bytes.
REGIONS = [
    (0, 4096),
    (1 * MiB, 65536),
    (2 * MiB + 1000, 5000),
    (3 * MiB + 100, 17),
    (3 * MiB + 513, 3),
    (4 * MiB + 4090, 12),
    (4 * MiB + 8191, 2),
    (5 * MiB, 3 * MiB),
    (9 * MiB + 4095, MiB + 2),
    (SIZE - 4096 - 7, 4096),
    (SIZE - 1, 1),
]


def qemu_io(path, *cmds: str, cache: str = "writeback"):
    args = ["qemu-io", "-f", "raw", "-t", cache]
    for c in cmds:
        args += ["-c", c]
    return run(*args, path, check=False)


def _checked(res):
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "failed" not in out and "Pattern verification" not in out, out
    return out


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_qemu_io_patterns(sec, cache):
    mountctl("create", sec.mnt, "vm1/d0", "--size", "64M")
    f = sec.path("vm1", "d0.raw")
    writes = [f"write -P {0x10 + i} {off} {ln}" for i, (off, ln) in enumerate(REGIONS)]
    reads = [f"read -P {0x10 + i} {off} {ln}" for i, (off, ln) in enumerate(REGIONS)]
    _checked(qemu_io(f, *writes, *reads, cache=cache))
    # Another process, the other cache mode: the same data, and the gaps are still zero.
    other = "none" if cache == "writeback" else "writeback"
    gaps = ["read -P 0 4096 4096", "read -P 0 3145728 100", "read -P 0 4198406 4089"]
    _checked(qemu_io(f, *reads, *gaps, cache=other))
    # After a remount (everything flushed through umount), still the same.
    sec.remount()
    _checked(qemu_io(f, *reads, *gaps, cache="none"))


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_qemu_io_past_the_end_fails_cleanly(sec, cache):
    mountctl("create", sec.mnt, "vm1/d0", "--size", "4M")
    f = sec.path("vm1", "d0.raw")
    for cmd in (f"write -P 1 {4 * MiB} 512", f"write -P 1 {4 * MiB - 512} 1024", f"read {4 * MiB} 512"):
        res = qemu_io(f, cmd, cache=cache)
        assert "failed" in res.stdout + res.stderr, cmd
    _checked(qemu_io(f, f"read -P 0 {4 * MiB - 4096} 4096", cache=cache))


def test_qemu_img_info_convert_compare(sec, tmp_path):
    src = tmp_path / "src.raw"
    random_image(src, 32 * MiB, seed=7)
    mountctl("create", sec.mnt, "vm1/d0", "--size", "32M")
    f = sec.path("vm1", "d0.raw")
    info = run("qemu-img", "info", f).stdout
    assert "virtual size: 32 MiB" in info
    # Into the mount with O_DIRECT, from the mount into a local file with the page cache.
    run("qemu-img", "convert", "-n", "-t", "none", "-f", "raw", "-O", "raw", src, f)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, f)
    back = tmp_path / "back.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", f, back)
    run("qemu-img", "compare", "-T", "none", "-f", "raw", "-F", "raw", back, f)
    assert back.read_bytes() == src.read_bytes()
    sec.remount()
    run("qemu-img", "compare", "-T", "none", "-f", "raw", "-F", "raw", src, f)
