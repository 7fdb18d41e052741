"""Coherence of NBD I/O with the FUSE mount's page cache of the same image.

The rule (also in the README): what one side has *completed* the other sees.

* When a client starts using an export, the kernel's dirty pages of that
  file are written back first, so the client sees every write made through
  the FUSE file before (a buffered write included, no ``fsync`` needed).
* Before a batch of NBD writes is acknowledged, the kernel's cached pages of
  the file are dropped, so a FUSE reader after the acknowledgement reads the
  new data instead of stale pages.
* Writing the same disk through both at the same time is not supported:
  pages the kernel buffers meanwhile reach the core only at their writeback,
  possibly after a later NBD write of the same range.

A snapshot or clone in use by a client counts as an open handle of its file,
so deleting it is refused (``EBUSY``) as for a file a VM has open.

Dropping the cache costs a round trip through the kernel per batch of
writes, so it is skipped when it cannot matter: the kernel only gains pages
of a file through an open handle (reads, writes, mappings, which hold their
handle until unmapped), so once a drop ran while no FUSE handle was open,
nothing is cached until the mount opens a file again (``opens``, the
mount's count of opens, moves).
"""

from __future__ import annotations

from collections.abc import Callable

from colofs.fs.inodes import InodeTable, Node
from colofs.fs.pagecache import PageCache
from colofs.nbd.exports import Export


class FuseCacheLink:
    """The :class:`colofs.nbd.exports.CacheLink` of a mounted store."""

    def __init__(self, inodes: InodeTable, cache: PageCache, opens: Callable[[], int]) -> None:
        self.inodes = inodes
        self.cache = cache
        self._opens = opens
        self._held: dict[int, Node] = {}  # id(export) -> the snapshot node it holds open
        self._holds: dict[int, int] = {}  # ino -> how many of its open handles are NBD clients' holds
        self._clean: dict[int, int] = {}  # ino -> the opens count at its last drop with no FUSE handle open

    def _fuse_handles(self, node: Node) -> int:
        return node.open_handles - self._holds.get(node.ino, 0)

    async def _drop(self, node: Node) -> None:
        opens = self._opens()
        idle = self._fuse_handles(node) == 0
        if idle and self._clean.get(node.ino) == opens:
            return  # no file was opened since the last full drop: the kernel cannot hold pages of it
        await self.cache.drop([node])
        if idle:
            self._clean[node.ino] = opens
        else:
            self._clean.pop(node.ino, None)

    def _node(self, export: Export) -> Node | None:
        if export.kind == "ingest":
            return None  # primary writes never change the secondary VM's view: nothing cached goes stale
        if export.snap:
            return self.inodes.snap_node(export.vm, export.disk, export.snap)
        return self.inodes.disk_node(export.vm, export.disk)

    async def opened(self, export: Export) -> None:
        node = self._node(export)
        if node is None:
            return
        if export.snap and id(export) not in self._held:
            node.open_handles += 1
            self._holds[node.ino] = self._holds.get(node.ino, 0) + 1
            self._held[id(export)] = node
        if export.writable:
            await self._drop(node)  # dirty pages are written back first (PageCache.drop)

    async def written(self, export: Export) -> None:
        node = self._node(export)
        if node is not None:
            await self._drop(node)

    def closed(self, export: Export) -> None:
        node = self._held.pop(id(export), None)
        if node is None:
            return
        node.open_handles = max(0, node.open_handles - 1)
        left = self._holds.get(node.ino, 0) - 1
        if left > 0:
            self._holds[node.ino] = left
        else:
            self._holds.pop(node.ino, None)
