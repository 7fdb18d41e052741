"""The pair through its control plane: disks created on the primary, a wrong key, sync mode."""

from __future__ import annotations

import errno
import json
import os

import pytest

from mountctl.pair import write_key
from tests.e2e.pair import MiB, Pair, direct_pwrite, read_file
from tests.fs.mounts import mountctl, run
from tests.waiting import wait_until_sync


def test_disks_created_on_the_primary_appear_on_the_secondary(pair: Pair, tmp_path) -> None:
    pair.start()
    mountctl("create", pair.pri.mnt, "vm1/d0", "--size", "64M")
    # Replicated from the moment it exists (not after the replicator's periodic scan).
    assert pair.peer(pair.pri)["state"] in ("connecting", "resyncing", "connected")
    pair.wait_disk("vm1", "d0", 64 * MiB)
    # With plain tools: a new VM, then a second disk in a VM that is already replicated.
    pair.pri.path("vm2").mkdir()
    assert pair.peer(pair.pri, "vm2")["state"] in ("connecting", "resyncing", "connected")
    run("qemu-img", "create", "-f", "raw", pair.pfile("vm2", "sys"), "10M")
    pair.wait_disk("vm2", "sys", 10 * MiB)
    run("qemu-img", "create", "-f", "raw", pair.pfile("vm1", "extra"), "3M")
    pair.wait_disk("vm1", "extra", 3 * MiB)
    assert sorted(os.listdir(pair.sec.path("vm1"))) == ["d0.raw", "extra.raw"]
    # An imported image: its data reaches the secondary, and a checkpoint makes both files equal.
    image = tmp_path / "img.raw"
    image.write_bytes(os.urandom(2 * MiB) + bytes(MiB))
    mountctl("import", pair.pri.mnt, "vm1/data", "--from", image)
    pair.wait_disk("vm1", "data", 3 * MiB)
    with open(pair.pfile("vm2", "sys"), "r+b") as f:
        f.seek(5 * MiB)
        f.write(b"vm2 writes")
    for vm in ("vm1", "vm2"):
        res = pair.checkpoint(vm)
        assert res["replicated"] and res["seq"] == pair.vm_status(pair.pri, vm)["last_applied"]
    assert read_file(pair.sfile("vm1", "data")) == image.read_bytes()
    for vm, disk in (("vm1", "d0"), ("vm1", "extra"), ("vm1", "data"), ("vm2", "sys")):
        assert read_file(pair.sfile(vm, disk)) == read_file(pair.pfile(vm, disk)), f"{vm}/{disk}"
    rep = pair.pri.status()["replication"]
    assert rep["state"] == "running" and rep["role"] == "primary" and rep["vms"] == rep["connected"] == 2
    rep = pair.sec.status()["replication"]
    assert rep["role"] == "secondary" and rep["port"] == pair.port and rep["sessions"] == 2


def test_wrong_key_is_refused_on_both_sides(pair: Pair) -> None:
    other = write_key(pair.base / "other.key")
    pair.mount_secondary()
    pair.mount_primary(key=other)
    mountctl("create", pair.pri.mnt, "vm1/d0", "--size", "8M")
    with open(pair.pfile(), "r+b") as f:
        f.write(b"must not reach the secondary")
    wait_until_sync(lambda: pair.peer(pair.pri).get("state") == "refused", what="the primary to be refused")
    assert "rejected our key" in pair.peer(pair.pri)["reason"]
    assert "peer:refused" in mountctl("status", pair.pri.mnt).stdout
    wait_until_sync(lambda: "shared keys differ" in pair.sec.log(), what="the secondary to log the refusal")
    assert "rejected our key" in pair.pri.log()
    st = pair.sec.status()
    assert st["vms"] == {} and not os.listdir(pair.sec.mnt), "nothing may be created or applied"
    assert st["replication"]["refused"] >= 1 and "shared keys differ" in st["replication"]["last_refusal"]
    res = mountctl("checkpoint", "--timeout", "1", pair.pri.path("vm1"), check=False)
    assert res.returncode == 1 and "could not start within 1 s" in res.stderr


def test_sync_mode_waits_for_the_secondary_and_degrades_without_it(pair: Pair) -> None:
    pair.start()
    mountctl("create", pair.pri.mnt, "vm1/d0", "--size", "16M")
    pair.wait_disk("vm1", "d0", 16 * MiB)
    pair.checkpoint()
    vm_dir = pair.pri.path("vm1")
    assert mountctl("mode", vm_dir).stdout.strip() == "vm1: async"
    assert mountctl("mode", vm_dir, "sync").stdout.strip() == "vm1: mode sync"
    assert os.getxattr(vm_dir, "user.colofs.mode") == b"sync\n"
    with pytest.raises(OSError) as e:
        os.setxattr(vm_dir, "user.colofs.mode", b"fast")
    assert e.value.errno == errno.EINVAL
    assert "mode must be one of" in os.getxattr(vm_dir, "user.colofs.last_error").decode()
    assert mountctl("mode", vm_dir, "fast", check=False).returncode == 2
    # Each O_DIRECT write returns only once the secondary has it (its receipt, or the ack of its apply).
    for i in range(20):
        direct_pwrite(pair.pfile(), i * 65536, os.urandom(65536))
        peer = pair.peer(pair.pri)
        held = max(peer["received_seq"], peer["acked_seq"])
        assert held == pair.vm_status(pair.pri)["last_applied"], f"write {i} returned before the secondary had it"
    peer = pair.peer(pair.pri)
    assert peer["mode"] == "sync" and not peer["degraded"] and peer["state"] == "connected"

    # Without the secondary, sync writes complete locally and the VM is reported degraded.
    pair.sec.umount()
    wait_until_sync(lambda: pair.peer(pair.pri)["state"] != "connected", what="the primary to notice")
    direct_pwrite(pair.pfile(), 4 * MiB, os.urandom(MiB))
    peer = pair.peer(pair.pri)
    assert peer["degraded"] and peer["sync_degraded_writes"] >= 1
    assert "DEGRADED" in mountctl("status", pair.pri.mnt, "vm1").stdout
    pair.mount_secondary()
    wait_until_sync(lambda: pair.peer(pair.pri)["state"] == "connected", what="the primary to reconnect")
    res = pair.checkpoint()
    assert read_file(pair.sfile()) == read_file(pair.pfile())
    assert not pair.peer(pair.pri)["degraded"]
    assert json.loads(mountctl("status", pair.pri.mnt, "vm1", "--json").stdout)["mode"] == "sync"
    assert res["seq"] == pair.vm_status(pair.sec)["last_checkpoint"]


def test_keyless_pair_on_loopback(pair: Pair) -> None:
    """Without --key-file the peers only introduce themselves, which is allowed on loopback alone."""
    pair.sec.mount("--listen", f"127.0.0.1:{pair.port}")
    pair.pri.mount("--peer", f"localhost:{pair.port}")
    rep = pair.status(pair.pri)["replication"]
    assert rep["state"] == "running" and rep["authenticated"] is False
    assert "unauthenticated(loopback)" in mountctl("status", pair.pri.mnt).stdout
    mountctl("create", pair.pri.mnt, "vm1/d0", "--size", "4M")
    with open(pair.pfile(), "r+b") as f:
        f.write(b"keyless")
    pair.checkpoint()
    assert read_file(pair.sfile()) == read_file(pair.pfile())
    res = mountctl("mount", "--role", "secondary", "--store", pair.base / "other", "--listen", "192.0.2.1:7788",
                   pair.base, check=False)
    assert res.returncode == 2 and "needs --key-file" in res.stderr
