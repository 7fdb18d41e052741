"""Fixtures of the real-guest tests: the guest built once per machine, guests always killed.

Skipped, with the reason, where ``qemu-system-x86_64`` or ``/dev/fuse`` is missing or the guest
cannot be built (no package mirror).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from examples.guest.build import GuestImage, GuestUnavailable, build
from examples.guest.qemu import Guest
from tests.e2e.pair import Pair


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    try:
        return build()
    except GuestUnavailable as e:
        pytest.skip(f"cannot build the test guest: {e}")


@pytest.fixture
def guests(guest_image: GuestImage, tmp_path: Path, pair: Pair) -> Iterator[Callable[..., Guest]]:
    """``guests(disk, name, mode=..., seed=...)`` starts a guest; every one is killed at the end
    (before the pair is unmounted: a mount with a disk open is busy)."""
    started: list[Guest] = []

    def start(disk: Path, name: str, **kw: Any) -> Guest:
        g = Guest(guest_image, disk, tmp_path / "guests", name, **kw).start()
        started.append(g)
        return g

    try:
        yield start
    finally:
        for g in started:
            g.kill9()
