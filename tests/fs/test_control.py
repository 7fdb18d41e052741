"""The xattr control plane with plain getfattr/setfattr-level calls (os.*xattr)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

from tests.fs.mounts import XATTR as P
from tests.fs.mounts import errno_of, last_error, mountctl, run


def test_names_listed_per_node(sec):
    mountctl("create", sec.mnt, "vm1/d0", "--size", "4M")
    sec.path("vm1", "new.raw").touch()
    os.setxattr(sec.path("vm1", "d0.raw"), P + "snapshot", b"s1")
    os.setxattr(sec.path("vm1", "d0.raw"), P + "clone", b"c1")
    names = {
        sec.mnt: {"status", "version", "last_error", "last_result"},
        sec.path("vm1"): {"status", "snapshots", "mode", "verify", "last_error", "last_result"},
        sec.path("vm1", "d0.raw"): {"status", "snapshots", "last_error", "last_result"},
        sec.path("vm1", "new.raw"): {"status", "block_size", "last_error", "last_result"},
        sec.path("vm1", "d0@s1.raw"): {"status", "snapshot", "last_error", "last_result"},
        sec.path("vm1", "d0@c1.raw"): {"status", "snapshot", "last_error", "last_result"},
    }
    for path, want in names.items():
        assert set(os.listxattr(path)) == {P + n for n in want}, path
        for n in want:
            os.getxattr(path, P + n)  # every listed name reads
    assert os.getxattr(sec.mnt, P + "version").decode().startswith("colofs ")
    kinds = {json.loads(os.getxattr(p, P + "status"))["kind"] for p in names}
    assert kinds == {"root", "vm", "disk", "pending", "snapshot", "clone"}
    # getfattr dumps everything without an error.
    res = run("getfattr", "-d", "-m", "-", sec.path("vm1", "d0.raw"))
    assert "user.colofs.status" in res.stdout and res.stderr.count("Operation not supported") == 0


def test_unknown_names_and_wrong_places(sec):
    mountctl("create", sec.mnt, "vm1/d0", "--size", "4M")
    d = sec.path("vm1", "d0.raw")
    assert errno_of(os.getxattr, d, P + "nonsense") == errno.ENODATA
    assert errno_of(os.getxattr, d, "user.other") == errno.ENODATA
    assert errno_of(os.getxattr, d, "security.capability") == errno.ENODATA
    assert errno_of(os.getxattr, sec.path("vm1"), P + "checkpoint") == errno.ENODATA  # write-only
    assert errno_of(os.setxattr, d, P + "nonsense", b"1") == errno.EINVAL
    assert "cannot be set on disk vm1/d0" in last_error(d)
    assert errno_of(os.setxattr, d, "user.other", b"1") == errno.EINVAL
    assert errno_of(os.setxattr, d, "trusted.other", b"1") == errno.EOPNOTSUPP
    assert errno_of(os.setxattr, sec.mnt, P + "checkpoint", b"") == errno.EINVAL
    assert "settable here: create, import" in last_error(sec.mnt)
    assert errno_of(os.removexattr, d, P + "status") == errno.EPERM
    assert errno_of(os.removexattr, d, "user.other") == errno.ENODATA
    assert errno_of(os.setxattr, sec.path("vm1"), P + "checkpoint", b"abc") == errno.EINVAL
    assert "sequence number" in last_error(sec.path("vm1"))
    assert errno_of(os.setxattr, sec.path("vm1"), P + "checkpoint", b"7") == errno.EINVAL
    assert "last applied seq is 0" in last_error(sec.path("vm1"))


def test_last_error_belongs_to_the_caller(sec):
    assert errno_of(os.setxattr, sec.mnt, P + "create", b"not json") == errno.EINVAL
    assert last_error(sec.mnt) == "create: the value is not JSON"
    result = json.loads(os.getxattr(sec.mnt, P + "last_result"))
    assert (result["ok"], result["op"], result["errno_name"]) == (False, "create", "EINVAL")
    other = subprocess.run(
        [sys.executable, "-c", f"import os; print(repr(os.getxattr({str(sec.mnt)!r}, 'user.colofs.last_error')))"],
        capture_output=True, text=True, timeout=30, check=True,
    )
    assert other.stdout.strip() == "b''"
    # A success clears it.
    os.setxattr(sec.mnt, P + "create", json.dumps({"vm": "vm1", "disk": "d0", "size": 1 << 20}).encode())
    assert last_error(sec.mnt) == ""
    result = json.loads(os.getxattr(sec.mnt, P + "last_result"))
    assert result["ok"] and result["size"] == 1 << 20 and result["file"].endswith("vm1/d0.raw")


def test_create_and_import_through_xattrs(sec, tmp_path):
    root = sec.mnt
    create = json.dumps({"vm": "vm1", "disk": "d0", "size": 2 << 20, "block_size": 65536}).encode()
    os.setxattr(root, P + "create", create)
    assert os.stat(sec.path("vm1", "d0.raw")).st_size == 2 << 20
    assert errno_of(os.setxattr, root, P + "create", create) == errno.EEXIST
    assert "already exists" in last_error(root)
    bad = [
        ({"vm": "vm1", "disk": "x", "size": 1000}, "multiple of 512"),
        ({"vm": "vm1", "disk": "x", "size": 4096, "block_size": 3000}, "power of two"),
        ({"vm": "bad name", "disk": "x", "size": 4096}, "VM name"),
        ({"vm": "vm1", "size": 4096}, "'disk'"),
    ]
    for req, words in bad:
        assert errno_of(os.setxattr, root, P + "create", json.dumps(req).encode()) == errno.EINVAL
        assert words in last_error(root), req
    img = tmp_path / "img.raw"
    img.write_bytes(os.urandom(3 << 20))
    os.setxattr(root, P + "import", json.dumps({"vm": "vm2", "disk": "sys", "source": str(img)}).encode())
    with open(sec.path("vm2", "sys.raw"), "rb") as f:
        assert f.read() == img.read_bytes()
    qcow = tmp_path / "img.qcow2"
    run("qemu-img", "create", "-f", "qcow2", qcow, "1M")
    req = json.dumps({"vm": "vm2", "disk": "q", "source": str(qcow)}).encode()
    assert errno_of(os.setxattr, root, P + "import", req) == errno.EINVAL
    assert "qcow2" in last_error(root)
    req = json.dumps({"vm": "vm2", "disk": "q", "source": "relative.raw"}).encode()
    assert errno_of(os.setxattr, root, P + "import", req) == errno.EINVAL
    req = json.dumps({"vm": "vm2", "disk": "q", "source": str(tmp_path / "missing.raw")}).encode()
    assert errno_of(os.setxattr, root, P + "import", req) == errno.ENOENT
    assert "No such file" in last_error(root)


def test_checkpoint_and_failover_xattrs(sec):
    mountctl("create", sec.mnt, "vm1/d0", "--size", "4M")
    vm = sec.path("vm1")
    with open(sec.path("vm1", "d0.raw"), "r+b") as f:
        f.write(b"svm data")
    os.setxattr(vm, P + "checkpoint", b"")
    result = json.loads(os.getxattr(vm, P + "last_result"))
    assert result["ok"] and result["op"] == "checkpoint" and result["seq"] == 0
    assert result["discarded_active_bytes"] == 4096
    os.setxattr(vm, P + "checkpoint", b"0")  # the explicit seq works too
    os.setxattr(vm, P + "failover", b"")
    result = json.loads(os.getxattr(vm, P + "last_result"))
    assert (result["role"], result["epoch"]) == ("primary", 2)
    assert errno_of(os.setxattr, vm, P + "failover", b"") == errno.EPERM
    assert "failover of a primary" in last_error(vm)
    status = json.loads(os.getxattr(sec.path("vm1", "d0.raw"), P + "status"))
    assert (status["kind"], status["role"], status["epoch"], status["size"]) == ("disk", "primary", 2, 4 << 20)
    # Unreplicated, the new primary's checkpoint is the record of one its peer holds: up to its last write.
    with open(sec.path("vm1", "d0.raw"), "r+b") as f:
        f.write(b"primary data")
        f.flush()
        os.fsync(f.fileno())
    applied = json.loads(os.getxattr(vm, P + "status"))["last_applied"]
    assert applied > 0
    os.setxattr(vm, P + "checkpoint", b"")
    result = json.loads(os.getxattr(vm, P + "last_result"))
    assert result["ok"] and result["seq"] == applied and result["replicated"] is False, result
    assert json.loads(os.getxattr(vm, P + "status"))["last_checkpoint"] == applied
    assert errno_of(os.setxattr, vm, P + "checkpoint", str(applied + 1).encode()) != 0  # beyond the last write
