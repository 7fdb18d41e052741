"""The pair harness (mountctl/pair.py) that the demo and the benchmarks start their mounts with.

It must drive a real pair (replicate, checkpoint) and, whatever happened, leave nothing behind but
what it did not start: cleanup after a killed daemon detaches the stale mount, and a daemon that
already served the store before the harness tried to mount it is never taken for its own.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mountctl.pair import Node, Pair, PairError, alive
from tests.mountable import mount_skip_reason

MiB = 1 << 20

pytestmark = pytest.mark.skipif(mount_skip_reason() is not None, reason=mount_skip_reason() or "")


def mounts_under(root: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p.startswith(str(root) + "/")]


def test_a_pair_replicates_checkpoints_and_cleans_up(tmp_path: Path):
    with Pair(tmp_path) as pair:
        pair.start()
        pids = pair.primary.pids + pair.secondary.pids
        assert len(pids) == 2 and all(alive(p) for p in pids)
        assert oct(os.stat(pair.key).st_mode & 0o777) == "0o600"
        pfile = pair.primary.create("vm1", 4 * MiB, disk="d0")
        sfile = pair.wait_disk("vm1", "d0")
        data = os.urandom(MiB)
        with open(pfile, "r+b") as f:
            f.write(data)
            os.fsync(f.fileno())
        pair.wait_acked("vm1")
        assert pair.checkpoint("vm1")["replicated"] is True
        with open(sfile, "rb") as f:
            assert f.read(MiB) == data
    assert mounts_under(tmp_path) == []
    assert not any(alive(p) for p in pids)


def test_cleanup_after_a_killed_daemon_detaches_its_stale_mount(tmp_path: Path):
    node = Node(tmp_path, "lone", "secondary")
    try:
        node.mount()
        pid = node.pid
        assert pid is not None
        node.kill()
        assert not alive(pid)
        with pytest.raises(OSError):
            os.stat(node.mnt)  # stale: the daemon is gone, the mount is not
    finally:
        node.cleanup()
    assert mounts_under(tmp_path) == []
    assert os.path.isdir(node.mnt)


def test_a_daemon_already_serving_the_store_is_not_taken_for_ours(tmp_path: Path):
    owner = Node(tmp_path, "shared", "secondary")
    other = Node(tmp_path, "shared", "secondary")  # the same store ...
    other.mnt = tmp_path / "elsewhere-mnt"  # ... mounted a second time on another mountpoint
    try:
        owner.mount()
        with pytest.raises(PairError, match="already mounted"):
            other.mount()
        assert other.pids == []
        other.cleanup()  # must not stop the owner's daemon
        assert owner.pid is not None and os.path.ismount(owner.mnt)
    finally:
        other.cleanup()
        owner.cleanup()
    assert mounts_under(tmp_path) == []


def test_a_node_mounts_again_over_the_stale_mount_its_killed_daemon_left(tmp_path: Path):
    node = Node(tmp_path, "again", "secondary")
    try:
        node.mount()
        first = node.pid
        node.kill()
        node.mount()  # the mountpoint answers ENOTCONN until mountctl detaches it
        assert node.pid not in (None, first) and os.path.ismount(node.mnt)
    finally:
        node.cleanup()
    assert mounts_under(tmp_path) == []


class FailingUmount(Node):
    """A node whose mountctl fails its own way (as the tests' mounts do, with AssertionError) on umount."""

    def mountctl(self, *args: str, timeout: float = 120):
        if args[0] == "umount":
            raise AssertionError("umount refused")
        return super().mountctl(*args, timeout=timeout)


def test_cleanup_kills_and_detaches_whatever_error_a_subclass_raises(tmp_path: Path):
    node = FailingUmount(tmp_path, "stubborn", "secondary")
    try:
        node.mount()
        pid = node.pid
    finally:
        node.cleanup()
    assert pid is not None and not alive(pid)
    assert mounts_under(tmp_path) == []
