"""A child that stops inside a checkpoint's or a failover's switch, for a ``kill -9`` right there.

Run as ``python -m tests.core.crash_switch STORE OPERATION POINT``: builds a VM
with one disk, applies primary writes 1-8 of the crash stream (a checkpoint
after 4), writes as the SVM, then runs ``OPERATION`` (``checkpoint`` at 8 or
``failover``) and, at ``POINT``, prints ``at POINT`` and blocks until it is
killed. Points, in the order the switch passes them:

* ``start`` (failover only): its first state change (phase FAILOVER) is
  written and synced beside active's sync, not yet renamed into place;
* ``prepared``: the new state file and the fresh logs are written and synced
  under temporary names; nothing is renamed yet;
* ``state``: the state file names the new generation; the old logs are still in place;
* ``renamed``: the fresh logs are renamed over the old ones; their directory
  is not synced (the next sync that relies on them does it).
"""

from __future__ import annotations

import signal
import sys

import trio

from colofs.core import Store, vmbase
from colofs.core.blocklog import BlockLog
from tests.core.crash_stream import stream_write

DISK_SIZE = 1 << 20
SVM_AT = 3 * DISK_SIZE // 4
SVM_DATA = b"S" * 9000


def stop_at(point: str) -> None:
    print(f"at {point}", flush=True)
    while True:  # killed here: never returns in the test
        signal.pause()


def install(operation: str, point: str) -> None:
    """Make the switch stop at ``point`` (the functions it passes there, replaced)."""
    if point in ("start", "prepared"):
        install_state = vmbase._install_state
        # A failover renames a state file twice: at its start, and in the switch at its end.
        skip = [1 if operation == "failover" and point == "prepared" else 0]

        def before_install(path: str) -> None:
            if skip[0]:
                skip[0] -= 1
            else:
                stop_at(point)
            install_state(path)

        vmbase._install_state = before_install
    elif point in ("state", "renamed"):
        take_spare = BlockLog.take_spare
        taken = [0]

        def around_take(self: BlockLog, fd: int, gen: int) -> int:
            if point == "state":
                stop_at(point)
            old = take_spare(self, fd, gen)
            taken[0] += 1
            if taken[0] == 2:  # hidden and active of the one disk
                stop_at(point)
            return old

        BlockLog.take_spare = around_take  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown point {point!r}")


async def run(path: str, operation: str, point: str) -> None:
    store = await Store.open(path, role="secondary", create=True)
    await store.create_disk("vm", "disk0", DISK_SIZE)
    vm = store.vm("vm")
    await vm.apply_primary(1, [stream_write(7, s) for s in range(1, 5)])
    await vm.checkpoint(4)
    await vm.apply_primary(5, [stream_write(7, s) for s in range(5, 9)])
    await vm.disk("disk0").write(SVM_AT, SVM_DATA)
    install(operation, point)
    print("ready", flush=True)
    if operation == "checkpoint":
        await vm.checkpoint(8)
    else:
        await vm.failover()
    print("done", flush=True)  # the point was never reached
    store.abandon()


if __name__ == "__main__":
    trio.run(run, sys.argv[1], sys.argv[2], sys.argv[3])
