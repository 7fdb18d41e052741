"""How a secondary daemon takes part in the stream it receives: its checkpoint, new disks, events.

The replication engine knows nothing of the mount; the daemon hands it these
hooks where it builds both (a mount without them gets the core's checkpoint).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from colofs.core.vm import VM


@dataclass
class SecondaryHooks:
    """How the daemon takes part in the stream (awaited in stream order).

    ``take_checkpoint`` takes checkpoint ``seq`` of the VM once every write
    up to it is applied, before CHECKPOINT_DONE goes out. It defaults to the
    core's (:meth:`VM.checkpoint`); a mount sets its own
    (``VMControl.checkpoint_through_mount``), which writes the SVM's dirty
    pages back first and drops the kernel's page cache after (docs/design.md
    invariant 3). It runs shielded: once started, a checkpoint is finished.
    ``on_disk_added`` runs after a disk was created for the primary.
    """

    take_checkpoint: Callable[[VM, int], Awaitable[object]] = VM.checkpoint
    on_disk_added: Callable[[str, str], Awaitable[None]] | None = None
    event: Callable[..., None] = lambda kind, **fields: None  # the daemon's EventBus.emit
