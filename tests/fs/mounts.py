"""Real mounts for tests: started with ``mountctl``, always cleaned up.

A :class:`Mount` remembers the daemon PIDs it started (read from the store's
lock file) and, at cleanup, unmounts; if that fails it kills only those PIDs
and detaches the mount with ``fusermount3 -u -z``. Every subprocess has a
timeout, so a hung mount fails a test instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from colofs.fs.config import LOCK_NAME
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
    res = subprocess.run([*MOUNTCTL, *map(str, args)], capture_output=True, text=True, timeout=timeout,
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


class Mount:
    """A store and a mountpoint under a test's temporary directory."""

    def __init__(self, base: Path, role: str = "secondary", name: str = "m") -> None:
        self.store = base / f"{name}-store"
        self.mnt = base / f"{name}-mnt"
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.role = role
        self.pids: list[int] = []
        self.mounted = False

    # -- life cycle ---------------------------------------------------------

    def mount(self, *extra: str, role: str | None = None) -> subprocess.CompletedProcess[str]:
        res = mountctl("mount", "--role", role or self.role, "--store", self.store, *extra, self.mnt)
        self.mounted = True
        info = json.loads((self.store / LOCK_NAME).read_text())
        self.pids.append(int(info["pid"]))
        return res

    @property
    def pid(self) -> int:
        return self.pids[-1]

    def umount(self) -> subprocess.CompletedProcess[str]:
        res = mountctl("umount", self.mnt)
        self.mounted = False
        self._wait_gone(self.pid)
        return res

    def remount(self) -> None:
        self.umount()
        self.mount()

    def kill9(self) -> None:
        """Kill the daemon as a crash would; the mount goes stale."""
        os.kill(self.pid, signal.SIGKILL)
        self._wait_gone(self.pid)

    @staticmethod
    def _wait_gone(pid: int, timeout: float = DEADLINE) -> None:
        """Wait until the daemon ``pid`` has exited (a zombie counts as gone)."""
        wait_until_sync(lambda: not _alive(pid), timeout, f"daemon {pid} to exit")

    def cleanup(self) -> None:
        if self.mounted and os.path.ismount(self.mnt):
            try:
                mountctl("umount", self.mnt, check=False, timeout=60)
            except subprocess.TimeoutExpired:
                pass
        for pid in self.pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
                self._wait_gone(pid)
        subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True, timeout=30, check=False)
        self.mounted = False

    # -- helpers --------------------------------------------------------------------

    def path(self, *parts: str) -> Path:
        return self.mnt.joinpath(*parts)

    def status(self, *what: str) -> dict:
        return json.loads(mountctl("status", self.mnt, *what, "--json").stdout)

    def log(self) -> str:
        return (self.store / ".colofs-mount.log").read_text(errors="replace")
