"""A real Linux guest on the primary of a mounted pair, checkpointed from the hypervisor (Remus style).

The guest (``examples/guest``) formats ext4 on its virtio disk and keeps writing generations of
files whose content is a function of a seed; a verify guest booted on a disk file mounts it
(replaying the journal), checks the newest complete generation file by file against the seed,
runs ``e2fsck -fn`` and reports the manifest's digest, which the test compares with the one it
computes itself. A checkpoint is QMP ``stop``, ``mountctl checkpoint``, QMP ``cont``: the
generation the primary guest had announced when it was stopped (``lo``) is on the disk, and the
one it may have finished without announcing (``lo + 1``) is the only other possible image.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import pytest

from examples.guest.manifest import manifest_digest
from examples.guest.qemu import Guest
from tests.e2e.pair import Pair
from tests.fs.mounts import mountctl
from tests.guest.steps import BOOT, SIZE, announced, checkpoint, outcome, verify

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


def test_guest_checkpointed_isolated_recovered_and_failed_over(pair: Pair, guests: Callable[..., Guest]) -> None:
    seed = random.randrange(1, 1 << 30)
    pair.start()
    mountctl("create", pair.pri.mnt, "vm1/d0", "--size", str(SIZE))
    pair.wait_disk("vm1", "d0", SIZE)
    pvm = guests(pair.pfile(), "primary", mode="format", seed=seed)

    # 1. format, checkpoint, verify on the secondary's file
    announced(pvm, 1)
    lo = checkpoint(pair, pvm)
    verify(guests, pair.sfile(), "svm-1", seed, lo)

    # 2. churn without a checkpoint: the secondary still holds the previous manifest, although it
    #    has received the newer generations (isolation)
    announced(pvm, lo + 3)
    pair.wait_caught_up(timeout=60)
    verify(guests, pair.sfile(), "svm-2", seed, lo)

    # 3. checkpoint: the new manifest
    lo = checkpoint(pair, pvm)
    verify(guests, pair.sfile(), "svm-3", seed, lo)

    # 4. the secondary daemon killed mid-churn, mounted again, caught up by the next checkpoint
    announced(pvm, lo + 1)
    pair.sec.kill9()
    announced(pvm, pvm.gen() + 1)
    pair.mount_secondary()
    lo = checkpoint(pair, pvm)
    verify(guests, pair.sfile(), "svm-4", seed, lo)

    # 5. churn, kill the primary (daemon and QEMU), fail over, boot from the secondary's file:
    #    the last checkpoint's generation, and the guest churns on as the new primary
    lo = checkpoint(pair, pvm)
    announced(pvm, lo + 3)
    pair.wait_caught_up(timeout=60)
    pair.pri.kill9()
    pvm.kill9()
    mountctl("failover", pair.sec.path("vm1"))
    _, new = verify(guests, pair.sfile(), "new-primary", seed, lo, then="churn", gens=lo + 4)
    res = outcome(new, "churn")
    assert res["gen"] == str(lo + 4) and res["manifest"] == manifest_digest(seed, lo + 4), res
    assert new.wait_exit(BOOT) == 0, new.describe()
