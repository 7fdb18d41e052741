"""Block replication between a primary and a secondary store, over the colofs wire protocol.

Nothing here knows about FUSE: the daemon runs :func:`serve_secondary` on a
secondary host and a :class:`PrimaryReplicator` on a primary host; a primary
VM's checkpoint is ``replicator.link(vm).replicate_checkpoint()``.

Modules: :mod:`~colofs.repl.sender` (the primary's per-VM link),
:mod:`~colofs.repl.receiver` (the secondary's listener and sessions),
:mod:`~colofs.repl.session` (ATTACH rules), :mod:`~colofs.repl.resync`
(digest-based catch-up), :mod:`~colofs.repl.dirty` and
:mod:`~colofs.repl.retained` (what the primary keeps for catching up),
:mod:`~colofs.repl.persist` (their files), :mod:`~colofs.repl.config`.
"""

from colofs.repl.config import ASYNC, MODES, SYNC, ReplConfig, load_mode, save_mode
from colofs.repl.errors import (
    CheckpointError,
    CheckpointTimeout,
    PeerRefused,
    ReplCode,
    ReplConfigError,
    ReplError,
)
from colofs.repl.primary import PrimaryReplicator
from colofs.repl.receiver import SecondaryHooks, SecondaryServer, serve_secondary
from colofs.repl.sender import CheckpointResult

__all__ = [
    "ASYNC",
    "MODES",
    "SYNC",
    "CheckpointError",
    "CheckpointResult",
    "CheckpointTimeout",
    "PeerRefused",
    "PrimaryReplicator",
    "ReplCode",
    "ReplConfig",
    "ReplConfigError",
    "ReplError",
    "SecondaryHooks",
    "SecondaryServer",
    "load_mode",
    "save_mode",
    "serve_secondary",
]
