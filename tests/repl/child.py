"""A secondary in its own process (``tests.repl.secondary_proc``), to be killed for real with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from functools import partial

import trio

from tests.waiting import DEADLINE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class SecondaryChild:
    """Started on ``path`` (its store), listening on ``port`` once :meth:`start` returns (kept across restarts)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.proc: trio.Process | None = None
        self.port = 0

    async def start(self, nursery: trio.Nursery, *extra: str) -> None:
        cmd = [sys.executable, "-m", "tests.repl.secondary_proc", self.path, str(self.port), *extra]
        self.proc = await nursery.start(partial(trio.run_process, cmd, stdout=subprocess.PIPE,
                                                stderr=subprocess.DEVNULL, check=False, cwd=ROOT))
        buf = b""
        with trio.fail_after(DEADLINE):
            while b"\n" not in buf:
                chunk = await self.proc.stdout.receive_some(100)
                assert chunk, "the secondary process exited before it was ready"
                buf += chunk
        self.port = int(buf.split()[1])

    async def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        with trio.fail_after(DEADLINE):
            await self.proc.wait()
