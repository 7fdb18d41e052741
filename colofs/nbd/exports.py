"""What an NBD export name stands for, and the I/O of one export through the core.

``VM/DISK`` is the disk as the VM on this host sees it (``Disk.read`` and
``Disk.write``: the SVM's view on a secondary; on a primary the disk itself,
whose writes are forwarded to the secondary exactly as the FUSE file's are).
``VM/DISK@NAME`` is a snapshot (read-only) or a clone (writable) of it.
``VM/DISK:ingest`` is a secondary disk's feed from an unmodified QEMU
primary (:mod:`colofs.nbd.ingest`). A leading ``/`` is ignored, so the path of an ``nbd+unix:///VM/DISK`` URI works
as it is.

The kernel's page cache of the same disk's FUSE file is kept coherent by a
:class:`CacheLink` the mount hands in (see :mod:`colofs.nbd.fusecache`): the
server is FUSE-free, and without a mount (tests, tools) there is no cache to
keep.
"""

from __future__ import annotations

import bisect
import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

from colofs.core.blocklog import BlockLog
from colofs.core.blocks import block_span
from colofs.core.disk import Disk
from colofs.core.errors import ColofsError, NotFound
from colofs.core.layers import prefetch_layers
from colofs.core.snapshot import Snapshot
from colofs.core.state import SECONDARY
from colofs.core.store import Store
from colofs.nbd.ingest import INGEST_SUFFIX, IngestImage, WriteGroup
from colofs.nbd.protocol import STATE_HOLE, STATE_ZERO

SNAP_SEP = "@"
ZERO_CHUNK = 1 << 20
MAX_STATUS_EXTENTS = 2048
MAX_STATUS_SPAN = 1 << 30  # bytes one BLOCK_STATUS reply describes at most (the client asks again)


class CacheLink(Protocol):
    """How the mount keeps its kernel page cache coherent with NBD I/O on the same image."""

    async def opened(self, export: Export) -> None:
        """A client starts using ``export``: writes the kernel still buffers must reach the core first."""

    async def written(self, export: Export) -> None:
        """``export`` was written: pages the kernel caches of it are stale."""

    def closed(self, export: Export) -> None:
        """A client stopped using ``export``."""


class NoCache:
    """No mount: nothing caches the images."""

    async def opened(self, export: Export) -> None:
        pass

    async def written(self, export: Export) -> None:
        pass

    def closed(self, export: Export) -> None:
        pass


class ExportError(ColofsError):
    """An export name that names nothing servable; the message is sent to the client."""


@dataclass(eq=False)
class Export:
    """One image a connection serves: a disk, a snapshot or a clone."""

    name: str
    vm: str
    disk: str
    snap: str  # "" for the disk itself
    image: Disk | Snapshot | IngestImage
    writable: bool
    description: str = ""
    kind: str = "disk"  # disk, snapshot, clone or ingest
    _zeros: bytes = field(default=b"", repr=False)

    @property
    def size(self) -> int:
        return self.image.size

    @property
    def block_size(self) -> int:
        return self.disk_obj.block_size

    @property
    def disk_obj(self) -> Disk:
        return self.image if isinstance(self.image, Disk) else self.image.disk

    async def read(self, offset: int, length: int) -> bytearray:
        return await self.image.read(offset, length)

    def prefetch(self, offset: int, length: int) -> int:
        """Start the device reads a coming read of this range needs (a hint; see ``prefetch_layers``)."""
        if offset < 0 or length <= 0 or offset + length > self.size:
            return 0
        d = self.disk_obj
        return prefetch_layers(self.layers(), d.base_fd, d.shift, offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        await self.image.write(offset, data)

    async def write_zeroes(self, offset: int, length: int) -> None:
        """Zeros are written as data (the core has no holes to punch in a layer); chunked, never one huge buffer."""
        if not self._zeros:
            self._zeros = bytes(ZERO_CHUNK)
        end = offset + length
        while offset < end:
            n = min(ZERO_CHUNK, end - offset)
            await self.image.write(offset, self._zeros[:n])
            offset += n

    async def flush(self) -> None:
        await self.image.flush()

    def write_group(self) -> WriteGroup | None:
        """For an ingest export, where a connection gathers its pipelined writes; None: each is served alone."""
        return WriteGroup(self.image) if isinstance(self.image, IngestImage) else None

    def layers(self) -> list[BlockLog]:
        """The block-map layers over base, first match wins (as the core reads them)."""
        img = self.image
        if isinstance(img, Disk):
            return [img.active, img.hidden]
        if isinstance(img, IngestImage):
            return []  # the primary's image is base itself
        return [log for log in (img.overlay, img.frozen) if log is not None]

    def allocation(self, offset: int, length: int, *, one: bool = False) -> list[tuple[int, int]]:
        """``base:allocation`` extents ``(length, flags)`` from ``offset``; fewer bytes than asked is allowed."""
        d = self.disk_obj
        end = min(offset + length, self.size, offset + MAX_STATUS_SPAN)
        return allocation(self.layers(), d.base_fd, d.shift, offset, end,
                          1 if one else MAX_STATUS_EXTENTS)


def _layer_blocks(layers: Sequence[BlockLog], lo: int, hi: int) -> list[int]:
    """Sorted blocks in ``[lo, hi)`` that some layer holds (from whichever side is cheaper to scan)."""
    found: set[int] = set()
    for layer in layers:
        m = layer.map
        if not m:
            continue
        if len(m) < hi - lo:
            found.update(b for b in m if lo <= b < hi)
        else:
            found.update(b for b in range(lo, hi) if b in m)
    return sorted(found)


def _base_run(fd: int, pos: int, limit: int) -> tuple[int, bool]:
    """Where the run of base starting at ``pos`` ends (at most ``limit``), and whether it is a hole."""
    try:
        data = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError as e:
        if e.errno == errno.ENXIO:  # no data from pos on
            return limit, True
        return limit, False  # no SEEK_DATA here: say "data", always true
    if data > pos:
        return min(data, limit), True
    try:
        hole = os.lseek(fd, pos, os.SEEK_HOLE)
    except OSError:
        return limit, False
    return min(max(hole, pos + 1), limit), False


def allocation(layers: Sequence[BlockLog], base_fd: int, shift: int, offset: int, end: int,
               max_extents: int) -> list[tuple[int, int]]:
    """Extents of ``[offset, end)``: layer blocks and base data are data; base holes are holes reading zero."""
    bs = 1 << shift
    blocks = _layer_blocks(layers, *block_span(offset, end - offset, shift)) if end > offset else []
    out: list[tuple[int, int]] = []
    pos = offset
    while pos < end and len(out) < max_extents:
        b = pos >> shift
        i = bisect.bisect_left(blocks, b)
        if i < len(blocks) and blocks[i] == b:
            stop_block = b + 1
            i += 1
            while i < len(blocks) and blocks[i] == stop_block:
                stop_block += 1
                i += 1
            stop, flags = min(stop_block * bs, end), 0
        else:
            nxt = blocks[i] * bs if i < len(blocks) else end
            stop, hole = _base_run(base_fd, pos, min(nxt, end))
            flags = STATE_HOLE | STATE_ZERO if hole else 0
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + stop - pos, flags)
        else:
            out.append((stop - pos, flags))
        pos = stop
    return out


class Exports:
    """Resolves export names against one store; lists what can be served."""

    def __init__(self, store: Store, cache: CacheLink | None = None) -> None:
        self.store = store
        self.cache: CacheLink = cache or NoCache()
        self._ingest_locks: dict[str, trio.Lock] = {}

    def resolve(self, name: str) -> Export:
        """The export ``name`` stands for, or :class:`ExportError` saying why none."""
        path = name[1:] if name.startswith("/") else name
        vm_name, sep, rest = path.partition("/")
        if not sep or not vm_name or not rest or "/" in rest:
            raise ExportError(f"export {name!r}: name an export VM/DISK or VM/DISK@SNAPSHOT")
        ingest = rest.endswith(INGEST_SUFFIX)
        if ingest:
            rest = rest[: -len(INGEST_SUFFIX)]
        disk_name, at, snap_name = rest.partition(SNAP_SEP)
        if ingest and at:
            raise ExportError(f"export {name!r}: a snapshot or clone cannot be ingested into")
        try:
            vm = self.store.vm(vm_name)
            vm.check_usable()
            disk = vm.disk(disk_name)
        except NotFound as e:
            raise ExportError(f"export {name!r}: {e}") from None
        except ColofsError as e:
            raise ExportError(f"export {name!r}: {e}") from None
        if ingest:
            lock = self._ingest_locks.setdefault(vm_name, trio.Lock())
            image = IngestImage(disk, lock)
            try:
                image.check_role()
            except ColofsError as e:
                raise ExportError(f"export {name!r}: {e}") from None
            return Export(path, vm_name, disk_name, "", image, True,
                          f"ingest into {disk.label} (secondary; forwarded primary writes)", kind="ingest")
        if not at:
            return Export(path, vm_name, disk_name, "", disk, True,
                          f"disk {disk.label} ({vm.state.role})")
        snap = disk.snapshots.get(snap_name)
        if snap is None:
            raise ExportError(f"export {name!r}: disk {disk.label} has no snapshot or clone {snap_name!r}")
        kind = "clone" if snap.writable else "snapshot"
        return Export(path, vm_name, disk_name, snap_name, snap, snap.writable,
                      f"{kind} {snap.label} (seq {snap.state.seq})", kind=kind)

    def names(self) -> list[tuple[str, str]]:
        """Every servable export and its description, for ``NBD_OPT_LIST``."""
        out: list[tuple[str, str]] = []
        for vm_name, vm in sorted(self.store.vms.items()):
            if vm.damage is not None:
                continue
            for disk_name, disk in sorted(vm.disks.items()):
                out.append((f"{vm_name}/{disk_name}", f"disk ({vm.state.role})"))
                if vm.state.role == SECONDARY:
                    out.append((f"{vm_name}/{disk_name}{INGEST_SUFFIX}", "ingest (forwarded primary writes)"))
                for snap_name, snap in sorted(disk.snapshots.items()):
                    kind = "clone" if snap.writable else "snapshot"
                    out.append((f"{vm_name}/{disk_name}{SNAP_SEP}{snap_name}", kind))
        return out
