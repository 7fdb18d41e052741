"""Damage found in a VM's store, and the quarantine that keeps it from being served.

A VM whose files fail their checks -- a block log with a flipped byte before
its acknowledged length, a log cut short, a missing or unreadable state file,
a block that fails its digest when read back -- is *quarantined*: nothing of
it is served or changed until it is repaired, while every other VM of the
store goes on. The damage is recorded in ``VM_DIR/damaged.json`` (the file,
offset and reason), so a restart keeps the VM quarantined with the original
cause instead of finding a second, derived one. Files are never truncated or
rewritten on the way: a repair moves the whole VM directory aside
(``STORE/.damaged-VM-TIME``, ignored by the store) and the VM is rebuilt from
its primary.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass

from colofs.core.errors import StateCorrupt, StateMissing
from colofs.core.fileio import atomic_write, fsync_dir

log = logging.getLogger(__name__)

MARKER_FILE = "damaged.json"
ASIDE_PREFIX = ".damaged-"
PHASE_DAMAGED = "damaged"


@dataclass(frozen=True)
class Damage:
    """Where a VM's store is damaged and why; ``offset`` is None when the whole file is at fault."""

    file: str
    offset: int | None
    reason: str
    found: float

    def describe(self) -> str:
        where = f" at offset {self.offset}" if self.offset is not None else ""
        return f"{self.file}{where}: {self.reason}"

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def damage_of(err: BaseException, default_file: str) -> Damage:
    """The :class:`Damage` an error from opening or reading a VM stands for."""
    path = getattr(err, "path", "") or default_file
    offset = getattr(err, "offset", None)
    reason = getattr(err, "reason", "") or str(err) or type(err).__name__
    if isinstance(err, StateMissing | StateCorrupt) and path == default_file:
        path = os.path.join(default_file, "state")
    return Damage(path, offset, reason, time.time())


def save_marker(vm_path: str, damage: Damage) -> None:
    """Record the damage in the VM's directory (blocking; a few small writes)."""
    atomic_write(os.path.join(vm_path, MARKER_FILE), json.dumps(damage.as_dict(), sort_keys=True).encode() + b"\n")


def load_marker(vm_path: str) -> Damage | None:
    """The recorded damage of a quarantined VM, or None. An unreadable record still quarantines."""
    path = os.path.join(vm_path, MARKER_FILE)
    try:
        with open(path, "rb") as f:
            raw = json.loads(f.read())
        return Damage(str(raw["file"]), raw["offset"], str(raw["reason"]), float(raw["found"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        return Damage(path, None, f"the damage record cannot be read ({e})", time.time())


def move_aside(store_path: str, vm_name: str) -> str:
    """Rename the VM's directory out of the store's way, keeping every file; returns the new path."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    base = os.path.join(store_path, f"{ASIDE_PREFIX}{vm_name}-{stamp}")
    dest = base
    n = 1
    while os.path.exists(dest):
        n += 1
        dest = f"{base}.{n}"
    os.rename(os.path.join(store_path, vm_name), dest)
    fsync_dir(store_path)
    return dest
