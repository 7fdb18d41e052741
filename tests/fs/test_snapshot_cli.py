"""The snapshot interface: setfattr/getfattr, what snapshot files allow, refusals, and mountctl."""

from __future__ import annotations

import errno
import json
import mmap
import os
import stat

from tests.fs.mounts import XATTR as P
from tests.fs.mounts import errno_of, last_error, mountctl, run

MiB = 1 << 20


def _fails(*args: object, code: int = 1) -> str:
    res = mountctl(*map(str, args), check=False)
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    if code == 1:
        assert res.stderr.startswith("mountctl: ") and res.stdout == ""
    return res.stderr


def test_setfattr_getfattr_and_what_snapshot_files_allow(pri):
    mountctl("create", pri.mnt, "vm1/d0", "--size", "4M")
    d0 = pri.path("vm1", "d0.raw")
    with open(d0, "r+b") as w:
        w.write(b"snapshot me" * 100)
    run("setfattr", "-n", "user.colofs.snapshot", "-v", "s1", d0)
    snap = pri.path("vm1", "d0@s1.raw")
    assert sorted(os.listdir(pri.path("vm1"))) == ["d0.raw", "d0@s1.raw"]
    listing = json.loads(run("getfattr", "--only-values", "-n", "user.colofs.snapshots", d0).stdout)
    assert len(listing) == 1
    entry = listing[0]
    assert {k: entry[k] for k in ("disk", "name", "kind", "base", "bytes", "file", "writable")} == {
        "disk": "d0", "name": "s1", "kind": "snapshot", "base": None, "bytes": 0, "file": "d0@s1.raw",
        "writable": False}
    assert entry["seq"] >= 1 and entry["created"] > 0
    assert json.loads(run("getfattr", "--only-values", "-n", "user.colofs.snapshots", pri.path("vm1")).stdout) == listing
    assert run("getfattr", "--only-values", "-n", "user.colofs.snapshot", snap).stdout == "s1"
    status = json.loads(run("getfattr", "--only-values", "-n", "user.colofs.status", snap).stdout)
    assert (status["kind"], status["vm"], status["disk"], status["size"], status["clones"]) == (
        "snapshot", "vm1", "d0", 4 * MiB, [])

    # Read-only, fixed size, stable attributes (its times are its creation time).
    st = os.stat(snap)
    assert (stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns) == (0o400, 4 * MiB, int(entry["created"] * 1e9))
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDWR | os.O_TRUNC):
        assert errno_of(os.open, snap, flags) == errno.EROFS
    assert errno_of(os.truncate, snap, MiB) == errno.EROFS
    assert errno_of(os.unlink, snap) == errno.EPERM
    assert errno_of(os.rename, snap, pri.path("vm1", "d0@s2.raw")) == errno.EPERM
    assert errno_of(os.open, pri.path("vm1", "d0@new.raw"), os.O_CREAT | os.O_WRONLY, 0o600) == errno.EPERM
    assert "Read-only file system" in run("sh", "-c", f"echo x > '{snap}'", check=False).stderr
    with open(d0, "r+b") as w:
        w.write(b"changed" * 100)
    with open(snap, "rb") as r:
        assert r.read(1100) == b"snapshot me" * 100
        with mmap.mmap(r.fileno(), 0, prot=mmap.PROT_READ) as mm:
            assert mm[:1100] == b"snapshot me" * 100 and len(mm) == 4 * MiB

    # A clone of the snapshot is writable like a disk.
    run("setfattr", "-n", "user.colofs.clone", "-v", "c1", snap)
    clone = pri.path("vm1", "d0@c1.raw")
    assert stat.S_IMODE(os.stat(clone).st_mode) == 0o600
    with open(clone, "r+b") as w:
        w.write(b"clone data")
    with open(clone, "rb") as r:
        assert r.read(1100) == b"clone data" + (b"snapshot me" * 100)[10:]
    assert json.loads(os.getxattr(snap, P + "status"))["clones"] == ["c1"]

    # Survives a remount with the same inode numbers (and, for the snapshot, times).
    before = {p: os.stat(p) for p in (snap, clone)}
    pri.remount()
    for p, old in before.items():
        new = os.stat(p)
        assert (new.st_ino, new.st_mode, new.st_size) == (old.st_ino, old.st_mode, old.st_size), p
    assert os.stat(snap).st_mtime_ns == st.st_mtime_ns
    with open(clone, "rb") as r:
        assert r.read(10) == b"clone data"

    # Deleting: EBUSY while the clone is built on it, then clone first, snapshot second.
    res = run("setfattr", "-x", "user.colofs.snapshot", snap, check=False)
    assert res.returncode != 0 and "Device or resource busy" in res.stderr
    run("setfattr", "-x", "user.colofs.clone", clone)
    run("setfattr", "-x", "user.colofs.snapshot", snap)
    assert os.listdir(pri.path("vm1")) == ["d0.raw"]
    assert errno_of(os.stat, snap) == errno.ENOENT
    assert json.loads(os.getxattr(d0, P + "snapshots")) == []


BAD_NAMES = [b"", b"a/b", b"a\x00b", b"x" * 65, b"has space", b".hidden", b"a@b", b"\xff\xfe", b"new\n"]


def test_names_are_checked_and_refusals_explain_themselves(sec):
    mountctl("create", sec.mnt, "vm1/d0", "--size", "1M")
    d0 = sec.path("vm1", "d0.raw")
    for attr in ("snapshot", "clone"):
        for bad in BAD_NAMES:
            assert errno_of(os.setxattr, d0, P + attr, bad) == errno.EINVAL, (attr, bad)
            assert f"{attr} name" in last_error(d0), (attr, bad)
    assert "control: snapshot on vm1/d0 refused (EINVAL): snapshot name" in sec.log()
    os.setxattr(d0, P + "snapshot", b"x" * 64)  # the longest name
    os.setxattr(d0, P + "snapshot", b"dup")
    for attr in ("snapshot", "clone"):
        assert errno_of(os.setxattr, d0, P + attr, b"dup") == errno.EEXIST
        assert "a snapshot or clone named 'dup' already exists" in last_error(d0)
    os.setxattr(d0, P + "clone", b"c1")
    snap, clone = sec.path("vm1", "d0@dup.raw"), sec.path("vm1", "d0@c1.raw")

    # Names that cannot be set (or removed) where they were sent, each with a reason.
    assert errno_of(os.setxattr, clone, P + "clone", b"cc") == errno.EINVAL
    assert "a clone cannot be cloned" in last_error(clone)
    assert errno_of(os.setxattr, snap, P + "snapshot", b"ss") == errno.EINVAL
    assert "already a snapshot" in last_error(snap)
    assert errno_of(os.setxattr, sec.mnt, P + "snapshot", b"ss") == errno.EINVAL
    assert "snapshot a disk file" in last_error(sec.mnt)
    assert errno_of(os.removexattr, d0, P + "snapshot") == errno.EPERM
    assert "remove the attribute on its own file" in last_error(d0)
    assert errno_of(os.removexattr, snap, P + "clone") == errno.EPERM
    assert errno_of(os.removexattr, snap, P + "status") == errno.EPERM
    assert errno_of(os.removexattr, snap, "user.other") == errno.ENODATA
    assert errno_of(os.getxattr, snap, P + "clone") == errno.ENODATA
    assert errno_of(os.getxattr, snap, P + "snapshots") == errno.ENODATA
    assert errno_of(os.setxattr, snap, "user.other", b"1") == errno.EINVAL
    assert errno_of(os.setxattr, snap, "trusted.other", b"1") == errno.EOPNOTSUPP
    sec.path("vm2").mkdir()
    assert errno_of(os.setxattr, sec.path("vm2"), P + "snapshot", b"s") == errno.EINVAL
    assert "no disk to snapshot" in last_error(sec.path("vm2"))
    # None of it made the kernel give up on xattrs (no ENOSYS): they still work.
    assert json.loads(os.getxattr(snap, P + "status"))["kind"] == "snapshot"
    os.removexattr(clone, P + "snapshot")
    os.removexattr(snap, P + "snapshot")
    assert [s["name"] for s in json.loads(os.getxattr(d0, P + "snapshots"))] == ["x" * 64]


def test_mountctl_snapshot_clone_list_delete(pri):
    for disk in ("d0", "d1"):
        mountctl("create", pri.mnt, f"vm1/{disk}", "--size", "4M")
    vm, d0 = pri.path("vm1"), pri.path("vm1", "d0")
    out = mountctl("snapshot", d0, "s1").stdout
    assert out.startswith("snapshot s1 of vm1/d0: ") and f"{d0}@s1.raw" in out and "(primary)" in out
    res = json.loads(mountctl("snapshot", "--vm", vm, "all", "--json").stdout)
    assert (res["ok"], res["disks"], res["files"]) == (True, ["d0", "d1"], ["d0@all.raw", "d1@all.raw"])
    out = mountctl("clone", d0, "c1", "--from", "s1").stdout
    assert "clone c1 of vm1/d0 from snapshot s1" in out and "(writable)" in out
    out = mountctl("clone", pri.path("vm1", "d1.raw"), "c2").stdout
    assert "clone c2 of vm1/d1 from the disk" in out

    listing = json.loads(mountctl("snapshot", "--list", vm, "--json").stdout)
    assert [(s["disk"], s["name"], s["kind"], s["base"]) for s in listing] == [
        ("d0", "s1", "snapshot", None), ("d0", "all", "snapshot", None), ("d0", "c1", "clone", "s1"),
        ("d1", "all", "snapshot", None), ("d1", "c2", "clone", None)]
    text = mountctl("snapshot", "--list", d0).stdout.splitlines()
    assert len(text) == 3 and text[2].startswith("vm1/clone:c1 of:s1 created:") and "file:d0@c1.raw" in text[2]
    human = mountctl("status", pri.mnt, "vm1").stdout
    assert "    snapshot:s1 created:" in human and "    clone:c2 created:" in human
    assert mountctl("status", pri.mnt, "vm1/d0@c1").stdout.startswith("vm1/clone:c1 of:s1")
    assert json.loads(mountctl("status", pri.mnt, "vm1/d0@s1", "--json").stdout)["clones"] == ["c1"]

    # Errors: one line, exit status 1.
    assert "snapshot name 'bad name'" in _fails("snapshot", d0, "bad name")
    assert "already exists" in _fails("snapshot", d0, "s1")
    assert "already exists" in _fails("clone", d0, "all")
    assert "no snapshot or clone 'nope' of disk 'd0'" in _fails("clone", d0, "c9", "--from", "nope")
    assert "--from must name a read-only snapshot" in _fails("clone", d0, "c9", "--from", "c1")
    assert "clone c1 (d0@c1.raw) is built on it" in _fails("snapshot", "--delete", d0, "s1")
    assert "no snapshot or clone 'nope'" in _fails("snapshot", "--delete", d0, "nope")
    assert "--vm" in _fails("snapshot", vm, "x")
    assert "no disk 'd9'" in _fails("snapshot", pri.path("vm1", "d9"), "x")
    with open(pri.path("vm1", "d0@c1.raw"), "rb"):
        assert "is open (1 file handle" in _fails("snapshot", "--delete", d0, "c1")
    # Usage errors: exit status 2.
    for args in (("snapshot", d0), ("snapshot", "--list", d0, "x"), ("snapshot", "--list", "--delete", d0, "x"),
                 ("snapshot", "--delete", "--vm", vm, "x")):
        _fails(*args, code=2)

    out = mountctl("snapshot", "--delete", d0, "c1").stdout
    assert out.startswith("deleted clone c1 of vm1/d0 (d0@c1.raw)") and "freed" in out
    res = json.loads(mountctl("snapshot", "--delete", d0, "s1", "--json").stdout)
    assert (res["ok"], res["op"], res["name"], res["freed_bytes"]) == (True, "delete", "s1", 0)
    assert [s["name"] for s in json.loads(mountctl("snapshot", "--list", d0, "--json").stdout)] == ["all"]
    mountctl("snapshot", "--delete", d0, "all")
    assert mountctl("snapshot", "--list", d0).stdout.strip() == "vm1/d0: no snapshots or clones"
