"""The raw image a disk is imported from: opened without blocking, copied only while it holds still.

An import runs while the control request that asked for it holds the
mount's root directory, so a source that can block an ``open`` or a
``read`` forever (a FIFO with no writer, a terminal, a socket) would hang
the whole control path. The type is therefore checked with ``stat`` before
anything is opened, the open itself never blocks (``O_NONBLOCK``), and the
opened file is checked again: only a regular file or a block device is
taken.

An image that changes while it is copied gives a disk that is neither the
old image nor the new one. The source's size and mtime (a block device's
size) are compared before the copy, after every chunk, and after the last
one; any change, or an end of file before the expected size, fails the
import.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from colofs.core.errors import BadArgument, ColofsError, DiskIOError, InUse
from colofs.core.fileio import write_all

ACCEPTED = "a regular file or a block device"
CHUNK = 1 << 20
_ZERO = bytes(CHUNK)


class SourceChanged(ColofsError):
    """The image changed (size, mtime, or an early end) while it was being copied."""


def kind_of(mode: int) -> str:
    """What a file of this ``st_mode`` is, in words an operator recognises."""
    for test, words in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return words
    return f"a file of unknown type (mode {mode:o})"


def accepted(mode: int) -> bool:
    return stat.S_ISREG(mode) or stat.S_ISBLK(mode)


@dataclass
class _Look:
    """What is compared to tell whether the source changed."""

    size: int
    mtime_ns: int


class ImageSource:
    """An opened import source; :meth:`close` it (or use it as a context manager)."""

    def __init__(self, path: str, fd: int, mode: int) -> None:
        self.path = path
        self.fd = fd
        self.mode = mode
        self.kind = kind_of(mode)
        self._first = self._look()

    @property
    def size(self) -> int:
        """The image's size when it was opened."""
        return self._first.size

    def _look(self) -> _Look:
        st = os.fstat(self.fd)
        if stat.S_ISBLK(self.mode):
            # A device's size is its capacity; its inode times say nothing about its content.
            return _Look(os.lseek(self.fd, 0, os.SEEK_END), 0)
        return _Look(st.st_size, st.st_mtime_ns)

    def check_unchanged(self, when: str) -> None:
        """Raise :class:`SourceChanged` if the size or mtime differ from when it was opened."""
        now = self._look()
        if now == self._first:
            return
        what = []
        if now.size != self._first.size:
            what.append(f"size {self._first.size} -> {now.size} bytes")
        if now.mtime_ns != self._first.mtime_ns:
            what.append("modification time changed")
        raise SourceChanged(f"image {self.path} changed {when} ({', '.join(what)}): it must not be "
                            "written while it is imported; nothing was imported")

    def magic(self) -> bytes:
        """The first bytes of the image (to recognise formats that are not raw)."""
        return os.pread(self.fd, 4, 0)

    def copy_into(self, fd: int, progress: Callable[[int], None] | None = None) -> None:
        """Copy the image into ``fd`` from offset 0, leaving holes where it holds zeros.

        ``progress`` is told the bytes copied so far after each chunk.
        """
        self.check_unchanged("before the copy")
        size = self.size
        off = 0
        while off < size:
            want = min(CHUNK, size - off)
            try:
                data = os.pread(self.fd, want, off)
            except OSError as e:
                raise DiskIOError(f"importing {self.path}: read at {off} failed: {e.strerror}", e.errno) from e
            if not data:
                raise SourceChanged(f"image {self.path} ended at {off} bytes during the copy, {size} expected: "
                                    "it shrank while it was imported; nothing was imported")
            if data != _ZERO[: len(data)]:
                try:
                    write_all(fd, [data], off)
                except OSError as e:
                    raise DiskIOError(f"importing {self.path}: write at {off} failed: {e.strerror}", e.errno) from e
            off += len(data)
            self.check_unchanged(f"after {off} of {size} bytes were copied")
            if progress is not None:
                progress(off)
        self.check_unchanged("by the end of the copy")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_image(path: str) -> ImageSource:
    """Open ``path`` as an import source without ever blocking: a regular file or a block device only.

    Blocking system calls: run it in a worker thread. Raises
    :class:`BadArgument` naming what the path is when it cannot be imported,
    :class:`InUse` for a block device that is mounted or claimed, and
    ``OSError`` when it cannot be looked at or opened.
    """
    st = os.stat(path)  # follows a symlink: what counts is what it points to
    if not accepted(st.st_mode):
        raise BadArgument(f"image {path} is {kind_of(st.st_mode)}; an import takes {ACCEPTED}")
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    if stat.S_ISBLK(st.st_mode):
        flags |= os.O_EXCL  # refused (EBUSY) while the device is mounted or claimed
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.EBUSY and stat.S_ISBLK(st.st_mode):
            raise InUse(f"image {path}: the block device is in use (mounted, or opened exclusively by "
                        "another program); unmount or release it first") from None
        raise
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or not accepted(now.st_mode):
            raise BadArgument(f"image {path} was replaced (now {kind_of(now.st_mode)}) while it was opened")
        os.set_blocking(fd, True)
        return ImageSource(path, fd, now.st_mode)
    except BaseException:
        os.close(fd)
        raise
