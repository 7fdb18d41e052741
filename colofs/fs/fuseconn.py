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

Small writes are another matter: a sync primary's 4 KiB write waits for the
secondary's receipt, and the queue depth the kernel allows is how many of
them share a round trip (libaio at depth 16, max_background 4 against 12:
0.32 and 0.17 against 0.42 and 0.58 of QEMU's rate). So the limit follows
the writes (:class:`BackgroundLimit`): lowered while large writes arrive,
the kernel's value again after a run of small ones.

The limit is the connection's ``max_background`` file under
``/sys/fs/fuse/connections`` (the fusectl file system, which systemd mounts at
boot; mounted here if it is not). Where neither works the mount keeps the
kernel's default: nothing else depends on it.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

FUSECTL = "/sys/fs/fuse/connections"
PRIMARY_MAX_BACKGROUND = 4
"""Asynchronous requests queued at once on a primary VM's mount while large writes arrive (the kernel's default is 12).

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


LARGE_WRITE = 256 << 10
"""A write this large lowers the limit: what it holds while queued matters for the worker's memory."""
CALM_WRITES = 64
"""Small writes in a row after which the kernel's limit is given back."""


class BackgroundLimit:
    """A primary VM's mount's ``max_background``, set by the size of the writes it serves.

    Lowered to ``low`` at the first large write while the VM is a primary,
    back to the kernel's ``high`` after :data:`CALM_WRITES` small writes in a
    row: a switch is one short sysfs write, made at most once per that many
    writes, on the loop. The role is read at each large write, so a VM that
    becomes primary by failover gets the bound as well.
    """

    def __init__(self, conn_dir: Path, high: int, is_primary: Callable[[], bool],
                 low: int = PRIMARY_MAX_BACKGROUND) -> None:
        self.conn_dir = conn_dir
        self.high = high
        self.low = min(low, high)
        self.is_primary = is_primary
        self.current = high
        self.small_run = 0
        self.switches = 0

    def note_write(self, size: int) -> None:
        """Called before each write is served."""
        if size >= LARGE_WRITE:
            self.small_run = 0
            if self.current != self.low and self.is_primary():
                self._set(self.low)
        elif self.current != self.high:
            self.small_run += 1
            if self.small_run >= CALM_WRITES:
                self._set(self.high)

    def _set(self, value: int) -> None:
        try:
            (self.conn_dir / "max_background").write_text(f"{value}\n")
            (self.conn_dir / "congestion_threshold").write_text(f"{max(1, value * 3 // 4)}\n")
        except OSError as e:  # the mount is gone, or fusectl with it: nothing to bound any more
            log.info("%s: cannot set max_background to %d (%s); leaving it", self.conn_dir, value, e)
            self.low = self.high = value = self.current
        self.current = value
        self.switches += 1


def background_limit(mountpoint: str, is_primary: Callable[[], bool], root: str = FUSECTL) -> BackgroundLimit | None:
    """The :class:`BackgroundLimit` of the mount at ``mountpoint``, or None where fusectl cannot be had.

    Blocking (a sysfs read, at most one ``mount`` per host): run it in a
    thread, once the mount is served (nothing here should need it, but a
    request it did make would then be answered).
    """
    conn = connection_id(mountpoint)
    if conn is None or not _fusectl(root):
        return None
    d = Path(root) / str(conn)
    try:
        high = int((d / "max_background").read_text())
    except (OSError, ValueError) as e:
        log.info("%s: cannot read the FUSE connection's max_background (%s): not bounded", mountpoint, e)
        return None
    return BackgroundLimit(d, high, is_primary)
