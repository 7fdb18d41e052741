"""A secondary in its own process, for tests that kill it with SIGKILL.

Run as ``python -m tests.repl.secondary_proc STORE PORT [hold-apply]``: opens
(and recovers) the store, serves it on 127.0.0.1:PORT without a key, prints
``ready PORT`` and serves until killed. With ``hold-apply`` it takes the
primary's stream (checks it, sends receipts) but never applies a batch, as a
secondary whose disk stalls.
"""

from __future__ import annotations

import logging
import sys

import trio

from colofs.core import Store
from colofs.core.vm import VM, PrimaryWrite
from colofs.repl import ReplConfig, serve_secondary


async def _never_applied(self: VM, start: int, writes: list[PrimaryWrite]) -> int:
    await trio.sleep_forever()
    raise AssertionError("unreachable")


async def main(path: str, port: int, hold: bool = False) -> None:
    store = await Store.open(path, role="secondary", create=True)
    if hold:
        VM.apply_primary = _never_applied  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: serve_secondary(store, ("127.0.0.1", port), None,
                                                config=ReplConfig(peer_timeout=3.0), task_status=task_status))
        print(f"ready {server.port}", flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    trio.run(main, sys.argv[1], int(sys.argv[2]), sys.argv[3:] == ["hold-apply"])
