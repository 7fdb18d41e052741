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

import random
from collections.abc import Callable
from pathlib import Path

from examples.guest.manifest import manifest_digest
from examples.guest.qemu import Guest
from tests.e2e.pair import Pair
from tests.fs.mounts import mountctl
from tests.waiting import wait_until_sync

SIZE = 64 << 20
BOOT = 240.0
"""Bounds a guest's boot and run (TCG on a loaded 2-core machine); never decides a result."""


def checkpoint(pair: Pair, guest: Guest) -> int:
    """Pause the guest, checkpoint (confirmed by the secondary), resume; the generation it held."""
    guest.stop()
    try:
        lo = guest.gen()
        out = pair.checkpoint(timeout=60)
        assert out["ok"] and out["replicated"], out
    finally:
        guest.cont()
    return lo


def outcome(guest: Guest, mode: str) -> dict[str, str]:
    """The guest's RESULT line of ``mode`` (or its failure, or its exit without one)."""
    def seen() -> dict[str, str] | None:
        got = guest.result(mode)
        if got is None and guest.exited():
            return {"status": "exited without a result"}
        return got

    res = wait_until_sync(seen, BOOT, f"the {mode} result of {guest.name}")
    assert res["status"] == "ok", guest.describe()
    return res


def verify(guests: Callable[..., Guest], disk: Path, name: str, seed: int, lo: int,
           **kw: object) -> tuple[int, Guest]:
    """Boot a verify guest on ``disk``: the image must be generation lo or lo + 1, exactly."""
    g = guests(disk, name, mode="verify", seed=seed, cache="writeback", **kw)
    res = outcome(g, "verify")
    gen = int(res["gen"])
    assert lo <= gen <= lo + 1, f"{name}: the disk holds generation {gen}, expected {lo} (or {lo + 1})"
    assert res["manifest"] == manifest_digest(seed, gen), f"{name}: manifest of another image: {res}"
    if "then" not in kw:
        assert g.wait_exit(BOOT) == 0, g.describe()
    return gen, g


def announced(guest: Guest, gen: int) -> int:
    """Wait until the guest announced generation ``gen`` (it keeps churning)."""
    def reached() -> int:
        assert guest.result() is None or guest.result()["status"] == "ok", guest.describe()
        return guest.gen() >= gen and guest.gen()

    return wait_until_sync(reached, BOOT, f"{guest.name} to write generation {gen}")


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
