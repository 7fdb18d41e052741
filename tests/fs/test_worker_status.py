"""``mountctl status`` of a whole mount is not held up by one VM whose worker is hung."""

from __future__ import annotations

import json
import os
import signal

from tests.fs.mounts import Mount, mountctl


def test_status_shows_a_hung_vm_as_not_answering_and_the_others_in_full(wsec: Mount) -> None:
    for vm in ("vm0", "vm1", "vm2"):
        mountctl("create", wsec.mnt, f"{vm}/d0", "--size", "1M")
    hung = int(json.loads(os.getxattr(wsec.path("vm1"), "user.colofs.status"))["worker"]["pid"])
    os.kill(hung, signal.SIGSTOP)
    try:
        out = json.loads(mountctl("status", wsec.mnt, "--json", "--timeout", "3", timeout=120).stdout)
        text = mountctl("status", wsec.mnt, "--timeout", "3", timeout=120).stdout
    finally:
        os.kill(hung, signal.SIGCONT)  # a stopped worker would hang the cleanup's unmount
    assert out["vms"]["vm1"]["phase"] == "not-answering", out["vms"]["vm1"]
    assert out["vms"]["vm1"]["worker"]["state"] == "not answering"
    for vm in ("vm0", "vm2"):
        assert out["vms"][vm]["disks"]["d0"]["size"] == 1 << 20, out["vms"][vm]
        assert out["vms"][vm]["worker"]["state"] == "serving"
    assert "not-answering" in text or "not answering" in text, text
    # once continued it answers again
    again = json.loads(mountctl("status", wsec.mnt, "--json").stdout)
    assert again["vms"]["vm1"]["disks"]["d0"]["size"] == 1 << 20
