"""Steps the real-guest tests share: checkpoint a running guest, boot a verify guest, wait for generations.

A checkpoint is QMP ``stop``, ``mountctl checkpoint``, QMP ``cont``: the generation the guest had
announced when it was stopped (``lo``) is on the disk, and the one it may have finished without
announcing (``lo + 1``) is the only other possible image. A verify guest reports the newest
complete generation and the digest of its manifest, compared here with the one computed from the
seed, so each check is of the exact files, not only of fsck.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from examples.guest.manifest import manifest_digest
from examples.guest.qemu import Guest
from tests.e2e.pair import Pair
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
