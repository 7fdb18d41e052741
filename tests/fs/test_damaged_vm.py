"""A VM whose state file is missing or garbled is quarantined on the mount, naming the file; others serve."""

from __future__ import annotations

import os

import pytest

from tests.fs.mounts import mountctl

MiB = 1 << 20


@pytest.mark.parametrize("how", ["deleted", "garbled"])
def test_vm_with_a_bad_state_file_is_quarantined_not_vanished(sec, how: str) -> None:
    mountctl("create", sec.mnt, "vm1/d0", "--size", "1M")
    mountctl("create", sec.mnt, "vm2/d0", "--size", "1M")
    with open(sec.path("vm2", "d0.raw"), "r+b") as f:
        f.write(b"V" * 4096)
    sec.umount()
    state = sec.store / "vm1" / "state"
    if how == "deleted":
        state.unlink()
    else:
        data = bytearray(state.read_bytes())
        data[40] ^= 0x01
        state.write_bytes(bytes(data))
    sec.mount()  # the store opens: one bad VM does not stop the others

    assert sorted(os.listdir(sec.mnt)) == ["vm1", "vm2"]  # vm1 does not silently vanish
    assert os.listdir(sec.path("vm1")) == []  # and serves nothing
    st = sec.status("vm1")
    assert st["phase"] == "damaged"
    assert st["damage"]["file"] == str(state)
    assert ("missing" if how == "deleted" else "checksum") in st["damage"]["reason"]
    with open(sec.path("vm2", "d0.raw"), "rb") as f:
        assert f.read(4096) == b"V" * 4096
    text = mountctl("status", sec.mnt).stdout
    assert f"DAMAGED: {state}" in text
    assert f"{state}" in sec.log() and "quarantined" in sec.log()
    # Not a secondary with a primary to rebuild from: the repair says where to run it.
    res = mountctl("repair", sec.path("vm1"), check=False)
    assert res.returncode != 0 and "secondary's mount" in res.stderr
