"""The VM-rooted inode table and control plane of a worker's mount, and the ``--workers`` options.

A worker mounts one VM at ``MOUNTPOINT/VM``: the mount's root inode is the VM
directory itself, so the same files appear below it and the VM directory's
attributes (not the root's) are on it. These tests look at the tables
without mounting; tests/fs/test_worker_alone.py mounts a worker.
"""

from __future__ import annotations

import argparse
import os

import pyfuse3
import pytest

from colofs.core import Store
from colofs.fs.config import ConfigError, add_mount_arguments, config_from_args, make_config
from colofs.fs.control import PREFIX, MountInfo
from colofs.fs.inodes import InodeTable, Kind
from colofs.fs.operations import Operations

MiB = 1 << 20


@pytest.fixture
async def store(tmp_path) -> Store:
    s = await Store.open(str(tmp_path / "store"), role="secondary", create=True)
    await s.create_disk("vm0", "d0", MiB)
    await s.create_disk("vm0", "d1", MiB)
    await s.vm("vm0").snapshot("s1", ["d0"])
    await s.close()
    scoped = await Store.open(str(tmp_path / "store"), role="secondary", only="vm0")
    yield scoped
    await scoped.close()


async def test_the_root_inode_is_the_vm_directory(store: Store) -> None:
    table = InodeTable(store, root_vm="vm0")
    root = table.get(pyfuse3.ROOT_INODE)
    assert root is table.root and root.kind is Kind.VM and root.vm == "vm0"
    assert table.vm_node("vm0") is root
    names = sorted(n.name for n in table.children(root))
    assert names == ["d0.raw", "d0@s1.raw", "d1.raw"]
    d0 = table.child(root, "d0.raw")
    assert d0 is not None and d0.kind is Kind.DISK
    assert table.parent_of(d0) is root and table.parent_of(root) is root
    assert table.child(root, "vm0") is None  # no VM directory below itself
    attr = table.attributes(root)
    assert attr.st_ino == pyfuse3.ROOT_INODE and attr.st_nlink == 2
    table.remember(d0)
    table.forget(pyfuse3.ROOT_INODE, 5)  # the root is never dropped
    assert table.get(pyfuse3.ROOT_INODE) is root


async def test_the_disk_keeps_its_inode_number_in_both_layouts(store: Store) -> None:
    """A disk's number comes from its names, so it is the same in a worker's mount as in one process."""
    rooted = InodeTable(store, root_vm="vm0")
    whole = InodeTable(store)
    vm_dir = whole.vm_node("vm0")
    assert vm_dir is not None and vm_dir.ino != pyfuse3.ROOT_INODE
    assert rooted.disk_node("vm0", "d0").ino == whole.child(vm_dir, "d0.raw").ino


async def test_vm_root_offers_the_vm_attributes_only(store: Store, tmp_path) -> None:
    cfg = make_config(store=store.path, mountpoint=str(tmp_path / "mnt"), role="secondary")
    worker = {"state": "serving", "pid": os.getpid(), "restarts": 3}
    ops = Operations(store, MountInfo(cfg, os.getpid(), 0.0, worker=worker), root_vm="vm0")
    root = ops.inodes.root
    names = {n[len(PREFIX):].decode() for n in ops.control.list(root)}
    assert {"status", "snapshots", "mode", "verify"} <= names
    assert not names & {"version", "create", "import"}
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.control.get(root, PREFIX + b"version", 1)
    assert e.value.errno == pyfuse3.ENOATTR
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.control.get(root, PREFIX + b"vms.0", 1)
    assert e.value.errno == pyfuse3.ENOATTR
    st = ops.control.status_of(root)
    assert st["kind"] == "vm" and sorted(st["disks"]) == ["d0", "d1"]
    assert st["worker"] == worker


async def test_one_process_status_has_no_worker(store: Store, tmp_path) -> None:
    cfg = make_config(store=store.path, mountpoint=str(tmp_path / "mnt"), role="secondary")
    ops = Operations(store, MountInfo(cfg, os.getpid(), 0.0))
    vm_dir = ops.inodes.vm_node("vm0")
    assert ops.inodes.root.kind is Kind.ROOT and vm_dir is not None
    assert "worker" not in ops.control.status_of(vm_dir)


def test_workers_serve_nbd_but_not_over_tls(tmp_path) -> None:
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    p = argparse.ArgumentParser()
    add_mount_arguments(p)
    base = ["--workers", "--role", "secondary", "--store", str(tmp_path / "s"), "--listen", "127.0.0.1:7000",
            "--key-file", str(key)]
    for option, value in (("--nbd-socket", str(tmp_path / "nbd.sock")), ("--nbd-listen", "127.0.0.1:9999")):
        assert config_from_args(p.parse_args([*base, option, value, str(tmp_path / "mnt")])).workers
    tls = ["--tls-cert", str(tmp_path / "c"), "--tls-key", str(tmp_path / "k"), "--tls-ca", str(tmp_path / "ca")]
    with pytest.raises(ConfigError, match="--nbd-listen with TLS needs --single-process"):
        config_from_args(p.parse_args([*base, *tls, "--nbd-listen", "127.0.0.1:9999", str(tmp_path / "mnt")]))


def test_workers_flag_reaches_the_config(tmp_path) -> None:
    p = argparse.ArgumentParser()
    add_mount_arguments(p)
    cfg = config_from_args(p.parse_args(["--role", "primary", "--store", str(tmp_path / "s"), "--workers",
                                         "--peer", "127.0.0.1:7000", str(tmp_path / "mnt")]))
    assert cfg.workers is True and cfg.peer is not None


def test_a_process_per_vm_is_the_default_and_single_process_is_kept(tmp_path) -> None:
    p = argparse.ArgumentParser()
    add_mount_arguments(p)
    base = ["--role", "primary", "--store", str(tmp_path / "s")]
    default = config_from_args(p.parse_args([*base, str(tmp_path / "mnt")]))
    single = config_from_args(p.parse_args([*base, "--single-process", str(tmp_path / "mnt")]))
    assert default.workers is True and single.workers is False
    # Each model's command line parses back to itself (a worker re-reads the supervisor's).
    assert "--single-process" in single.argv() and "--single-process" not in default.argv()
    assert config_from_args(p.parse_args(single.argv())).workers is False
    assert config_from_args(p.parse_args(default.argv())).workers is True
