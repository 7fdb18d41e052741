"""Import and create through a real mount: only what can be copied safely is taken, and a failure leaves nothing.

* a FIFO source is refused at once, naming what it is (it used to hold the
  control path, and mkdir on the mount root, until someone wrote to it);
* a source that shrinks or is written while it is copied fails the import,
  and neither the disk nor the VM the import made is left in the store; the
  change is made by ``tests.fs.shrinkfs`` at the moment the copy reads past
  a chosen offset, so it lands mid-copy on any machine;
* a size the store cannot hold is refused with EFBIG before anything exists;
* a block device is imported, unless it is claimed (mounted); mountctl names a directory or a character
  device instead of calling it "no such image file".
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fs.mounts import XATTR as P
from tests.fs.mounts import Mount, errno_of, last_error, mountctl, run
from tests.waiting import wait_until_sync

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
OLD_NS = 10**18  # a fixed old mtime: any write during the test makes a different one


def store_entries(m: Mount) -> set[str]:
    """What the store holds besides its marker and the daemon's own files."""
    return {e for e in os.listdir(m.store) if not e.startswith(".") and e != "colofs-store"}


def import_request(vm: str, disk: str, source: Path) -> bytes:
    return json.dumps({"vm": vm, "disk": disk, "source": str(source)}).encode()


# -- a FIFO ---------------------------------------------------------------------------------

SET_AND_REPORT = """
import errno, os, sys
root, value = sys.argv[1], sys.argv[2].encode()
try:
    os.setxattr(root, "user.colofs.import", value)
    print("ok")
except OSError as e:
    print(errno.errorcode[e.errno], os.getxattr(root, "user.colofs.last_error").decode())
"""


def test_a_fifo_is_refused_at_once_and_the_mount_root_stays_usable(sec: Mount, tmp_path: Path) -> None:
    fifo = tmp_path / "image.fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-c", SET_AND_REPORT, str(sec.mnt), import_request("vm1", "d0", fifo)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        # The daemon is stuck opening the FIFO: a writer frees it, so the mount can be cleaned up.
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        proc.communicate(timeout=30)
        pytest.fail("the import of a FIFO did not answer within 30 s (the daemon blocked opening it)")
    assert out.startswith("EINVAL "), (out, err)
    assert "is a FIFO (named pipe)" in out and "a regular file or a block device" in out, out
    os.mkdir(sec.path("vm2"))  # the root is not held by anything
    assert store_entries(sec) == {"vm2"}


# -- a source that changes during the copy ----------------------------------------------------------


@pytest.fixture
def shrinkfs(tmp_path: Path) -> Iterator[Path]:
    src, mnt = tmp_path / "shrinkfs-src", tmp_path / "shrinkfs"
    src.mkdir()
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "tests.fs.shrinkfs", str(src), str(mnt)], cwd=ROOT,
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


def _image_on(fs: Path, size: int) -> Path:
    backing = fs.parent / "shrinkfs-src" / "img.raw"
    backing.write_bytes(os.urandom(size))
    os.utime(backing, ns=(OLD_NS, OLD_NS))
    return fs / "img.raw"


@pytest.mark.parametrize(
    ("change", "words"),
    [({"truncate": 3 * MiB}, "ended at"), ({"write_at": 0}, "modification time changed")],
    ids=["shrinks", "is-rewritten"],
)
def test_a_source_that_changes_during_the_copy_fails_and_leaves_nothing(
    sec: Mount, shrinkfs: Path, change: dict[str, int], words: str
) -> None:
    image = _image_on(shrinkfs, 8 * MiB)
    # Changed as the copy asks for the data at 4 MiB: half of it is already copied.
    os.setxattr(shrinkfs, "user.shrinkfs.trigger", json.dumps({"path": "img.raw", "after": 4 * MiB, **change}).encode())
    code = errno_of(os.setxattr, sec.mnt, P + "import", import_request("vm1", "d0", image))
    assert os.getxattr(shrinkfs, "user.shrinkfs.fired") == b"1"  # the change did happen mid-copy
    msg = last_error(sec.mnt)
    assert code == errno.EBUSY, (code, msg)
    assert "changed" in msg or "shrank" in msg, msg
    assert words in msg, msg
    assert store_entries(sec) == set()  # neither the disk nor the VM the import made
    assert not sec.path("vm1").exists()
    # The same VM and disk can be imported once the source holds still.
    os.setxattr(shrinkfs, "user.shrinkfs.trigger", json.dumps({"path": "none", "after": 0, "write_at": 0}).encode())
    os.setxattr(sec.mnt, P + "import", import_request("vm1", "d0", image))
    assert sec.path("vm1", "d0.raw").read_bytes() == (shrinkfs.parent / "shrinkfs-src" / "img.raw").read_bytes()


# -- sizes the store cannot hold ----------------------------------------------------------------------


def test_a_size_the_store_cannot_hold_is_refused_before_anything_is_made(sec: Mount) -> None:
    huge = json.dumps({"vm": "u2", "disk": "big", "size": 1 << 62}).encode()
    assert errno_of(os.setxattr, sec.mnt, P + "create", huge) == errno.EFBIG
    assert "4611686018427387904 bytes is more than" in last_error(sec.mnt)
    assert store_entries(sec) == set()
    # Into a VM that exists: no half-made disk directory either.
    os.mkdir(sec.path("u3"))
    huge = json.dumps({"vm": "u3", "disk": "big", "size": 1 << 62}).encode()
    assert errno_of(os.setxattr, sec.mnt, P + "create", huge) == errno.EFBIG
    assert sorted(os.listdir(sec.store / "u3")) == ["state"]
    beyond_off_t = json.dumps({"vm": "u4", "disk": "big", "size": 1 << 64}).encode()
    assert errno_of(os.setxattr, sec.mnt, P + "create", beyond_off_t) == errno.EFBIG
    assert store_entries(sec) == {"u3"}
    # A pending file given that size by truncate stays pending.
    pending = sec.path("u3", "new.raw")
    pending.touch()
    assert errno_of(os.truncate, pending, 1 << 62) == errno.EINVAL
    assert sorted(os.listdir(sec.store / "u3")) == ["state"]
    mountctl("create", sec.mnt, "u3/small", "--size", "1M")  # the VM is still fine


# -- block devices and mountctl ------------------------------------------------------------------------


def test_a_block_device_is_imported(sec: Mount, tmp_path: Path) -> None:
    backing = tmp_path / "dev.img"
    data = os.urandom(4 * MiB)
    backing.write_bytes(data)
    res = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, timeout=30,
                         check=False)
    if res.returncode != 0:
        pytest.skip(f"no loop device here: {res.stderr.strip()}")
    dev = res.stdout.strip()
    try:
        claim = os.open(dev, os.O_RDONLY | os.O_EXCL)  # as a mounted file system would
        try:
            res = mountctl("import", sec.mnt, "vm1/d0", "--from", dev, check=False)
            assert res.returncode == 1 and "the block device is in use" in res.stderr, res.stderr
        finally:
            os.close(claim)
        assert store_entries(sec) == set()
        out = mountctl("import", sec.mnt, "vm1/d0", "--from", dev).stdout
        assert "imported" in out
        assert sec.path("vm1", "d0.raw").read_bytes() == data
        assert os.stat(sec.path("vm1", "d0.raw")).st_size == 4 * MiB
    finally:
        run("losetup", "-d", dev, check=False)
        wait_until_sync(lambda: dev not in run("losetup", "-a", check=False).stdout, 30, f"{dev} detached")


def test_mountctl_says_what_a_source_is(sec: Mount, tmp_path: Path) -> None:
    res = mountctl("import", sec.mnt, "vm1/d0", "--from", tmp_path, check=False)
    assert res.returncode == 1 and f"{tmp_path} is a directory" in res.stderr, res.stderr
    res = mountctl("import", sec.mnt, "vm1/d0", "--from", "/dev/null", check=False)
    assert res.returncode == 1 and "/dev/null is a character device" in res.stderr, res.stderr
    assert "no such image" not in res.stderr
    res = mountctl("import", sec.mnt, "vm1/d0", "--from", tmp_path / "none.raw", check=False)
    assert res.returncode == 1 and "no such image file" in res.stderr
    # The daemon names it too, for a caller that asks it directly.
    req = import_request("vm1", "d0", Path("/dev/null"))
    assert errno_of(os.setxattr, sec.mnt, P + "import", req) == errno.EINVAL
    assert "/dev/null is a character device" in last_error(sec.mnt)
    assert store_entries(sec) == set()
