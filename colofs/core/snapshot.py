"""Snapshots and writable clones: past images of a disk kept by copy-before-write.

A snapshot is a write-once :class:`BlockLog` attached to its disk's
:class:`CopyBeforeWrite` — the same mechanism as the hidden buffer, with a
lifetime chosen by the user instead of one checkpoint interval. Its image is
``target[b] if b in target else base[b]``. A clone adds a mutable overlay on
top: ``overlay[b] if b in overlay else image[b]``; its writes never reach
the disk or the snapshot.

Reads that fall through to base take the disk's range lock shared, so they
never interleave with a copy-before-write of the same block; a clone's own
lock orders its read-modify-writes.
"""

from __future__ import annotations

import os
from typing import Protocol

from colofs.core.blocklog import BlockLog
from colofs.core.blocks import block_span, check_range
from colofs.core.errors import RoleError
from colofs.core.fileio import Buffer
from colofs.core.layers import patch_edges, read_layers, write_overlay
from colofs.core.rangelock import RangeLock
from colofs.core.state import CLONE, SnapshotState


class SnapshotSource(Protocol):
    """What a snapshot reads of its disk (``colofs.core.disk.Disk`` is one): base and its lock."""

    label: str
    size: int
    shift: int
    base_fd: int
    lock: RangeLock


def target_path(disk_path: str, name: str) -> str:
    return os.path.join(disk_path, f"snap-{name}.log")


def overlay_path(disk_path: str, name: str) -> str:
    return os.path.join(disk_path, f"clone-{name}.log")


class Snapshot:
    """A point-in-time image of a disk, read-only, or writable when it is a clone."""

    def __init__(
        self,
        disk: SnapshotSource,
        name: str,
        state: SnapshotState,
        target: BlockLog | None,
        overlay: BlockLog | None,
        base: Snapshot | None,
    ) -> None:
        self.disk = disk
        self.name = name
        self.state = state
        self.target = target
        self.overlay = overlay
        self.base = base
        self.size = disk.size
        self.label = f"{disk.label}@{name}"
        self.lock = RangeLock()
        frozen = target if target is not None else base.frozen if base is not None else None
        assert frozen is not None, "a snapshot needs a target of its own or a base"
        self.frozen: BlockLog = frozen
        self._layers = (overlay, frozen) if overlay is not None else (frozen,)

    @property
    def writable(self) -> bool:
        return self.state.kind == CLONE

    @property
    def space(self) -> int:
        """Bytes of saved and written blocks this snapshot holds itself."""
        own = self.target.data_bytes if self.target is not None else 0
        return own + (self.overlay.data_bytes if self.overlay is not None else 0)

    def check_range(self, offset: int, length: int) -> None:
        check_range(self.label, self.size, offset, length)

    async def _read_view(self, offset: int, mv: memoryview) -> None:
        d = self.disk
        async with d.lock.range(*block_span(offset, len(mv), d.shift), exclusive=False):
            await read_layers(d.io, self._layers, d.base_fd, d.shift, offset, mv, self.label)

    async def read(self, offset: int, length: int) -> bytearray:
        self.check_range(offset, length)
        out = bytearray(length)
        if length:
            async with self.lock.range(*block_span(offset, length, self.disk.shift), exclusive=False):
                await self._read_view(offset, memoryview(out))
        return out

    async def write(self, offset: int, data: Buffer) -> None:
        """Clones only: the write goes to the overlay, never to the disk or the snapshot."""
        if self.overlay is None:
            raise RoleError(f"{self.label}: a snapshot is read-only")
        self.check_range(offset, len(data))
        if not len(data):
            return
        shift = self.disk.shift
        span = block_span(offset, len(data), shift)
        async with self.lock.range(*span, exclusive=True):
            patched = await patch_edges(self._read_view, shift, offset, data)
            write_overlay(self.overlay, shift, offset, data, patched, range(*span))

    async def flush(self) -> None:
        fds = [log.fd for log in (self.target, self.overlay) if log is not None]
        await self.disk.io.syncs.datasync_all(fds)

    def info(self) -> dict[str, object]:
        st = self.state
        return {
            "name": self.name,
            "kind": st.kind,
            "created": st.created,
            "seq": st.seq,
            "base": st.base,
            "bytes": self.space,
            "writable": self.writable,
        }

    def logs(self) -> list[BlockLog]:
        return [log for log in (self.target, self.overlay) if log is not None]

    def close(self) -> None:
        for log in self.logs():
            log.close()
