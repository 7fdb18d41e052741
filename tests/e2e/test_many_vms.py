"""A pair with 64 VMs of 1 TiB and hundreds of snapshots: every mountctl command still answers.

No extended attribute may grow with the number of VMs or snapshots past the
64 KiB the kernel allows: the root's status names the VMs, each VM's
directory gives its detail, and snapshot lists are read in pages.
"""

from __future__ import annotations

import errno
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

from tests.e2e.pair import MiB, Pair, read_file
from tests.fs.mounts import mountctl
from tests.waiting import wait_until_sync

TiB = 1 << 40
VMS = 64
SNAPS = 100
XATTR_MAX = 64 << 10
P = "user.colofs."


def _streaming(pair: Pair, vm: str) -> bool:
    st = pair.vm_status(pair.pri, vm)
    return bool(st) and st["peer"].get("link_state") == "streaming"


def test_a_new_1tib_disk_on_a_pair_needs_no_resync(pair: Pair) -> None:
    pair.start()
    t0 = time.monotonic()
    mountctl("create", pair.pri.mnt, "vm1/d0", "--size", "1T")
    took = time.monotonic() - t0
    pair.wait_disk("vm1", "d0", TiB, timeout=60)
    wait_until_sync(lambda: _streaming(pair, "vm1"), 60, "vm1 to stream")
    peer = pair.vm_status(pair.pri)["peer"]
    assert peer["resyncs"] == 0 and peer["full_syncs"] == 0 and peer["dirty_blocks"] == 0, peer
    assert "resync of" not in pair.pri.log(), "a new, empty disk was resynchronised"
    spots = [0, 300 << 30, TiB - MiB]
    fd = os.open(pair.pfile(), os.O_RDWR)
    try:
        for i, off in enumerate(spots):
            os.pwrite(fd, bytes([i + 1]) * MiB, off)
    finally:
        os.close(fd)
    pair.checkpoint()
    for off in spots:
        with open(pair.pfile(), "rb") as p, open(pair.sfile(), "rb") as s:
            p.seek(off)
            s.seek(off)
            assert p.read(MiB) == s.read(MiB) != bytes(MiB)
    assert "resync of" not in pair.pri.log()
    print(f"create of a 1 TiB disk on a pair: mountctl returned in {took:.2f} s")


def _snapshot_all(pair: Pair, vm: str, names: list[str]) -> None:
    disk = pair.pfile(vm)
    for name in names:
        os.setxattr(disk, P + "snapshot", name.encode())


def test_64_vms_with_100_snapshots_each_through_mountctl(pair: Pair) -> None:
    pair.start()
    names = [f"vm{i:02d}" for i in range(VMS)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda vm: mountctl("create", pair.pri.mnt, f"{vm}/d0", "--size", "1T"), names))
    for vm in names:
        pair.wait_disk(vm, "d0", TiB, timeout=120)
    wait_until_sync(lambda: all(_streaming(pair, vm) for vm in names), 120, "every VM to stream")
    assert "resync of" not in pair.pri.log()

    # 100 snapshots in each VM; one VM with 500 long-named ones, a listing well past one xattr value.
    long = [f"a-rather-long-snapshot-name-to-fill-the-listing-{k:04d}" for k in range(500)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda vm: _snapshot_all(pair, vm, [f"s{k:03d}" for k in range(SNAPS)]), names[1:]))
    _snapshot_all(pair, names[0], long)
    mountctl("snapshot", pair.pfile(names[1]), "by-mountctl")

    # Every value stays inside the kernel's limit; the whole list is not one value any more.
    for path in (pair.pri.mnt, pair.sec.mnt, pair.pri.path(names[0]), pair.pfile(names[0])):
        assert len(os.getxattr(path, P + "status")) < XATTR_MAX
    root = json.loads(os.getxattr(pair.pri.mnt, P + "status"))
    assert root["vm_count"] == VMS and root["vms"] == names and root["vm_pages"] == 1
    try:
        os.getxattr(pair.pri.path(names[0]), P + "snapshots")
        raise AssertionError("a listing over 64 KiB was answered whole")
    except OSError as e:
        assert e.errno == errno.E2BIG
    first = json.loads(os.getxattr(pair.pri.path(names[0]), P + "snapshots.0"))
    assert first["count"] == 500 and first["pages"] > 1

    listing = json.loads(mountctl("snapshot", "--list", pair.pri.path(names[0]), "--json").stdout)
    assert [s["name"] for s in listing] == long
    text = mountctl("snapshot", "--list", pair.pfile(names[1])).stdout.splitlines()
    assert len(text) == SNAPS + 1 and all(line.startswith(f"{names[1]}/snapshot:") for line in text)

    full = json.loads(mountctl("status", pair.pri.mnt, "--json").stdout)
    assert sorted(full["vms"]) == names
    assert len(full["vms"][names[0]]["disks"]["d0"]["snapshots"]) == 500
    assert all(full["vms"][vm]["peer"]["state"] == "connected" for vm in names)
    human = mountctl("status", pair.pri.mnt).stdout
    assert all(f"\n{vm} role:primary" in human for vm in names[1:]) and human.count("snapshot:s099") == VMS - 1
    one = json.loads(mountctl("status", pair.pri.mnt, names[5], "--json").stdout)
    assert one["vm"] == names[5] and len(one["disks"]["d0"]["snapshots"]) == SNAPS
    sec = json.loads(mountctl("status", pair.sec.mnt, "--json").stdout)
    assert sorted(sec["vms"]) == names

    # A create after all that still works, and both sides unmount cleanly.
    mountctl("create", pair.pri.mnt, "extra/d0", "--size", "1G")
    pair.wait_disk("extra", "d0", 1 << 30, timeout=60)
    assert read_file(pair.sfile("extra"), direct=True)[:4096] == bytes(4096)
    assert "closed cleanly" in pair.pri.umount().stdout
    assert "closed cleanly" in pair.sec.umount().stdout
