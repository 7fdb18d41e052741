"""Opening a VM's store: its disks and snapshots from the state, and crash recovery.

After a clean close every layer is kept as it was. After a crash a
secondary's base is rolled back to the last checkpoint (``B[b] := H[b]`` for
every block in hidden, through copy-before-write so snapshots keep their
images) and its layers start a new generation; a primary resumes numbering
past everything it reserved; a failover that was under way is finished
(docs/design.md, invariants 3-5). Disk creations a crash interrupted are
finished or undone first.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, replace
from typing import Self

import trio

from colofs.core.blocklog import BlockLog
from colofs.core.commit import commit_disk
from colofs.core.disk import Disk
from colofs.core.errors import StoreError
from colofs.core.fileio import Buffer, fsync_dir
from colofs.core.ioctx import IOContext
from colofs.core.logformat import ZERO_AT
from colofs.core.snapshot import Snapshot, overlay_path, target_path
from colofs.core.state import CLONE, FAILOVER, NORMAL, SECONDARY, DiskState, VMState, load_vm_state
from colofs.core.vmbase import STATE_FILE, VMBase

log = logging.getLogger(__name__)

BASE_FILE = "base.raw"
HIDDEN_FILE = "hidden.log"
ACTIVE_FILE = "active.log"
NEW_PREFIX = ".new-"
"""A disk directory under construction (see ``colofs.core.vm.VM.add_disk``)."""


@dataclass(frozen=True)
class Recovery:
    """What opening a VM had to do; ``resume_seq`` is where the primary must resume from."""

    action: str  # "clean", "rolled-back", "failover-completed", "none"
    blocks: int
    resume_seq: int


def disk_paths(vm_path: str, disk: str) -> tuple[str, str, str, str]:
    """A disk's directory, base image, hidden log and active log."""
    d = os.path.join(vm_path, disk)
    return d, os.path.join(d, BASE_FILE), os.path.join(d, HIDDEN_FILE), os.path.join(d, ACTIVE_FILE)


class VMOpening(VMBase):
    """Opening a VM and its disks, recovering from a crash on the way."""

    def __init__(self, path: str, state: VMState, io: IOContext) -> None:
        super().__init__(path, state, io)
        self.recovery = Recovery("none", 0, state.last_checkpoint)

    @classmethod
    async def open(cls, path: str, io: IOContext) -> Self:
        """Open a VM's store, recovering from a crash if the last close was not clean."""
        name = os.path.basename(path)
        state = load_vm_state(os.path.join(path, STATE_FILE), f"VM {name}")
        if state.vm != name:
            raise StoreError(f"VM {name}: state file names VM {state.vm!r}")
        vm = cls(path, state, io)
        await trio.to_thread.run_sync(vm._settle_new_disks)
        try:
            if state.clean and state.phase == NORMAL:
                await vm._open_clean()
            else:
                await vm._recover()
            if not vm.state.log_headers:
                await vm._give_logs_headers()
        except BaseException:
            vm._close_files()
            raise
        return vm

    def _settle_new_disks(self) -> None:
        """Finish or undo disk creations a crash interrupted (see :meth:`add_disk`)."""
        for entry in os.listdir(self.path):
            if not entry.startswith(NEW_PREFIX):
                continue
            disk = entry[len(NEW_PREFIX) :]
            tmp = os.path.join(self.path, entry)
            if disk in self.state.disks and not os.path.exists(os.path.join(self.path, disk)):
                os.rename(tmp, os.path.join(self.path, disk))
                log.info("VM %s: finished creating disk %s after a crash", self.name, disk)
            else:
                shutil.rmtree(tmp)
                log.info("VM %s: removed the unfinished creation of disk %s", self.name, disk)
        fsync_dir(self.path)

    async def _give_logs_headers(self) -> None:
        """Once, for a VM made before logs got their header at creation: give the empty ones theirs.

        Synced before the state says so, as from then on an empty log is damage.
        """
        logs = [lg for d in self.disks.values() for lg in (d.hidden, d.active)]
        logs += [lg for d in self.disks.values() for sn in d.snapshots.values() for lg in (sn.target, sn.overlay) if lg]
        written = [lg.fd for lg in logs if lg.ensure_header()]
        await self.io.syncs.datasync_all(written)
        await self._update(lambda s: replace(s, log_headers=True))

    def _open_disk(self, disk: str, ds: DiskState, *, clean: bool) -> Disk:
        d, base, hidden_path, active_path = disk_paths(self.path, disk)
        label = f"{self.name}/{disk}"
        try:
            base_fd = os.open(base, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StoreError(f"{label}: base image {base} is missing") from None
        try:
            st = os.fstat(base_fd)
            if st.st_size != ds.size:
                raise StoreError(f"{label}: base image is {st.st_size} bytes, the state says {ds.size}")
            hidden = BlockLog.open(
                hidden_path, ds.block_size, self.state.gen, mutable=False, label=f"{label} hidden",
                expected_len=ds.hidden_len if clean else None, verify_data=not clean, headed=self.state.log_headers,
            )
            try:
                active = BlockLog.open(
                    active_path, ds.block_size, self.state.gen, mutable=True, label=f"{label} active",
                    expected_len=ds.active_len if clean else None, verify_data=False, headed=self.state.log_headers,
                )
            except BaseException:
                hidden.close()
                raise
        except BaseException:
            os.close(base_fd)
            raise
        disk_obj = Disk(self, disk, d, ds.size, ds.block_size, base_fd, hidden, active, self._number_write)
        if self.state.role == SECONDARY and self.state.phase == NORMAL:
            disk_obj.cbw.attach(hidden)
        try:
            self._open_snapshots(disk_obj, ds, clean=clean)
        except BaseException:
            disk_obj.close()
            raise
        return disk_obj

    def _open_snapshots(self, disk: Disk, ds: DiskState, *, clean: bool) -> None:
        known = set()
        # Snapshots before the clones built on them.
        for name, sn in sorted(ds.snapshots.items(), key=lambda kv: kv[1].base is not None):
            label = f"{disk.label}@{name}"
            target = overlay = None
            if sn.own_target:
                known.add(os.path.basename(target_path(disk.path, name)))
                target = BlockLog.open(
                    target_path(disk.path, name), disk.block_size, 0, mutable=False, label=label,
                    expected_len=sn.target_len if clean else None, verify_data=not clean,
                    headed=self.state.log_headers,
                )
            try:
                if sn.kind == CLONE:
                    known.add(os.path.basename(overlay_path(disk.path, name)))
                    overlay = BlockLog.open(
                        overlay_path(disk.path, name), disk.block_size, 0, mutable=True, label=label,
                        expected_len=sn.overlay_len if clean else None, verify_data=False,
                        headed=self.state.log_headers,
                    )
            except BaseException:
                if target is not None:
                    target.close()
                raise
            base = disk.snapshots[sn.base] if sn.base is not None else None
            disk.snapshots[name] = Snapshot(disk, name, sn, target, overlay, base)
            if target is not None:
                disk.cbw.attach(target)
        for entry in os.listdir(disk.path):
            if entry.endswith(".log") and entry.startswith(("snap-", "clone-")) and entry not in known:
                # A creation or deletion that a crash interrupted before (or after) the state said so.
                os.unlink(os.path.join(disk.path, entry))
                log.info("%s: removed %s, which no snapshot owns", disk.label, entry)

    async def _open_clean(self) -> None:
        for disk, ds in sorted(self.state.disks.items()):
            self.disks[disk] = self._open_disk(disk, ds, clean=True)
        await self._update(lambda s: replace(s, clean=False))
        self.recovery = Recovery("clean", 0, self.state.last_applied)

    async def _recover(self) -> None:
        """Crash recovery: roll back to the last checkpoint, or finish a started failover."""
        st = self.state
        for disk, ds in sorted(st.disks.items()):
            self.disks[disk] = self._open_disk(disk, ds, clean=False)
        if st.phase == FAILOVER:
            moved = 0
            for disk in self.disks.values():
                moved += await commit_disk(disk)
            await self._finish_failover()  # syncs base first
            self.recovery = Recovery("failover-completed", moved, self.state.last_applied)
            log.warning("VM %s: completed an interrupted failover (%d blocks committed)", self.name, moved)
            return
        restored = 0
        if st.role == SECONDARY:
            for disk in self.disks.values():
                restored += await self._roll_back(disk)
            await self.io.syncs.datasync_all([d.base_fd for d in self.disks.values()])
        if st.role == SECONDARY:
            resume = st.last_checkpoint
        else:
            # The exact count died with the process: continue past everything reserved.
            resume = max(st.last_applied, st.seq_reserved)
        new = await self._update(lambda s: replace(s, gen=s.gen + 1, last_applied=resume, clean=False))
        for disk in self.disks.values():
            disk.hidden.reset(new.gen)
            disk.active.reset(new.gen)
        self.recovery = Recovery("rolled-back", restored, new.last_applied)
        log.warning(
            "VM %s: recovered after a crash: %d blocks of base rolled back to checkpoint seq %d",
            self.name, restored, new.last_checkpoint,
        )

    async def _roll_back(self, disk: Disk) -> int:
        """``B[b] := H[b]`` for every block in hidden; through copy-before-write for snapshots.

        Hidden stays attached: it already holds every block written here, so
        it takes no copy, while other targets keep their images.
        """
        hmap = disk.hidden.map
        blocks = sorted(hmap)
        bs = disk.block_size
        step = max(1, (8 << 20) // bs)
        for i in range(0, len(blocks), step):
            chunk = blocks[i : i + step]
            buf = bytearray(len(chunk) * bs)
            mv = memoryview(buf)
            extents: list[tuple[int, Buffer]] = []
            for j, b in enumerate(chunk):
                view = mv[j * bs : (j + 1) * bs]
                if hmap[b] != ZERO_AT:  # a ZERO record: the block was zeros (buf is)
                    await disk.io.read_into(disk.hidden.fd, view, hmap[b])
                    disk.hidden.verify(b, view)
                start = b * bs
                extents.append((start, view[: min(bs, disk.size - start)]))
            await disk.cbw.write(extents)
        return len(blocks)

