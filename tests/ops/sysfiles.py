"""Putting colofs's helpers where mount(8) looks for them, for one test at a time, and taking them away.

mount(8) finds ``mount.fuse.colofs`` only in ``/sbin`` and runs
``mount.fuse3``'s ``colofs`` from the default ``PATH``, so these tests link
the venv's console scripts there. A link is made only if the name is free
and removed only by the test that made it; an exclusive lock serialises
such tests across test runs sharing the machine, so one run never removes
a link another is using.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.waiting import DEADLINE

BIN = Path(sys.executable).parent
LOCK = "/run/lock/colofs-ops-tests.lock" if os.path.isdir("/run/lock") else "/tmp/colofs-ops-tests.lock"


@contextmanager
def system_lock() -> Iterator[None]:
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextmanager
def linked(link: str, target: Path) -> Iterator[str]:
    """``link`` -> ``target`` for the block (an existing ``link`` is used and left as it is)."""
    made = False
    if not os.path.lexists(link):
        os.symlink(target, link)
        made = True
    try:
        yield link
    finally:
        if made:
            os.unlink(link)


class Reaped:
    """A command run under ``tests.ops.reaper``: its result, then the exit status of each daemon it left."""

    def __init__(self, *cmd: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.ops.reaper", *cmd], stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=Path(__file__).parents[2])
        assert self.proc.stdout is not None
        self.result: dict[str, Any] = json.loads(self.proc.stdout.readline())

    @property
    def rc(self) -> int:
        return int(self.result["rc"])

    @property
    def out(self) -> str:
        return str(self.result["out"])

    def exits(self, timeout: float = DEADLINE) -> list[dict[str, Any]]:
        """The exit of every daemon the command left behind (waits for the wrapper, bounded)."""
        out, _ = self.proc.communicate(timeout=timeout)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=DEADLINE)
