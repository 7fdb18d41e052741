"""The kernel's side of one FUSE mount: how many asynchronous requests it queues, set through fusectl.

The kernel sends a FUSE daemon at most ``max_background`` asynchronous
requests at a time per connection (12 by default): O_DIRECT writes and reads
submitted with libaio or io_uring, readahead, writeback of dirty pages. A
daemon holds each 1 MiB write it serves twice, libfuse's receive buffer and
pyfuse3's ``bytes`` copy, until the write is done; a primary VM's write is
done only when it is in base and in the retained log, so a 1 MiB fill at
queue depth 16 kept 12 of them, 24 MiB, in the VM's worker at once. Lowered
to :data:`PRIMARY_MAX_BACKGROUND` on a primary VM's mount the kernel keeps the
rest queued (in the writer's pages, not the daemon's), and the worker's peak
(``bench/primary_memory.py --iodepth 16``) fell from 75-77 to 58-59 MiB with
no loss of rate or CPU per MiB: the link to the secondary is what paces a
primary's large writes.

The limit is the connection's ``max_background`` file under
``/sys/fs/fuse/connections`` (the fusectl file system, which systemd mounts at
boot; mounted here if it is not). Where neither works the mount keeps the
kernel's default: nothing else depends on it.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from colofs.core.state import PRIMARY

log = logging.getLogger(__name__)

FUSECTL = "/sys/fs/fuse/connections"
PRIMARY_MAX_BACKGROUND = 4
"""Asynchronous requests queued at once on a primary VM's mount (the kernel's default is 12).

``bench/primary_memory.py --iodepth 16 --max-background N`` (2-vCPU machine
under load): peak RSS of the worker 75.0-76.8 MiB at 12, 57.7-58.8 at 4,
53.6-54.6 at 2, CPU per MiB of the fill 6.6-10.2, 5.8-6.1 and 5.3-6.3 ms;
4K random writes at queue depth 16, 4.2-9.4k IOPS at 12 and 5.0-10.7k at 4,
within the load's spread (2 looked lower: 3.8-7.4k)."""


def connection_id(mountpoint: str, mountinfo: str = "/proc/self/mountinfo") -> int | None:
    """The FUSE connection number of the mount at ``mountpoint`` (its device), from mountinfo.

    Read from the mount table rather than with ``stat`` (or ``realpath`` of
    the path itself), which would ask the FUSE daemon itself and wait for its
    loop to serve it; only the parent's symbolic links are resolved.
    """
    head, tail = os.path.split(os.path.abspath(mountpoint))
    want = os.path.join(os.path.realpath(head), tail)
    found: int | None = None
    try:
        text = Path(mountinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5 or _unescape(fields[4]) != want:
            continue
        major, _, minor = fields[2].partition(":")
        if major.isdigit() and minor.isdigit():
            found = (int(major) << 20) | int(minor)  # the kernel's dev_t, as fusectl names the connection
    return found  # the last one: a mount over an earlier one on the same path hides it


def _unescape(path: str) -> str:
    """mountinfo's octal escapes (``\\040`` for a space) undone."""
    return path.encode().decode("unicode_escape") if "\\" in path else path


def _fusectl(root: str) -> bool:
    """fusectl is mounted at ``root`` (mounted here if not, as systemd would at boot)."""
    if os.path.ismount(root):
        return True
    if not os.path.isdir(root):
        return False  # the fuse module is not loaded, or sysfs is not there
    try:
        subprocess.run(["mount", "-t", "fusectl", "fusectl", root], check=False, timeout=10,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return os.path.ismount(root)  # another worker may have mounted it meanwhile: as good


def set_max_background(mountpoint: str, value: int, root: str = FUSECTL) -> bool:
    """Set the connection's ``max_background`` (and ``congestion_threshold`` at 3/4 of it); True if done."""
    conn = connection_id(mountpoint)
    if conn is None or not _fusectl(root):
        return False
    d = Path(root) / str(conn)
    try:
        (d / "max_background").write_text(f"{value}\n")
        (d / "congestion_threshold").write_text(f"{max(1, value * 3 // 4)}\n")
    except OSError as e:
        log.info("%s: cannot set the FUSE connection's max_background (%s): the kernel's default stays",
                 mountpoint, e)
        return False
    return True


def tune_connection(mountpoint: str, role: str | None) -> bool:
    """Bound the asynchronous requests of a VM's mount by its role: a primary's (see the module); True if set.

    Blocking (a sysfs write, at most one ``mount`` per host): run it in a thread.
    """
    if role != PRIMARY:
        return False
    done = set_max_background(mountpoint, PRIMARY_MAX_BACKGROUND)
    if done:
        log.debug("%s: FUSE max_background %d", mountpoint, PRIMARY_MAX_BACKGROUND)
    return done
