"""Progress lines, /proc readings and FUSE escape hatches for the comparison run.

Every external command goes through :func:`bench.host.run` with a timeout, and
every call into a mount through :func:`call_with_timeout`, so one stuck tool
or daemon fails its row instead of hanging the whole run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from bench.host import StepError
from mountctl.pair import alive

T = TypeVar("T")

_T0 = time.monotonic()


class Hung(StepError):
    """A call into a FUSE mount never returned: its daemon is stuck."""


def progress(msg: str) -> None:
    """One line per step on stderr, stamped with the run's elapsed time, so a slow step is visible."""
    t = int(time.monotonic() - _T0)
    print(f"[{t // 60:2d}:{t % 60:02d}] {msg}", file=sys.stderr, flush=True)


def proc_status_kib(pid: int, field: str) -> int | None:
    """A ``VmHWM``/``VmRSS`` style field of /proc/PID/status in KiB, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def pss_kib(pid: int) -> int | None:
    """The process's proportional set size (``Pss`` of /proc/PID/smaps_rollup) in KiB, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def mounts_under(root: str) -> list[str]:
    """Mount points at or below ``root`` (deepest first), from /proc/self/mountinfo."""
    root = os.path.realpath(root)
    found = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                point = line.split()[4].encode().decode("unicode_escape")
                if point == root or point.startswith(root + "/"):
                    found.append(point)
    except OSError:
        return []
    return sorted(found, key=len, reverse=True)


def abort_fuse(path: str) -> bool:
    """Abort the FUSE connection of the mount at ``path`` (fusectl), releasing every request stuck on it.

    A daemon that deadlocked against the kernel cannot even exit (a thread of
    it waits in the kernel), and whoever waits on its mount -- this harness
    included -- waits forever: aborting the connection is the only way out.
    """
    path = os.path.realpath(path)
    minor = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if fields[4].encode().decode("unicode_escape") == path:
                    minor = fields[2].split(":")[1]
    except (OSError, IndexError):
        return False
    if minor is None:
        return False
    conns = "/sys/fs/fuse/connections"
    if not os.path.exists(os.path.join(conns, minor)):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", conns], capture_output=True, timeout=30, check=False)
    try:
        with open(os.path.join(conns, minor, "abort"), "w") as f:
            f.write("1")
        return True
    except OSError:
        return False


def call_with_timeout(fn: Callable[[], T], timeout: float, what: str) -> T:
    """Run ``fn`` (a system call on a FUSE mount) in a thread; StepError if it does not return in time.

    The thread stays blocked until the mount is aborted; the caller marks the
    mount hung so that cleanup aborts it.
    """
    box: list[Any] = []

    def target() -> None:
        try:
            box.append((True, fn()))
        except BaseException as e:  # handed to the caller below
            box.append((False, e))

    t = threading.Thread(target=target, name=what, daemon=True)
    t.start()
    t.join(timeout)
    if not box:
        raise Hung(f"{what} did not return within {timeout:.0f} s")
    ok, value = box[0]
    if not ok:
        raise value
    return value


def first_line(argv: Sequence[str]) -> str:
    """The first output line of a ``--version`` style command, or why there is none."""
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"
    out = (res.stdout or res.stderr).strip().splitlines()
    return out[0] if out else "unknown"
