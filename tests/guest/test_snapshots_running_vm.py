"""Snapshots of a running, protected guest: a clone booted beside it, a fleecing backup booted.

The guest churns on the primary of a mounted pair throughout. A writable clone of its disk
(taken with the guest paused for an instant) boots as a second guest, verifies and writes on
while the first keeps running. A snapshot taken on the secondary (the last checkpoint's image)
is copied with ``qemu-img convert`` while the guest writes and the pair checkpoints again; the
copy boots and holds exactly the files of that checkpoint.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from examples.guest.manifest import manifest_digest
from examples.guest.qemu import Guest
from tests.e2e.pair import Pair
from tests.fs.mounts import mountctl, run
from tests.guest.steps import BOOT, SIZE, announced, checkpoint, outcome, verify

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


def test_clone_boots_beside_the_guest_and_a_fleecing_backup_boots(
        pair: Pair, guests: Callable[..., Guest], tmp_path: Path) -> None:
    seed = random.randrange(1, 1 << 30)
    pair.start()
    mountctl("create", pair.pri.mnt, "vm1/d0", "--size", str(SIZE))
    pair.wait_disk("vm1", "d0", SIZE)
    pvm = guests(pair.pfile(), "primary", mode="format", seed=seed)
    announced(pvm, 2)

    # A writable clone of the running guest's disk, booted as a second guest that writes on.
    pvm.stop()
    try:
        at_clone = pvm.gen()
        mountctl("clone", pair.pri.path("vm1", "d0"), "try")
    finally:
        pvm.cont()
    clone = pair.pri.path("vm1", "d0@try.raw")
    _, cvm = verify(guests, clone, "clone", seed, at_clone, then="churn", gens=at_clone + 4)
    assert outcome(cvm, "churn")["manifest"] == manifest_digest(seed, at_clone + 4)
    assert cvm.wait_exit(BOOT) == 0, cvm.describe()
    announced(pvm, at_clone + 2)  # the first guest kept running meanwhile

    # Fleecing: the secondary's snapshot of the last checkpoint, copied while the guest writes on
    # and the pair checkpoints again; the copy boots with exactly that checkpoint's files.
    lo = checkpoint(pair, pvm)
    mountctl("snapshot", pair.sec.path("vm1", "d0"), "backup")
    snap = pair.sec.path("vm1", "d0@backup.raw")
    announced(pvm, lo + 3)
    assert checkpoint(pair, pvm) >= lo + 3
    backup = tmp_path / "backup.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", snap, backup, timeout=BOOT)
    verify(guests, backup, "backup", seed, lo, fmt="qcow2")
    mountctl("snapshot", "--delete", pair.sec.path("vm1", "d0"), "backup")
    assert not snap.exists()
    assert pvm.result() is None and not pvm.exited(), pvm.describe()
