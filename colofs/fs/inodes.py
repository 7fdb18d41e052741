"""The inode table: what each inode number of the mount stands for.

The tree is fixed by the store: the root holds a directory per VM, a VM
directory holds ``DISK.raw`` per disk and ``DISK@NAME.raw`` per snapshot or
clone of that disk (``@`` cannot occur in names, so the split is unambiguous).
Besides these, a VM directory can hold *pending* files: made by ``create(2)``
(``qemu-img create``, ``touch``), empty, kept in memory only, and turned into
a disk by the first truncate to a non-zero size, which fixes the disk's size.

Inode numbers are derived from names (a 63-bit hash), so a disk keeps its
number across remounts and a pending file keeps its number when it becomes a
disk. A snapshot's number also covers its creation time: a snapshot deleted
and made again under the same name is a new file, so nothing the kernel
cached of the old one can show through. Times are set when a node is first
seen (a snapshot's to its creation time, so they are the same after a
remount) and change only when the kernel sets them: reporting "now" would
make the kernel drop its page cache.

A *VM-rooted* table (``root_vm``, a worker process's mount at
``MOUNTPOINT/VM``) has the VM directory itself as its root inode: the same
files below it, and the VM directory's attributes on the mount's root.
"""

from __future__ import annotations

import enum
import errno
import os
import stat
import time
from dataclasses import dataclass

import pyfuse3
import xxhash

from colofs.core.disk import Disk
from colofs.core.snapshot import Snapshot
from colofs.core.state import CLONE
from colofs.core.store import Store

ROOT_INO: int = pyfuse3.ROOT_INODE
DISK_SUFFIX = ".raw"
SNAP_SEP = "@"
DEFAULT_BLOCK_SIZE = 4096
_INO_MASK = (1 << 63) - 1
_FIRST_INO = 1 << 16  # numbers below are never derived from names

# How long the kernel may trust what we tell it. Disks and VMs cannot be
# removed and a disk's size never changes; a deleted snapshot's entry is
# invalidated explicitly.
ENTRY_TIMEOUT = 300.0
FILE_ATTR_TIMEOUT = 300.0
DIR_ATTR_TIMEOUT = 1.0


class Kind(enum.Enum):
    ROOT = "root"
    VM = "vm"
    DISK = "disk"
    PENDING = "pending"
    SNAPSHOT = "snapshot"  # read-only point-in-time image of a disk
    CLONE = "clone"  # writable image with its own overlay


FILE_KINDS = (Kind.DISK, Kind.PENDING, Kind.SNAPSHOT, Kind.CLONE)
SNAP_KINDS = (Kind.SNAPSHOT, Kind.CLONE)


@dataclass(eq=False, slots=True)
class Node:
    """One inode; ``vm``, ``disk`` and ``snap`` name it in the store."""

    ino: int
    kind: Kind
    vm: str
    disk: str
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    lookups: int = 0
    block_size: int = DEFAULT_BLOCK_SIZE  # of a pending file's future disk
    linked: bool = True  # False once a pending file is unlinked or a snapshot deleted
    snap: str = ""  # the snapshot or clone name, for those kinds
    created: float = 0.0  # a snapshot's creation time: tells a re-made snapshot from the old one
    size: int = 0  # a snapshot's size, kept for the kernel's questions after deletion
    open_handles: int = 0  # open file handles: a snapshot in use cannot be deleted
    deleting: bool = False  # a deletion is under way: no new opens

    @property
    def name(self) -> str:
        """The node's name in its directory."""
        if self.kind in SNAP_KINDS:
            return f"{self.disk}{SNAP_SEP}{self.snap}{DISK_SUFFIX}"
        if self.kind in (Kind.DISK, Kind.PENDING):
            return self.disk + DISK_SUFFIX
        return self.vm

    @property
    def label(self) -> str:
        """How logs and errors name the node."""
        if self.kind is Kind.ROOT:
            return "/"
        if self.kind is Kind.VM:
            return self.vm
        if self.kind in SNAP_KINDS:
            return f"{self.vm}/{self.disk}{SNAP_SEP}{self.snap}"
        return f"{self.vm}/{self.disk}"


def disk_name(file_name: str) -> str | None:
    """``DISK`` for a file name ``DISK.raw``, else None (also for ``DISK@NAME.raw``)."""
    if file_name.endswith(DISK_SUFFIX) and len(file_name) > len(DISK_SUFFIX):
        stem = file_name[: -len(DISK_SUFFIX)]
        return None if SNAP_SEP in stem else stem
    return None


def snapshot_name(file_name: str) -> tuple[str, str] | None:
    """``(DISK, NAME)`` for a file name ``DISK@NAME.raw``, else None."""
    if not file_name.endswith(DISK_SUFFIX):
        return None
    disk, sep, snap = file_name[: -len(DISK_SUFFIX)].partition(SNAP_SEP)
    if not sep or not disk or not snap:
        return None
    return disk, snap


class InodeTable:
    """Maps inode numbers to nodes and names to inode numbers, for one mount."""

    def __init__(self, store: Store, root_vm: str | None = None) -> None:
        self.store = store
        self.root_vm = root_vm
        self.uid = os.getuid()
        self.gid = os.getgid()
        now = time.time_ns()
        self._nodes: dict[int, Node] = {}
        self._vms: dict[str, Node] = {}
        self._disks: dict[tuple[str, str], Node] = {}
        self._snaps: dict[tuple[str, str, str], Node] = {}
        if root_vm is None:
            self.root = Node(ROOT_INO, Kind.ROOT, "", "", now, now, now)
        else:  # the mount's root is the VM's directory
            self.root = Node(ROOT_INO, Kind.VM, root_vm, "", now, now, now)
            self._vms[root_vm] = self.root
        self._nodes[ROOT_INO] = self.root

    # -- numbering -----------------------------------------------------------

    def _new_ino(self, key: str) -> int:
        ino = xxhash.xxh3_64_intdigest(key.encode()) & _INO_MASK
        if ino < _FIRST_INO:
            ino += _FIRST_INO
        while ino in self._nodes:  # a collision: probe deterministically
            ino = ino + 1 if ino < _INO_MASK else _FIRST_INO
        return ino

    def _add(self, kind: Kind, vm: str, disk: str) -> Node:
        now = time.time_ns()
        key = f"{kind.value if kind is Kind.VM else 'disk'}\0{vm}\0{disk}"
        node = Node(self._new_ino(key), kind, vm, disk, now, now, now)
        self._nodes[node.ino] = node
        return node

    def _add_snapshot(self, vm: str, disk: str, snap: Snapshot) -> Node:
        created = snap.state.created
        key = f"snapshot\0{vm}\0{disk}\0{snap.name}\0{created!r}"
        born = int(created * 1e9)
        kind = Kind.CLONE if snap.state.kind == CLONE else Kind.SNAPSHOT
        node = Node(self._new_ino(key), kind, vm, disk, born, born, born,
                    snap=snap.name, created=created, size=snap.size)
        self._nodes[node.ino] = node
        return node

    # -- finding nodes -------------------------------------------------------

    def get(self, ino: int) -> Node:
        node = self._nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def vm_node(self, vm: str) -> Node | None:
        """The node of VM ``vm``, if the store has it."""
        node = self._vms.get(vm)
        if node is None and vm in self.store.vms and self.root_vm is None:
            node = self._vms[vm] = self._add(Kind.VM, vm, "")
        return node

    def disk_node(self, vm: str, disk: str) -> Node | None:
        """The node of a disk or pending file, if it exists."""
        node = self._disks.get((vm, disk))
        if node is None:
            vm_obj = self.store.vms.get(vm)
            if vm_obj is not None and disk in vm_obj.disks:
                node = self._disks[(vm, disk)] = self._add(Kind.DISK, vm, disk)
        return node

    def snap_node(self, vm: str, disk: str, snap: str) -> Node | None:
        """The node of a snapshot or clone, if the store has it."""
        vm_obj = self.store.vms.get(vm)
        disk_obj = vm_obj.disks.get(disk) if vm_obj is not None else None
        core = disk_obj.snapshots.get(snap) if disk_obj is not None else None
        key = (vm, disk, snap)
        node = self._snaps.get(key)
        if core is None:
            return None
        if node is None or node.created != core.state.created:
            if node is not None:  # the old one is gone from the store
                self._unlink_snapshot(node)
            node = self._snaps[key] = self._add_snapshot(vm, disk, core)
        return node

    def child(self, parent: Node, name: str) -> Node | None:
        if parent.kind is Kind.ROOT:
            return self.vm_node(name)
        if parent.kind is Kind.VM:
            snap = snapshot_name(name)
            if snap is not None:
                return self.snap_node(parent.vm, *snap)
            disk = disk_name(name)
            return None if disk is None else self.disk_node(parent.vm, disk)
        return None

    def parent_of(self, node: Node) -> Node:
        if node.kind in FILE_KINDS:
            parent = self.vm_node(node.vm)
            if parent is not None:
                return parent
        return self.root

    def children(self, node: Node) -> list[Node]:
        """Entries of a directory, in inode order (a stable readdir position)."""
        if node.kind is Kind.ROOT:
            found = [self.vm_node(vm) for vm in self.store.vms]
        elif node.kind is Kind.VM:
            vm = self.store.vms.get(node.vm)
            names = set(vm.disks) if vm is not None else set()
            names.update(d for (v, d), n in self._disks.items() if v == node.vm and n.kind is Kind.PENDING)
            found = [self.disk_node(node.vm, d) for d in names]
            if vm is not None:
                found += [self.snap_node(node.vm, d, s) for d, disk in vm.disks.items() for s in disk.snapshots]
        else:
            return []
        return sorted((n for n in found if n is not None), key=lambda n: n.ino)

    def disk_nodes(self, vm: str) -> list[Node]:
        """The nodes of every disk (not pending file) of a VM."""
        vm_obj = self.store.vms.get(vm)
        if vm_obj is None:
            return []
        return [n for d in sorted(vm_obj.disks) if (n := self.disk_node(vm, d)) is not None]

    def pending_of(self, vm: str) -> list[Node]:
        return sorted(
            (n for (v, _), n in self._disks.items() if v == vm and n.kind is Kind.PENDING),
            key=lambda n: n.disk,
        )

    def snapshot_nodes(self, vm: str, disk: str | None = None) -> list[Node]:
        """The nodes of every snapshot and clone of a VM (or of one of its disks), oldest first."""
        vm_obj = self.store.vms.get(vm)
        if vm_obj is None:
            return []
        nodes = [
            n
            for d in sorted(vm_obj.disks)
            if disk is None or d == disk
            for s in vm_obj.disks[d].snapshots
            if (n := self.snap_node(vm, d, s)) is not None
        ]
        return sorted(nodes, key=lambda n: (n.disk, n.created, n.snap))

    def disk(self, node: Node) -> Disk:
        """The core disk behind a disk, snapshot or clone node."""
        return self.store.disk(node.vm, node.disk)

    def snapshot(self, node: Node) -> Snapshot:
        """The core snapshot or clone behind a node; ENOENT once it is deleted."""
        core = self.disk(node).snapshots.get(node.snap)
        if core is None or not node.linked or core.state.created != node.created:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return core

    def size_of(self, node: Node) -> int:
        """The file size of a node: a disk's (or its snapshot's) size, 0 for the rest."""
        if node.kind is Kind.DISK:
            return self.disk(node).size
        if node.kind in SNAP_KINDS:
            return node.size
        return 0

    def unlink_snapshot(self, node: Node) -> None:
        """The snapshot was deleted: forget its name; the inode lives on while the kernel holds it."""
        if self._snaps.get((node.vm, node.disk, node.snap)) is node:
            del self._snaps[(node.vm, node.disk, node.snap)]
        self._unlink_snapshot(node)

    def _unlink_snapshot(self, node: Node) -> None:
        node.linked = False
        self._maybe_drop(node)

    # -- pending files -------------------------------------------------------

    def add_pending(self, vm: str, disk: str) -> Node:
        node = self._add(Kind.PENDING, vm, disk)
        self._disks[(vm, disk)] = node
        return node

    def settle_pending(self, node: Node) -> None:
        """The pending file's disk now exists in the store: the node becomes that disk."""
        node.kind = Kind.DISK
        node.mtime_ns = node.ctime_ns = time.time_ns()

    def unlink_pending(self, node: Node) -> None:
        del self._disks[(node.vm, node.disk)]
        node.linked = False
        self._maybe_drop(node)

    # -- the kernel's references ---------------------------------------------

    def remember(self, node: Node, count: int = 1) -> None:
        """The kernel took ``count`` more references (lookup, create, mkdir, readdirplus)."""
        node.lookups += count

    def forget(self, ino: int, count: int) -> None:
        node = self._nodes.get(ino)
        if node is None or node is self.root:
            return
        node.lookups = max(0, node.lookups - count)
        self._maybe_drop(node)

    def _maybe_drop(self, node: Node) -> None:
        if not node.linked and node.lookups == 0:
            self._nodes.pop(node.ino, None)

    def known_to_kernel(self, node: Node) -> bool:
        """Whether the kernel may hold this inode (and so cached pages of it)."""
        return node.lookups > 0

    # -- attributes -------------------------------------------------------------

    def attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.ino
        attr.generation = 0
        attr.entry_timeout = ENTRY_TIMEOUT
        attr.st_uid = self.uid
        attr.st_gid = self.gid
        attr.st_atime_ns = node.atime_ns
        attr.st_mtime_ns = node.mtime_ns
        attr.st_ctime_ns = node.ctime_ns
        if node.kind in (Kind.ROOT, Kind.VM):
            attr.st_mode = stat.S_IFDIR | 0o755
            subdirs = len(self.store.vms) if node.kind is Kind.ROOT else 0
            attr.st_nlink = 2 + subdirs
            attr.st_size = 0
            attr.st_blksize = 4096
            attr.st_blocks = 0
            attr.attr_timeout = DIR_ATTR_TIMEOUT
            return attr
        # A snapshot is read-only for everyone: the mode says so to ls and to non-root users.
        attr.st_mode = stat.S_IFREG | (0o400 if node.kind is Kind.SNAPSHOT else 0o600)
        attr.st_nlink = 1 if node.linked else 0
        attr.attr_timeout = FILE_ATTR_TIMEOUT
        if node.kind in SNAP_KINDS:
            attr.st_size = node.size
            attr.st_blksize = max(self._block_size(node), 4096)
            attr.st_blocks = (node.size + 511) // 512
        elif node.kind is Kind.DISK:
            disk = self.disk(node)
            attr.st_size = disk.size
            attr.st_blksize = max(disk.block_size, 4096)
            attr.st_blocks = (disk.size + 511) // 512
        else:
            attr.st_size = 0
            attr.st_blksize = max(node.block_size, 4096)
            attr.st_blocks = 0
        return attr

    def _block_size(self, node: Node) -> int:
        vm = self.store.vms.get(node.vm)
        disk = vm.disks.get(node.disk) if vm is not None else None
        return disk.block_size if disk is not None else DEFAULT_BLOCK_SIZE
