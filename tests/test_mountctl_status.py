"""``mountctl status`` of a whole mount while VMs come and go: one VM's failed read never fails the status of all.

The root lists its VMs, then each VM's directory is asked for its status.
A VM can leave in between (a secondary's VM named by a primary that never
proved the key is forgotten when its worker ends), and the kernel may still
hold its directory for a moment (the entry and attribute timeouts), so the
path still looks like a directory while its status read fails. Here a plain
directory tree stands in for the mount, answering the same ``getxattr`` calls
with the values a colofs root and VM directories give: a VM that is still a
directory but whose status cannot be read is exactly that moment, made to
last as long as the test needs.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest

from mountctl.client import PREFIX, CtlError, gather_status, resolve, vm_detail

STATUS = PREFIX + "status"


def _set(path: Path, status: dict[str, Any]) -> None:
    os.setxattr(path, STATUS, json.dumps(status).encode())


def _root(path: Path, vms: list[str]) -> None:
    _set(path, {"kind": "root", "mountpoint": str(path), "vm_count": len(vms), "vms": vms, "vm_pages": 1})


def _vm(root: Path, name: str) -> None:
    d = root / name
    d.mkdir()
    _set(d, {"kind": "vm", "vm": name, "mountpoint": str(root), "role": "secondary", "phase": "replicating",
             "disks": {}})


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A root listing vm1 (readable) and vm2, whose directory is there but answers no status."""
    r = tmp_path / "mnt"
    r.mkdir()
    try:
        _root(r, ["vm1", "vm2"])
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            pytest.skip("the test directory's filesystem keeps no user xattrs")
        raise
    _vm(r, "vm1")
    (r / "vm2").mkdir()
    return r


def test_a_vm_that_left_between_the_listing_and_its_read_is_left_out(root: Path) -> None:
    listed = resolve(str(root))  # the listing, taken while vm2 was there
    _root(root, ["vm1"])  # vm2 left; its directory still looks like one
    out = gather_status(listed)
    assert sorted(out["vms"]) == ["vm1"], out["vms"]
    assert out["vms"]["vm1"]["phase"] == "replicating"
    assert vm_detail(str(root), "vm2") is None


def test_a_listed_vm_whose_status_cannot_be_read_is_marked_not_fatal(root: Path) -> None:
    out = gather_status(resolve(str(root)))
    assert out["vms"]["vm1"]["phase"] == "replicating"
    vm2 = out["vms"]["vm2"]
    assert vm2["phase"] == "unreadable" and vm2["worker"] == {"state": "unreadable"}
    assert "not on a colofs mount" in vm2["peer"]["state"], vm2
    with pytest.raises(CtlError, match="not on a colofs mount"):  # asked for alone, its error is the answer
        vm_detail(str(root), "vm2")


def test_a_vm_gone_with_its_directory_is_left_out(root: Path) -> None:
    listed = resolve(str(root))
    _root(root, ["vm1"])
    (root / "vm2").rmdir()
    assert sorted(gather_status(listed)["vms"]) == ["vm1"]
