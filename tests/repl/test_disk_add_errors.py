"""A primary asking for a disk the secondary's store cannot hold is answered with ERROR, and nothing is left.

Over the wire a disk is made by ATTACH (for a VM or disks missing here) or
by DISK_ADD (a disk added while streaming). A size past what the store
takes used to fail half way: the VM directory and a ``.new-DISK`` directory
stayed behind, and DISK_ADD ended the session without any ERROR frame.
"""

from __future__ import annotations

import os

import pytest

from colofs.core.state import SECONDARY
from colofs.repl import ReplCode
from colofs.wire.messages import DiskAdd, DiskInfo, Error
from tests.repl.rawpeer import RawPrimary

SIZE = 256 << 10
HUGE = 1 << 62


async def test_disk_add_of_a_huge_disk_is_answered_with_error_and_leaves_nothing(pair, repl_errors) -> None:
    await pair.open_stores()
    await pair.secondary.create_disk("vm", "d0", SIZE, role=SECONDARY)
    await pair.start_secondary()
    peer = await RawPrimary.connect(pair.port, "vm", [DiskInfo("d0", SIZE, 4096)], key=pair.key)
    try:
        await peer.send(DiskAdd(1, DiskInfo("big", HUGE, 4096)))
        closed, err = await peer.until_closed(30)
    finally:
        await peer.aclose()
    assert closed
    assert isinstance(err, Error), "the session ended without an ERROR frame"
    assert err.code == ReplCode.BAD_REQUEST
    assert "DISK_ADD big" in err.message and f"{HUGE} bytes is more than" in err.message, err.message
    vm = pair.secondary.vm("vm")
    assert sorted(vm.disks) == ["d0"]
    assert sorted(e for e in os.listdir(vm.path) if "big" in e) == []  # no disk, no .new-big
    assert repl_errors() == []


@pytest.mark.parametrize("size", [HUGE, (1 << 64) - 4096], ids=["2^62", "past-off_t"])
async def test_attach_with_a_huge_disk_is_refused_before_the_vm_is_made(pair, repl_errors, size) -> None:
    await pair.open_stores()
    await pair.start_secondary()
    disks = [DiskInfo("d0", SIZE, 4096), DiskInfo("big", size, 4096)]
    with pytest.raises(AssertionError, match="attach refused") as refused:
        await RawPrimary.connect(pair.port, "evil1", disks, key=pair.key)
    text = str(refused.value)
    assert f"code={int(ReplCode.DISK_MISMATCH)}" in text and "disk big" in text and str(size) in text, text
    assert "evil1" not in pair.secondary.vms
    assert not os.path.exists(os.path.join(pair.sdir, "evil1"))
    # The name is free: a primary with disks that fit attaches.
    ok = await RawPrimary.connect(pair.port, "evil1", disks[:1], key=pair.key)
    assert ok.attached.vm == "evil1"
    await ok.aclose()
    assert sorted(pair.secondary.vm("evil1").disks) == ["d0"]
    assert repl_errors() == []


async def test_attach_adding_a_huge_disk_to_a_vm_here_leaves_it_as_it_was(pair, repl_errors) -> None:
    await pair.open_stores()
    await pair.secondary.create_disk("vm", "d0", SIZE, role=SECONDARY)
    before = sorted(os.listdir(pair.secondary.vm("vm").path))
    await pair.start_secondary()
    disks = [DiskInfo("d0", SIZE, 4096), DiskInfo("d1", SIZE, 4096), DiskInfo("big", HUGE, 4096)]
    with pytest.raises(AssertionError, match="attach refused"):
        await RawPrimary.connect(pair.port, "vm", disks, key=pair.key)
    vm = pair.secondary.vm("vm")
    assert sorted(vm.disks) == ["d0"]  # not even d1, which would have fitted
    assert sorted(os.listdir(vm.path)) == before
    assert repl_errors() == []
