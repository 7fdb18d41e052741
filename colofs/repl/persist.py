"""What the replication engine keeps on disk next to the core's state (never inside it).

``VM_DIR/repl-primary.json`` (primary): which disks the replicator has seen,
whether a resync is still owed, and the sequence number the saved dirty
maps (``DISK_DIR/repl-dirty.bitmap``, :mod:`colofs.repl.dirtyfile`) are complete up to. They are
only trusted if that number is the VM's ``last_applied`` after a clean open:
a crash or writes made while nobody tracked them mean a full sync.

``VM_DIR/repl-secondary.json`` (secondary): that this VM owes itself a full
sync (it was created here, or adopted a newer epoch) until a checkpoint
after a completed full sync.

Every file is replaced atomically (temp file, fsync, rename, fsync of the
directory); an unreadable file counts as missing, which is always the safe
direction (more is resynchronised, never less).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field

import trio

from colofs.core.fileio import atomic_write
from colofs.core.vm import VM
from colofs.repl.blockset import BlockSet
from colofs.repl.dirty import DirtyMap
from colofs.repl.dirtyfile import bitmap_path, decode_dirty, encode_dirty

log = logging.getLogger(__name__)

PRIMARY_FILE = "repl-primary.json"
SECONDARY_FILE = "repl-secondary.json"
FORMAT = 1


def _read_json(path: str, what: str) -> dict | None:
    try:
        with open(path, "rb") as f:
            raw = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("%s: ignoring unreadable %s (%s)", what, path, e)
        return None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        log.warning("%s: ignoring %s: unknown format", what, path)
        return None
    return raw


def _write_json(path: str, obj: dict) -> None:
    """Blocking: run in a worker thread."""
    atomic_write(path, json.dumps({"format": FORMAT, **obj}, sort_keys=True).encode() + b"\n")


@dataclass
class PrimaryMeta:
    known_disks: list[str] = field(default_factory=list)
    covered_seq: int = -1
    epoch: int = 0
    resync_needed: bool = False


def load_primary_meta(vm: VM) -> PrimaryMeta | None:
    raw = _read_json(os.path.join(vm.path, PRIMARY_FILE), f"VM {vm.name}")
    if raw is None:
        return None
    try:
        meta = PrimaryMeta(
            known_disks=[str(n) for n in raw["known_disks"]],
            covered_seq=int(raw["covered_seq"]),
            epoch=int(raw["epoch"]),
            resync_needed=bool(raw["resync_needed"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        log.warning("VM %s: ignoring %s (%s)", vm.name, PRIMARY_FILE, e)
        return None
    return meta


def load_bitmaps(vm: VM, dirty: DirtyMap, names: list[str], covered_seq: int) -> bool:
    """Merge the saved dirty maps of ``names`` into ``dirty``; False if any is missing, stale or unreadable."""
    loaded = {}
    for name in names:
        disk = vm.disks.get(name)
        if disk is None:
            continue
        try:
            with open(bitmap_path(disk.path), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return False
        got = decode_dirty(data, disk.nblocks, disk.block_size)
        if got is None or got[0] != covered_seq:
            return False
        loaded[name] = got[1]
    for name, bits in loaded.items():
        dirty.load(name, bits)
    return True


def save_primary_state_blocking(
    vm_path: str, disk_paths: dict[str, tuple[str, int, int]], sets: dict[str, BlockSet], meta: PrimaryMeta,
) -> None:
    """Dirty maps first, then the metadata naming the seq they are complete to (blocking)."""
    for name, (path, nblocks, bs) in disk_paths.items():
        blocks = sets.get(name) or BlockSet(nblocks)
        atomic_write(bitmap_path(path), encode_dirty(blocks, bs, meta.covered_seq))
    _write_json(os.path.join(vm_path, PRIMARY_FILE), asdict(meta))


async def save_primary_state(vm: VM, dirty: DirtyMap, meta: PrimaryMeta) -> None:
    """Snapshot the map now (no await before), write it in a worker thread."""
    sets = dirty.union()
    disk_paths = {n: (d.path, d.nblocks, d.block_size) for n, d in vm.disks.items() if n in dirty.geometry}
    dirty.changed = False
    await trio.to_thread.run_sync(save_primary_state_blocking, vm.path, disk_paths, sets, meta)


def load_needs_full_sync(vm: VM) -> bool:
    raw = _read_json(os.path.join(vm.path, SECONDARY_FILE), f"VM {vm.name}")
    return bool(raw and raw.get("needs_full_sync"))


async def save_needs_full_sync(vm: VM, value: bool) -> None:
    await trio.to_thread.run_sync(
        _write_json, os.path.join(vm.path, SECONDARY_FILE), {"needs_full_sync": value}
    )
