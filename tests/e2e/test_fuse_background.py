"""A primary VM's mount has the kernel queue fewer asynchronous requests while large writes arrive (its memory bound).

Each queued 1 MiB write is held twice in the VM's worker while it is served
(libfuse's buffer, pyfuse3's copy); colofs lowers the connection's
``max_background`` on a primary VM's mount through fusectl while large
writes arrive, and gives the kernel's value back after a run of small ones
(a sync primary's small writes share the secondary's round trips by it).
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from colofs.fs.fuseconn import (
    CALM_WRITES,
    FUSECTL,
    LARGE_WRITE,
    PRIMARY_MAX_BACKGROUND,
    BackgroundLimit,
    connection_id,
)
from tests.e2e.pair import Pair
from tests.fs.mounts import mountctl
from tests.waiting import wait_until_sync

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


def _conn_dir(tmp_path: Path, value: int) -> Path:
    d = tmp_path / "conn"
    d.mkdir()
    (d / "max_background").write_text(f"{value}\n")
    (d / "congestion_threshold").write_text(f"{value * 3 // 4}\n")
    return d


def _value(d: Path) -> int:
    return int((d / "max_background").read_text())


def test_the_limit_follows_the_size_of_the_writes(tmp_path: Path) -> None:
    d = _conn_dir(tmp_path, 12)
    limit = BackgroundLimit(d, 12, lambda: True)
    limit.note_write(4096)
    assert _value(d) == 12  # small writes alone keep the kernel's depth
    limit.note_write(LARGE_WRITE)
    assert _value(d) == PRIMARY_MAX_BACKGROUND
    assert int((d / "congestion_threshold").read_text()) == PRIMARY_MAX_BACKGROUND * 3 // 4
    for _ in range(CALM_WRITES - 1):
        limit.note_write(4096)
    assert _value(d) == PRIMARY_MAX_BACKGROUND  # not yet: a run of small writes
    limit.note_write(LARGE_WRITE)
    for _ in range(CALM_WRITES - 1):
        limit.note_write(4096)
    assert _value(d) == PRIMARY_MAX_BACKGROUND  # the large write restarted the run
    limit.note_write(4096)
    assert _value(d) == 12
    assert limit.switches == 2


def test_the_limit_is_lowered_only_while_the_vm_is_a_primary(tmp_path: Path) -> None:
    d = _conn_dir(tmp_path, 12)
    primary = False
    limit = BackgroundLimit(d, 12, lambda: primary)
    limit.note_write(1 << 20)
    assert _value(d) == 12
    primary = True  # a failover made it one
    limit.note_write(1 << 20)
    assert _value(d) == PRIMARY_MAX_BACKGROUND


def test_a_limit_whose_connection_is_gone_stops_trying(tmp_path: Path) -> None:
    d = _conn_dir(tmp_path, 12)
    limit = BackgroundLimit(d / "gone", 12, lambda: True)
    limit.note_write(1 << 20)
    limit.note_write(1 << 20)
    assert limit.switches == 1 and limit.current == 12


def _direct_write(path: Path, size: int, offset: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, size)  # O_DIRECT wants an aligned buffer
    try:
        buf.write(b"\x5a" * size)
        assert os.pwritev(fd, [buf], offset) == size
    finally:
        buf.close()
        os.close(fd)


def test_a_primary_vm_mount_queues_fewer_background_requests_while_large_writes_arrive(pair: Pair) -> None:
    if not os.path.isdir(FUSECTL):
        pytest.skip(f"no {FUSECTL}: the kernel's fuse module has no fusectl")
    pair.start()
    mountctl("create", pair.pri.mnt, "vm1/d0", "--size", str(SIZE))
    pair.wait_disk("vm1", "d0", SIZE)
    pri, sec = pair.pri.mnt / "vm1", pair.sec.mnt / "vm1"
    default = _max_background(sec)
    assert default > PRIMARY_MAX_BACKGROUND

    def lowered_by_a_large_write() -> bool:  # the worker finds its connection once it serves the mount
        _direct_write(pri / "d0.raw", 1 << 20, 0)
        return _max_background(pri) == PRIMARY_MAX_BACKGROUND

    wait_until_sync(lowered_by_a_large_write, 60, "the primary's queue bound under 1 MiB writes")
    for i in range(CALM_WRITES):
        _direct_write(pri / "d0.raw", 4096, (i % 256) * 4096)
    assert _max_background(pri) == default  # small writes get the kernel's depth back
    _direct_write(sec / "d0.raw", 1 << 20, 0)  # the SVM's file on the secondary
    assert _max_background(sec) == default  # a secondary's keeps the kernel's
