"""One daemon per store: an ``flock`` on a file in the store, holding who owns it.

The lock dies with the process (``kill -9`` included), so a crashed daemon
never blocks the next mount. The file's JSON content tells others which
process serves the store, where, and finally how it ended, which is how
``mountctl umount`` reports whether the store was closed cleanly.
"""

from __future__ import annotations

import fcntl
import json
import os
from typing import Any


class AlreadyMounted(Exception):
    """Another live process holds the store."""


def _read(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 1 << 16, 0)
        info = json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


class StoreLock:
    """The exclusive lock of a store, held by its daemon for the whole mount."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self.info: dict[str, Any] = {}

    def acquire(self, **info: Any) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = _read(fd)
            os.close(fd)
            raise AlreadyMounted(
                f"store {os.path.dirname(self.path)} is already mounted"
                + (f" on {other['mountpoint']}" if other.get("mountpoint") else "")
                + (f" by pid {other['pid']}" if other.get("pid") else "")
            ) from None
        self.fd = fd
        self.update(**info)

    def update(self, **info: Any) -> None:
        """Merge ``info`` into the lock file's content."""
        self.info.update(info)
        data = (json.dumps(self.info, sort_keys=True) + "\n").encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def holder(path: str) -> dict[str, Any] | None:
    """The lock file's content if a live process holds it, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd) or {"pid": None}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def last_state(path: str) -> dict[str, Any]:
    """What the last holder wrote (read after it let go)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}
    try:
        return _read(fd)
    finally:
        os.close(fd)
