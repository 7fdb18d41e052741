"""The durable state of a VM and of a store, replaced atomically.

A checkpoint covers every disk of a VM at once, so the mutable state (role,
epoch, generation, sequence numbers, phase) lives in one file per VM rather
than one per disk: replacing that file (temp file, fsync, rename, fsync of
the directory) is the single commit point of a checkpoint, a failover step or
a disk creation. The file carries its format version and an xxh3 checksum,
so a truncated or damaged file is refused rather than misread.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import xxhash

from colofs.core.errors import StateCorrupt, StateMissing, StoreVersionError
from colofs.core.fileio import atomic_write

STATE_FORMAT = 1
STORE_FORMAT = 1
STATE_MAGIC = "COLOFS-VM-STATE"
STORE_MAGIC = "COLOFS-STORE"

PRIMARY = "primary"
SECONDARY = "secondary"
ROLES = (PRIMARY, SECONDARY)

NORMAL = "normal"
FAILOVER = "failover"
PHASES = (NORMAL, FAILOVER)


SNAPSHOT = "snapshot"
CLONE = "clone"


@dataclass
class SnapshotState:
    """A snapshot or clone of a disk.

    A snapshot owns a copy-before-write target (``snap-NAME.log``). A clone
    has a writable overlay (``clone-NAME.log``) over either a target of its
    own (cloned from the disk) or the target of snapshot ``base``.
    Lengths are those of the logs at the last clean close.
    """

    kind: str
    created: float
    seq: int
    base: str | None = None
    own_target: bool = True
    target_len: int = 0
    overlay_len: int = 0


@dataclass
class DiskState:
    """What a VM's state knows of one disk; lengths are those of the logs at the last clean close."""

    size: int
    block_size: int
    hidden_len: int = 0
    active_len: int = 0
    snapshots: dict[str, SnapshotState] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> DiskState:
        snaps = {name: SnapshotState(**v) for name, v in raw.pop("snapshots", {}).items()}
        ds = cls(**raw, snapshots=snaps)
        for name, sn in snaps.items():
            if sn.kind not in (SNAPSHOT, CLONE):
                raise ValueError(f"snapshot {name} has kind {sn.kind!r}")
            if sn.base is not None and (sn.base not in snaps or snaps[sn.base].kind != SNAPSHOT):
                raise ValueError(f"clone {name} is built on {sn.base!r}, which is not a snapshot")
        return ds


@dataclass
class VMState:
    """Everything about a VM that must survive a crash, in one atomically replaced file.

    ``gen`` tags the records of the hidden and active logs: bumping it empties
    both layers of every disk at once. ``last_applied`` is the last sequence
    number applied (on a primary: the last one issued); after a crash a
    secondary falls back to ``last_checkpoint``, because recovery rolls base
    back to it, and a primary jumps to ``seq_reserved``, the high-water mark
    it persists before handing out sequence numbers beyond it.
    ``log_headers``: every block log of the VM got its file header when it
    was created, so one that is empty or missing lost its content (damage);
    False only for a VM not yet opened by a colofs that does this.
    """

    vm: str
    role: str
    epoch: int = 1
    gen: int = 1
    last_applied: int = 0
    last_checkpoint: int = 0
    seq_reserved: int = 0
    phase: str = NORMAL
    clean: bool = True
    log_headers: bool = False
    disks: dict[str, DiskState] = field(default_factory=dict)

    def encode(self) -> bytes:
        body = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        digest = xxhash.xxh3_64_hexdigest(body.encode())
        return f"{STATE_MAGIC} {STATE_FORMAT}\n{body}\nxxh3 {digest}\n".encode()

    @classmethod
    def decode(cls, data: bytes, where: str) -> VMState:
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise StateCorrupt(f"{where}: state file is not text") from None
        lines = text.split("\n")
        if len(lines) != 4 or lines[3] != "":
            raise StateCorrupt(f"{where}: state file is truncated or has extra lines")
        magic, _, version = lines[0].partition(" ")
        if magic != STATE_MAGIC:
            raise StateCorrupt(f"{where}: not a colofs state file")
        if version != str(STATE_FORMAT):
            raise StoreVersionError(
                f"{where}: state format {version!r}, this colofs reads format {STATE_FORMAT}"
            )
        body = lines[1]
        if lines[2] != f"xxh3 {xxhash.xxh3_64_hexdigest(body.encode())}":
            raise StateCorrupt(f"{where}: state file fails its checksum")
        try:
            raw = json.loads(body)
            disks = {name: DiskState.from_json(d) for name, d in raw.pop("disks").items()}
            st = cls(**raw, disks=disks)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise StateCorrupt(f"{where}: state file has unexpected content ({e})") from None
        if st.role not in ROLES or st.phase not in PHASES:
            raise StateCorrupt(f"{where}: state has role {st.role!r}, phase {st.phase!r}")
        return st


def load_vm_state(path: str, where: str) -> VMState:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise StateMissing(f"{where}: state file {path} is missing") from None
    return VMState.decode(data, where)


def save_vm_state(path: str, state: VMState) -> None:
    """Blocking: run it in a worker thread from the event loop."""
    atomic_write(path, state.encode())


def write_store_marker(path: str, node_id: str) -> None:
    body = json.dumps({"node_id": node_id}, sort_keys=True)
    atomic_write(path, f"{STORE_MAGIC} {STORE_FORMAT}\n{body}\n".encode())


def read_store_marker(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        raise StateMissing(f"{os.path.dirname(path)}: not a colofs store (no {os.path.basename(path)})") from None
    head, _, body = text.partition("\n")
    magic, _, version = head.partition(" ")
    if magic != STORE_MAGIC:
        raise StateCorrupt(f"{path}: not a colofs store marker")
    if version != str(STORE_FORMAT):
        raise StoreVersionError(
            f"{os.path.dirname(path)}: store format {version!r}, this colofs reads format {STORE_FORMAT}"
        )
    try:
        info = json.loads(body)
        if not isinstance(info, dict) or not isinstance(info.get("node_id"), str):
            raise ValueError("no node_id")
    except ValueError as e:
        raise StateCorrupt(f"{path}: damaged store marker ({e})") from None
    return info
