"""A primary VM's mount has the kernel queue fewer asynchronous requests at once (its memory bound).

Each queued 1 MiB write is held twice in the VM's worker while it is served
(libfuse's buffer, pyfuse3's copy); colofs lowers the connection's
``max_background`` on a primary VM's mount through fusectl.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from colofs.fs.fuseconn import FUSECTL, PRIMARY_MAX_BACKGROUND, connection_id
from tests.e2e.pair import Pair
from tests.fs.mounts import mountctl

SIZE = 16 << 20


def test_connection_id_from_mountinfo(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / / rw - ext4 /dev/sda1 rw\n"
        "80 22 0:61 / /mnt/a\\040b rw - fuse.colofs colofs rw\n"
        "81 22 0:62 / /mnt/c rw - fuse.colofs colofs rw\n"
        "90 81 0:70 / /mnt/c rw - fuse.colofs colofs rw\n"  # mounted over the one before: it is the one seen
        "91 22 259:3 / /mnt/d rw - ext4 /dev/x rw\n"
    )
    assert connection_id("/mnt/a b", str(info)) == 61
    assert connection_id("/mnt/c", str(info)) == 70
    assert connection_id("/mnt/d", str(info)) == (259 << 20) | 3  # the kernel's dev_t, as fusectl names it
    assert connection_id("/mnt/none", str(info)) is None


def _max_background(mountpoint: Path) -> int:
    conn = connection_id(str(mountpoint))
    assert conn is not None, f"{mountpoint} is not in the mount table"
    return int((Path(FUSECTL) / str(conn) / "max_background").read_text())


def test_a_primary_vm_mount_queues_fewer_background_requests(pair: Pair) -> None:
    if not os.path.isdir(FUSECTL):
        pytest.skip(f"no {FUSECTL}: the kernel's fuse module has no fusectl")
    pair.start()
    mountctl("create", pair.pri.mnt, "vm1/d0", "--size", str(SIZE))
    pair.wait_disk("vm1", "d0", SIZE)
    assert _max_background(pair.pri.mnt / "vm1") == PRIMARY_MAX_BACKGROUND
    assert _max_background(pair.sec.mnt / "vm1") > PRIMARY_MAX_BACKGROUND  # a secondary's keeps the kernel's
