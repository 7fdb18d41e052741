"""A new VM is usable as soon as the command that made it returns, and a recursive umount is a clean stop.

With a worker per VM, a VM's directory is covered by its worker's own mount,
which can only appear once the ``mkdir`` or root ``create`` that made the VM
has returned (the kernel holds the root's lock until then). These tests pin
what a user sees across that moment.
"""

from __future__ import annotations

import json
import os
import subprocess

from tests.fs.mounts import Mount, mountctl
from tests.waiting import wait_until_sync

P = "user.colofs."


def _status(path: str) -> dict:
    return json.loads(os.getxattr(path, P + "status"))


def test_a_disk_opens_the_moment_mountctl_create_returns(wsec: Mount) -> None:
    for n in range(3):  # each VM new, so each create waits for a worker that was just forked
        mountctl("create", wsec.mnt, f"vm{n}/d0", "--size", "1M")
        with open(wsec.path(f"vm{n}", "d0.raw"), "r+b") as f:  # no retry: it must be there
            f.write(b"x" * 4096)
            f.seek(0)
            assert f.read(4096) == b"x" * 4096
        assert _status(str(wsec.path(f"vm{n}")))["worker"]["state"] == "serving"


def test_after_mkdir_the_vm_status_waits_for_its_mount(wsec: Mount) -> None:
    vm = wsec.path("vm1")
    os.mkdir(vm)
    # mkdir returned once the VM exists in the store; reading its status waits for its worker's
    # mount, after which a disk can be made inside with no retry.
    st = _status(str(vm))
    assert st["worker"]["state"] == "serving", st
    subprocess.run(["qemu-img", "create", "-f", "raw", str(vm / "d0.raw"), "1M"], check=True,
                   capture_output=True, timeout=120)
    assert (vm / "d0.raw").stat().st_size == 1 << 20
    assert _status(str(vm))["disks"]["d0"]["size"] == 1 << 20


def test_a_file_made_right_after_mkdir_lands_in_the_vm(wsec: Mount) -> None:
    for n in range(4):  # no status read, no retry: the first walk into the directory waits for its mount
        vm = wsec.path(f"vm{n}")
        os.mkdir(vm)
        (vm / "d0.raw").touch()
        os.truncate(vm / "d0.raw", 1 << 20)
        assert _status(str(vm))["disks"]["d0"]["size"] == 1 << 20
        assert os.listdir(vm) == ["d0.raw"]


def test_a_disk_made_through_the_root_attribute_opens_at_once(wsec: Mount) -> None:
    for n in range(4):
        req = json.dumps({"vm": f"vm{n}", "disk": "d0", "size": 1 << 20}).encode()
        os.setxattr(wsec.mnt, P + "create", req)
        with open(wsec.path(f"vm{n}", "d0.raw"), "rb") as f:  # no retry
            assert f.read(4096) == bytes(4096)


def test_umount_recursive_stops_every_worker_cleanly_and_restarts_none(wsec: Mount) -> None:
    for n in range(2):
        mountctl("create", wsec.mnt, f"vm{n}/d0", "--size", "1M")
    pid = wsec.pid
    subprocess.run(["umount", "-R", str(wsec.mnt)], check=True, timeout=120)  # children first, then the root
    wait_until_sync(lambda: not os.path.exists(f"/proc/{pid}/status") or "zombie" in
                    open(f"/proc/{pid}/status").read(), 120, "the supervisor to exit", catch=(OSError,))
    wsec.mounted = False
    log = wsec.log()
    for n in range(2):
        assert f"VM vm{n}: {wsec.mnt}/vm{n} was unmounted from outside" in log, log[-3000:]
        assert f"worker for VM vm{n} stopped cleanly" in log, log[-3000:]
    assert "died" not in log and "restarting it" not in log, log[-3000:]
    assert not os.path.ismount(wsec.mnt)
    wsec.mount("--workers")  # the store's lock was let go
    assert _status(str(wsec.path("vm0")))["worker"]["state"] == "serving"
