"""Real mounts for tests: started with ``mountctl``, always cleaned up.

A :class:`Mount` is :mod:`mountctl.pair`'s ``Node``: it remembers the daemon
PIDs it started (read from the store's lock file) and, at cleanup, unmounts;
if that fails it kills only those PIDs and detaches the mount. Every subprocess has a
timeout, so a hung mount fails a test instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mountctl.pair import Node, alive, kill_tree, with_workers
from tests.waiting import DEADLINE, wait_until_sync

MOUNTCTL = [sys.executable, "-m", "mountctl.cli"]
TIMEOUT = 60
XATTR = "user.colofs."


def errno_of(fn, *args) -> int:
    """The errno ``fn(*args)`` fails with; the test fails if it succeeds."""
    with pytest.raises(OSError) as e:
        fn(*args)
    return e.value.errno


def last_error(path) -> str:
    return os.getxattr(path, XATTR + "last_error").decode()


def mountctl(*args: str, check: bool = True, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """``mountctl ARGS``; a ``mount`` gains ``--single-process`` under ``COLOFS_TEST_WORKERS=0`` (mountctl.pair)."""
    argv = list(map(str, args))
    if argv[:1] == ["mount"]:
        argv = ["mount", *with_workers(argv[1:])]
    res = subprocess.run([*MOUNTCTL, *argv], capture_output=True, text=True, timeout=timeout,
                         check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"mountctl {' '.join(map(str, args))} failed ({res.returncode}):\n"
                             f"{res.stdout}{res.stderr}")
    return res


def run(*cmd: str, check: bool = True, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=timeout, check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{res.stdout}{res.stderr}")
    return res


class Mount(Node):
    """A store and a mountpoint under a test's temporary directory: the harness's :class:`Node`, failing like a test.

    A failing ``mountctl`` raises AssertionError with everything it printed;
    ``pid`` stays the newest daemon's even after it exited, so that a test can
    look for it afterwards; unmounting and killing wait for that exit.
    """

    def __init__(self, base: Path, role: str = "secondary", name: str = "m") -> None:
        super().__init__(base, name, role)
        self.mnt.mkdir(parents=True, exist_ok=True)

    # -- life cycle ---------------------------------------------------------

    def mountctl(self, *args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
        return mountctl(*args, timeout=timeout)

    @property
    def pid(self) -> int:  # type: ignore[override]
        return self.pids[-1]

    def umount(self, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
        res = super().umount(timeout)
        self._wait_gone(self.pid)
        return res

    def remount(self) -> None:
        self.umount()
        self.mount()

    def kill9(self) -> None:
        """Kill the daemon as a crash would (with ``--workers``, its zygote and workers with it); the mount goes stale."""
        for pid in kill_tree(self.pid):
            self._wait_gone(pid)

    @staticmethod
    def _wait_gone(pid: int, timeout: float = DEADLINE) -> None:
        """Wait until the daemon ``pid`` has exited (a zombie counts as gone)."""
        wait_until_sync(lambda: not alive(pid), timeout, f"daemon {pid} to exit")

    # -- helpers --------------------------------------------------------------------

    def status(self, *what: str) -> dict:  # type: ignore[override]
        """What ``mountctl status MNT WHAT... --json`` prints: the command itself, as a test of it."""
        return json.loads(mountctl("status", self.mnt, *what, "--json").stdout)
