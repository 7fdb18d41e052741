"""Checks and cleanup of a mountpoint, shared by the daemon and ``mountctl``.

A daemon killed with ``SIGKILL`` leaves its mount behind: every access then
fails with ``ENOTCONN`` ("Transport endpoint is not connected"). Such a stale
mount is detached with ``fusermount3 -u -z`` before a new mount, and the user
is told.
"""

from __future__ import annotations

import errno
import os
import subprocess

FUSERMOUNT = "fusermount3"


class MountpointError(Exception):
    """The mountpoint cannot be used; the message says why."""


def is_stale(path: str) -> bool:
    # statfs always reaches the daemon; stat may be answered from attributes the kernel cached.
    for probe in (os.stat, os.statvfs):
        try:
            probe(path)
        except OSError as e:
            if e.errno == errno.ENOTCONN:
                return True
    return False


def fuse_unmount(path: str, *, lazy: bool = False, timeout: float = 120.0) -> tuple[bool, str]:
    """Run ``fusermount3 -u [-z]``; returns (success, its message)."""
    cmd = [FUSERMOUNT, "-u", *(["-z"] if lazy else []), path]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"{' '.join(cmd)}: {e}"
    return res.returncode == 0, (res.stderr or res.stdout).strip()


def detach_stale(path: str) -> bool:
    """Detach a stale mount at ``path``; True if there was one."""
    if not is_stale(path):
        return False
    ok, msg = fuse_unmount(path, lazy=True)
    if not ok:
        raise MountpointError(f"{path}: stale mount (its daemon is gone) and detaching it failed: {msg}")
    return True


def check_mountpoint(path: str) -> str:
    """The absolute path of a directory that can be mounted on; raises :class:`MountpointError`."""
    path = os.path.abspath(path)
    try:
        os.stat(path)
    except FileNotFoundError:
        raise MountpointError(f"mountpoint {path} does not exist") from None
    except OSError as e:
        raise MountpointError(f"mountpoint {path}: {e.strerror}") from None
    if not os.path.isdir(path):
        raise MountpointError(f"mountpoint {path} is not a directory")
    if os.path.ismount(path):
        kind = mount_type(path)
        raise MountpointError(f"{path} is already a mount point" + (f" ({kind})" if kind else ""))
    return path


def mount_type(path: str) -> str | None:
    """The file system type mounted at ``path`` per /proc/self/mounts (last mount wins)."""
    path = os.path.abspath(path)
    found = None
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and _unescape(parts[1]) == path:
                    found = parts[2]
    except OSError:
        return None
    return found


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
