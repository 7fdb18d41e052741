"""fio with crc32c verification on the mounted file, and concurrent O_DIRECT writes that span requests.

QEMU 7.2's own FUSE export corrupts data when one O_DIRECT write is split by
the kernel into several FUSE requests that are in flight together; these
tests are the check that colofs does not.
"""

from __future__ import annotations

import mmap
import os
import random
import subprocess
import threading

import pytest

from tests.fs.mounts import mountctl

MiB = 1 << 20

JOBS = {
    "buffered-psync-4k": ["--ioengine=psync", "--direct=0", "--rw=randwrite", "--bs=4k", "--size=16M"],
    "buffered-psync-1m-4m": ["--ioengine=psync", "--direct=0", "--rw=write", "--bsrange=1m-4m", "--size=48M"],
    "buffered-psync-512-64k": ["--ioengine=psync", "--direct=0", "--rw=randwrite", "--bsrange=512-64k",
                               "--size=8M"],
    "direct-psync-512-1m": ["--ioengine=psync", "--direct=1", "--rw=randwrite", "--bsrange=512-1m",
                            "--size=32M"],
    "direct-libaio-qd16-4k": ["--ioengine=libaio", "--direct=1", "--iodepth=16", "--rw=randwrite",
                              "--bs=4k", "--size=8M"],
    "direct-libaio-qd16-4m": ["--ioengine=libaio", "--direct=1", "--iodepth=16", "--rw=randwrite",
                              "--bs=4m", "--size=64M"],
    "direct-libaio-qd16-512-4m": ["--ioengine=libaio", "--direct=1", "--iodepth=16", "--rw=randwrite",
                                  "--bsrange=512-4m", "--size=64M"],
    "buffered-libaio-qd16-128k": ["--ioengine=libaio", "--direct=0", "--iodepth=16", "--rw=randwrite",
                                  "--bs=128k", "--size=32M"],
    "mmap-64k": ["--ioengine=mmap", "--rw=randwrite", "--bs=64k", "--size=16M"],
}


def fio(path, *opts: str, verify_only: bool = False):
    args = [
        "fio", "--name=check", f"--filename={path}", "--verify=crc32c", "--verify_fatal=1",
        "--do_verify=1", "--fallocate=none", "--randrepeat=1", "--randseed=1234", "--output-format=terse",
        "--allow_file_create=0", "--verify_state_save=0", *opts,
    ]
    if verify_only:
        args.append("--verify_only")
    res = subprocess.run(args, capture_output=True, text=True, timeout=240, check=False)
    assert res.returncode == 0 and "verify:" not in res.stderr, res.stdout + res.stderr
    return res


@pytest.mark.parametrize("job", sorted(JOBS))
def test_fio_verify(sec, job):
    mountctl("create", sec.mnt, "vm1/d0", "--size", "64M")
    f = sec.path("vm1", "d0.raw")
    fio(f, *JOBS[job])
    if "libaio-qd16-4m" in job:
        sec.remount()
        fio(f, *JOBS[job], verify_only=True)


@pytest.mark.parametrize("role", ["secondary", "primary"])
def test_concurrent_direct_writes_spanning_requests(mounts, role):
    """Threads write 3 MiB + 777 bytes with O_DIRECT at once, back to back at unaligned offsets.

    Each write becomes four FUSE requests; neighbours share the disk block at
    their boundary (read-modify-write on both sides). Every byte must land.
    """
    m = mounts(role)
    mountctl("create", m.mnt, "vm1/d0", "--size", "64M")
    f = m.path("vm1", "d0.raw")
    rnd = random.Random(5)
    span = 3 * MiB + 777
    start = 1000
    count = 12
    errors: list[BaseException] = []

    def writer(off: int, data: bytes) -> None:
        try:
            buf = mmap.mmap(-1, len(data))
            buf.write(data)
            fd = os.open(f, os.O_WRONLY | os.O_DIRECT)
            try:
                assert os.pwrite(fd, buf, off) == len(data)
            finally:
                os.close(fd)
        except BaseException as e:
            errors.append(e)

    expected = b""
    for _ in range(2):  # the second round overwrites blocks already written
        slots = [(start + i * span, rnd.randbytes(span)) for i in range(count)]
        threads = [threading.Thread(target=writer, args=s) for s in slots]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        expected = b"".join(data for _, data in slots)

    def check() -> None:
        with open(f, "rb") as r:
            got = r.read(start + count * span + 4096)
        assert got[:start] == bytes(start), "bytes before the first write changed"
        assert got[start + count * span :] == bytes(4096), "bytes after the last write changed"
        body = got[start : start + count * span]
        for i in range(count):
            assert body[i * span : (i + 1) * span] == expected[i * span : (i + 1) * span], f"write {i} differs"

    check()
    m.remount()
    check()
