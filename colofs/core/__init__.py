"""The replicated-disk core: layers, copy-before-write, checkpoint, failover, recovery.

Nothing here knows about FUSE or the network; the mount and the wire are thin
adapters over :class:`~colofs.core.store.Store`, :class:`~colofs.core.vm.VM`
and :class:`~colofs.core.disk.Disk`.
"""

from colofs.core.disk import Disk
from colofs.core.errors import ColofsError
from colofs.core.store import Store
from colofs.core.vm import VM, PrimaryWrite

__all__ = ["VM", "ColofsError", "Disk", "PrimaryWrite", "Store"]
