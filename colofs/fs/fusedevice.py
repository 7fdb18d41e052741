"""The mount's ``/dev/fuse`` descriptor, and a check for requests the kernel has queued on it.

pyfuse3 opens the device in ``pyfuse3.init`` but does not expose its
descriptor, so it is found among the process's open files (one mount per
process). The daemon hands the check to the store's I/O context: a small
read the page cache misses blocks the loop only when nothing else waits.
"""

from __future__ import annotations

import os
import select
from collections.abc import Callable


def fuse_device_fd() -> int | None:
    """This process's descriptor of ``/dev/fuse``, or ``None`` if it has none open."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for name in names:
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                return int(name)
        except OSError:
            continue
    return None


def queued_requests_probe() -> Callable[[], bool] | None:
    """A check that is true while the kernel holds FUSE requests not yet read (``None`` without a device)."""
    fd = fuse_device_fd()
    if fd is None:
        return None
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return lambda: bool(poller.poll(0))
