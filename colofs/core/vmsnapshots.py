"""Taking, cloning and deleting a VM's snapshots: the VM-level side of ``colofs.core.snapshot``.

A snapshot of several disks is taken at one instant: the VM's apply and
failover locks and every chosen disk's whole range are held while the
targets are made and the state names them. On a secondary the image is the
last checkpoint's, so a snapshot starts with a copy of hidden's undo blocks.
A crash between making the files and saving the state leaves files no
snapshot owns, which opening removes (``colofs.core.recovery``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import replace

from colofs.core.blocklog import BlockLog
from colofs.core.disk import Disk, whole_disks
from colofs.core.errors import AlreadyExists, BadArgument, InUse, NotFound
from colofs.core.fileio import fsync_dir
from colofs.core.ioctx import IOContext
from colofs.core.logformat import ZERO_AT
from colofs.core.logsync import make_durable
from colofs.core.names import check_name
from colofs.core.rangelock import holding
from colofs.core.snapshot import Snapshot, overlay_path, target_path
from colofs.core.state import CLONE, SECONDARY, SNAPSHOT, SnapshotState, VMState
from colofs.core.vmbase import VMBase

log = logging.getLogger(__name__)


class VMSnapshots(VMBase):
    """Snapshot and clone management of a VM."""

    async def snapshot(self, name: str, disks: Sequence[str] | None = None) -> list[Snapshot]:
        """Snapshot ``disks`` (default: all of the VM's) at one instant.

        On a primary the image is the disk now; on a secondary it is the
        last checkpoint's image (base with hidden rolled back), which equals
        the primary's disk at that checkpoint. Costs a copy of the blocks
        buffered in hidden, never of the disk.
        """
        names = sorted(disks) if disks is not None else sorted(self.disks)
        if not names:
            raise BadArgument(f"VM {self.name}: no disk to snapshot")
        return await self._new_snapshots(name, names, SNAPSHOT)

    async def clone(self, disk: str, name: str, from_snapshot: str | None = None) -> Snapshot:
        """A writable image of ``disk`` now (or of an existing snapshot) that writes to its own overlay."""
        self.check_usable()
        if from_snapshot is None:
            return (await self._new_snapshots(name, [disk], CLONE))[0]
        check_name("clone", name)
        d = self.disk(disk)
        async with self._failover_lock, self._apply_lock:
            base = self._snapshot_of(d, from_snapshot)
            if base.state.kind != SNAPSHOT:
                raise BadArgument(
                    f"{base.label} is a clone; clone a snapshot (take one of the clone's disk first)"
                )
            if name in d.snapshots:
                raise AlreadyExists(f"{d.label}: a snapshot or clone named {name!r} already exists")
            overlay = BlockLog.create(overlay_path(d.path, name), d.block_size, 0, mutable=True, label=f"{d.label}@{name}")
            try:
                await self.io.syncs.datasync_all([overlay.fd])
                fsync_dir(d.path)
                sn = SnapshotState(kind=CLONE, created=time.time(), seq=base.state.seq, base=base.name, own_target=False)
                await self._save_snapshot_states({d.name: {**self.state.disks[d.name].snapshots, name: sn}})
            except BaseException:
                overlay.close()
                os.unlink(overlay.path)
                raise
            snap = Snapshot(d, name, sn, None, overlay, base)
            d.snapshots[name] = snap
            log.info("%s: clone %s of snapshot %s created", d.label, name, base.name)
            return snap

    def _snapshot_of(self, d: Disk, name: str) -> Snapshot:
        try:
            return d.snapshots[name]
        except KeyError:
            raise NotFound(f"{d.label} has no snapshot or clone {name!r}") from None

    async def _new_snapshots(self, name: str, disk_names: Sequence[str], kind: str) -> list[Snapshot]:
        self.check_usable()
        check_name(kind, name)
        targets = [self.disk(n) for n in disk_names]
        for d in targets:
            if name in d.snapshots:
                raise AlreadyExists(f"{d.label}: a snapshot or clone named {name!r} already exists")
        async with self._failover_lock, self._apply_lock:
            for d in targets:  # again: another creation may have taken the name while we waited
                if name in d.snapshots:
                    raise AlreadyExists(f"{d.label}: a snapshot or clone named {name!r} already exists")
            st = self.state
            secondary = st.role == SECONDARY
            seq = st.last_checkpoint if secondary else st.last_applied
            made: list[tuple[Disk, BlockLog, BlockLog | None]] = []
            async with whole_disks(targets):  # in name order, as every caller gives them
                try:
                    for d in targets:
                        label = f"{d.label}@{name}"
                        target = BlockLog.create(target_path(d.path, name), d.block_size, 0, mutable=False, label=label)
                        overlay = None
                        made.append((d, target, None))
                        if kind == CLONE:
                            overlay = BlockLog.create(overlay_path(d.path, name), d.block_size, 0, mutable=True, label=label)
                            made[-1] = (d, target, overlay)
                        if secondary:
                            await _copy_blocks(self.io, d.hidden, target)
                    await make_durable(self.io, [log for _, t, o in made for log in (t, o) if log is not None])
                    for d in targets:
                        fsync_dir(d.path)
                    now = time.time()
                    states = {
                        d.name: {**self.state.disks[d.name].snapshots, name: SnapshotState(kind=kind, created=now, seq=seq)}
                        for d in targets
                    }
                    await self._save_snapshot_states(states)
                except BaseException:
                    for _, t, o in made:
                        for lg in (t, o):
                            if lg is not None:
                                lg.close()
                                os.unlink(lg.path)
                    raise
                else:
                    out = []
                    for d, t, o in made:
                        snap = Snapshot(d, name, states[d.name][name], t, o, None)
                        d.snapshots[name] = snap
                        d.cbw.attach(t)
                        out.append(snap)
                    log.info("VM %s: %s %s of %s at seq %d", self.name, kind, name, ", ".join(disk_names), seq)
                    return out

    async def _save_snapshot_states(self, per_disk: dict[str, dict[str, SnapshotState]]) -> None:
        def change(s: VMState) -> VMState:
            disks = dict(s.disks)
            for n, snaps in per_disk.items():
                disks[n] = replace(disks[n], snapshots=snaps)
            return replace(s, disks=disks)

        await self._update(change)

    async def delete_snapshot(self, disk: str, name: str) -> int:
        """Delete a snapshot or clone; returns the bytes freed. Refused while a clone is built on it."""
        self.check_usable()
        d = self.disk(disk)
        async with self._failover_lock, self._apply_lock:
            snap = self._snapshot_of(d, name)
            users = sorted(n for n, s in d.snapshots.items() if s.base is snap)
            if users:
                raise InUse(f"{snap.label}: clone {', '.join(users)} is built on it; delete the clone first")
            async with holding([(d.lock, 0, d.nblocks), (snap.lock, 0, d.nblocks)]):
                freed = snap.space
                snaps = {n: s for n, s in self.state.disks[d.name].snapshots.items() if n != name}
                await self._save_snapshot_states({d.name: snaps})
                if snap.target is not None:
                    d.cbw.detach(snap.target)
                del d.snapshots[name]
                snap.close()
                for lg in snap.logs():
                    os.unlink(lg.path)
                fsync_dir(d.path)
            log.info("%s: deleted %s (%d bytes freed)", snap.label, snap.state.kind, freed)
            return freed


async def _copy_blocks(io: IOContext, src: BlockLog, dst: BlockLog) -> None:
    """Append every block of ``src`` to ``dst`` (a snapshot taking hidden's undo copies)."""
    bs = src.block_size
    blocks = sorted(src.map)
    step = max(1, (8 << 20) // bs)
    for i in range(0, len(blocks), step):
        chunk = blocks[i : i + step]
        zeros = [b for b in chunk if src.map[b] == ZERO_AT]  # ZERO records stay records
        if zeros:
            chunk = [b for b in chunk if src.map[b] != ZERO_AT]
        buf = bytearray(len(chunk) * bs)
        mv = memoryview(buf)
        for j, b in enumerate(chunk):
            await io.read_into(src.fd, mv[j * bs : (j + 1) * bs], src.map[b])
            src.verify(b, mv[j * bs : (j + 1) * bs])
        dst.append(chunk, [mv] if chunk else [], zeros)

