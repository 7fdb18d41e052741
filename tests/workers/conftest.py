"""A mounted pair with a worker process per VM, cleaned up down to the last worker and VM mount.

A supervisor that is killed leaves its workers running (they are the
zygote's children) and their VM mounts under the root. The pair here
remembers every process it saw under its supervisors and, at cleanup, after
the usual unmount (or kill), ends those still running and detaches any mount
left under the test's directory, so that a failed test leaves nothing behind.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.many_vms import Tracker, detach_all, mounts_under, processes, start, worker_of
from tests.e2e.pair import Pair
from tests.waiting import wait_until_sync


class WorkersPair(Pair):
    """The tests' pair, mounted with ``--workers`` on both sides."""

    def __init__(self, base: Path) -> None:
        super().__init__(base)
        self.tracker = Tracker(self)

    def start(self, *options: str) -> WorkersPair:  # type: ignore[override]
        start(self, *options)
        self.tracker.remember()
        return self

    def worker(self, which: Any, vm: str) -> dict[str, Any]:
        """The ``worker`` part of the VM's status on that side ({} while unreadable)."""
        return worker_of(which, vm)

    def worker_pid(self, which: Any, vm: str) -> int:
        w = wait_until_sync(lambda: self.worker(which, vm), 60, f"{vm}'s worker in the status")
        pid = int(w["pid"])
        self.tracker.remember()
        return pid

    def processes(self, which: Any, vms: list[str]) -> dict[str, int]:
        self.tracker.remember()
        return processes(which, vms)

    def cleanup(self) -> None:
        self.tracker.remember()
        try:
            super().cleanup()
        finally:
            left = self.tracker.end_leftovers()
            mounts = detach_all(self.base)
            if left or mounts:
                print(f"cleanup ended leftover processes {left} and detached {mounts}", file=sys.stderr)


@pytest.fixture
def wpair(tmp_path: Path) -> Iterator[WorkersPair]:
    """A pair under the test's directory, to be started with ``start()``; always cleaned up to nothing."""
    p = WorkersPair(tmp_path)
    try:
        yield p
    finally:
        p.cleanup()


def nothing_left(pair: WorkersPair) -> None:
    """Assert that no process the pair started runs and no mount is left under its directory."""
    wait_until_sync(lambda: not pair.tracker.leftovers(), 60, "every supervisor, zygote and worker to exit")
    assert not mounts_under(pair.base), mounts_under(pair.base)
