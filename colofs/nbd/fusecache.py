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
"""

from __future__ import annotations

from colofs.fs.inodes import InodeTable, Node
from colofs.fs.pagecache import PageCache
from colofs.nbd.exports import Export


class FuseCacheLink:
    """The :class:`colofs.nbd.exports.CacheLink` of a mounted store."""

    def __init__(self, inodes: InodeTable, cache: PageCache) -> None:
        self.inodes = inodes
        self.cache = cache
        self._held: dict[int, Node] = {}  # id(export) -> the snapshot node it holds open

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
            self._held[id(export)] = node
        if export.writable:
            await self.cache.write_back([node])

    async def written(self, export: Export) -> None:
        node = self._node(export)
        if node is not None:
            await self.cache.drop([node])

    def closed(self, export: Export) -> None:
        node = self._held.pop(id(export), None)
        if node is not None and node.open_handles > 0:
            node.open_handles -= 1
