"""A VM: the consistency group of its disks, and the operations on all of them at once.

Applying primary writes, checkpoints, failover and crash recovery are VM
operations because sequence numbers are per VM and a checkpoint covers every
disk of the VM atomically (docs/design.md, invariants 3-5).

Durability order of one applied batch (group commit):
  1. copy-before-write of every first-touched block into hidden, all disks;
  2. one concurrent ``fdatasync`` of the hidden logs that grew;
  3. base overwritten in place; the batch counts as applied.
A crash therefore never leaves a changed base block without its old content
durable in hidden, and recovery can always roll back to the last checkpoint.
Base itself is synced at each checkpoint, before the state file names it:
between checkpoints its durability buys nothing, since recovery rolls every
change made after the last checkpoint back anyway (the primary resends
them). That halves the synced bytes of the ingest path.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import trio

from colofs.core.blocklog import BlockLog, make_durable
from colofs.core.damage import PHASE_DAMAGED, Damage, damage_of, save_marker
from colofs.core.disk import Disk, extents_blocks
from colofs.core.disksize import check_disk_size
from colofs.core.errors import (
    AlreadyExists,
    BadArgument,
    BadRange,
    DiskIOError,
    InUse,
    NotFound,
    RoleError,
    SequenceError,
    StoreError,
    VMDamaged,
)
from colofs.core.fileio import (
    Buffer,
    datasync_all,
    fsync_dir,
    read_into,
    write_all,
)
from colofs.core.forward import ForwardedWrite, WriteSink
from colofs.core.imagesource import ImageSource, open_image
from colofs.core.logformat import empty_log
from colofs.core.names import check_name
from colofs.core.reaper import FdReaper
from colofs.core.snapshot import Snapshot, overlay_path, target_path
from colofs.core.state import (
    CLONE,
    FAILOVER,
    NORMAL,
    PRIMARY,
    ROLES,
    SECONDARY,
    SNAPSHOT,
    DiskState,
    SnapshotState,
    VMState,
    load_vm_state,
    save_vm_state,
)

log = logging.getLogger(__name__)

STATE_FILE = "state"
BASE_FILE = "base.raw"
HIDDEN_FILE = "hidden.log"
ACTIVE_FILE = "active.log"
NEW_PREFIX = ".new-"
MIN_BLOCK = 512
SEQ_RESERVE = 1 << 20  # sequence numbers a primary may hand out per state save
MAX_BLOCK = 1 << 20


@dataclass(frozen=True, slots=True)
class PrimaryWrite:
    """One forwarded primary write: ``data`` at ``offset`` of disk ``disk``."""

    disk: str
    offset: int
    data: Buffer


@dataclass(frozen=True)
class Recovery:
    """What opening a VM had to do; ``resume_seq`` is where the primary must resume from."""

    action: str  # "clean", "rolled-back", "failover-completed", "none"
    blocks: int
    resume_seq: int


class VM:
    """The disks of one VM and the state that covers them all."""

    def __init__(self, path: str, state: VMState) -> None:
        self.path = path
        self.name = state.vm
        self.state = state
        self.disks: dict[str, Disk] = {}
        self._apply_lock = trio.Lock()
        self._failover_lock = trio.Lock()
        self._reserve_lock = trio.Lock()
        self._state_lock = trio.Lock()
        self.forward: WriteSink | None = None
        self.recovery = Recovery("none", 0, state.last_checkpoint)
        self.closed = False
        self.reaper = FdReaper(self.name)
        self.damage: Damage | None = None
        """Set when the VM is quarantined (see ``colofs.core.damage``): nothing of it is served."""

    # -- creation and opening ----------------------------------------------------

    @classmethod
    async def create(cls, path: str, name: str, role: str) -> VM:
        check_name("VM", name)
        if role not in ROLES:
            raise BadArgument(f"VM {name}: role must be one of {', '.join(ROLES)}, not {role!r}")
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            raise AlreadyExists(f"VM {name} already exists") from None
        state = VMState(vm=name, role=role, clean=False, log_headers=True)
        await trio.to_thread.run_sync(save_vm_state, os.path.join(path, STATE_FILE), state)
        fsync_dir(os.path.dirname(path))
        vm = cls(path, state)
        vm.recovery = Recovery("clean", 0, 0)
        return vm

    @classmethod
    async def open(cls, path: str) -> VM:
        """Open a VM's store, recovering from a crash if the last close was not clean."""
        name = os.path.basename(path)
        state = load_vm_state(os.path.join(path, STATE_FILE), f"VM {name}")
        if state.vm != name:
            raise StoreError(f"VM {name}: state file names VM {state.vm!r}")
        vm = cls(path, state)
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
        await datasync_all(written)
        await self._update(lambda s: replace(s, log_headers=True))

    def _disk_paths(self, disk: str) -> tuple[str, str, str, str]:
        d = os.path.join(self.path, disk)
        return d, os.path.join(d, BASE_FILE), os.path.join(d, HIDDEN_FILE), os.path.join(d, ACTIVE_FILE)

    def _open_disk(self, disk: str, ds: DiskState, *, clean: bool) -> Disk:
        d, base, hidden_path, active_path = self._disk_paths(disk)
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
        disk_obj = Disk(self, disk, d, ds.size, ds.block_size, base_fd, hidden, active)
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
                moved += await disk.commit_buffers()
            await datasync_all([d.base_fd for d in self.disks.values()])
            await self._finish_failover()
            self.recovery = Recovery("failover-completed", moved, self.state.last_applied)
            log.warning("VM %s: completed an interrupted failover (%d blocks committed)", self.name, moved)
            return
        restored = 0
        if st.role == SECONDARY:
            for disk in self.disks.values():
                restored += await self._roll_back(disk)
            await datasync_all([d.base_fd for d in self.disks.values()])
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
                await read_into(disk.hidden.fd, view, hmap[b])
                disk.hidden.verify(b, view)
                start = b * bs
                extents.append((start, view[: min(bs, disk.size - start)]))
            await disk.cbw.write(extents)
        return len(blocks)

    async def _update(self, change: Callable[[VMState], VMState]) -> VMState:
        """Durably replace the state with ``change(current state)``; returns the new state.

        Updates are serialised and each is computed from the state as it is
        when its turn comes, so two updates never undo each other. A
        primary's writes keep counting sequence numbers on the live state
        while the file is written (they take no VM lock): those increments
        are carried over, so no sequence number is handed out twice.
        """
        async with self._state_lock:
            live = self.state
            mark = live.last_applied
            new = change(live)
            await trio.to_thread.run_sync(save_vm_state, os.path.join(self.path, STATE_FILE), new)
            new.last_applied += live.last_applied - mark
            self.state = new
            return new

    # -- disks -----------------------------------------------------------------

    async def add_disk(
        self, name: str, size: int, block_size: int = 4096, source: str | ImageSource | None = None
    ) -> Disk:
        """Create a disk (optionally with the content of a raw image) and commit it to the state.

        The disk is built under a temporary name, then the state names it,
        then it is renamed: a crash leaves either no disk or a whole one. A
        size the store cannot hold is refused before anything is made, and a
        build that fails (an image that changed while it was copied, an I/O
        error) removes the temporary directory.
        """
        self.check_usable()
        check_name("disk", name)
        label = f"{self.name}/{name}"
        if name in self.state.disks:
            raise AlreadyExists(f"disk {label} already exists")
        if not isinstance(size, int) or size <= 0 or size % 512:
            raise BadArgument(f"{label}: size must be a positive multiple of 512 bytes, not {size}")
        if block_size & (block_size - 1) or not MIN_BLOCK <= block_size <= MAX_BLOCK:
            raise BadArgument(
                f"{label}: block size must be a power of two from {MIN_BLOCK} to {MAX_BLOCK}, not {block_size}"
            )
        if isinstance(source, str):
            with await trio.to_thread.run_sync(open_image, source) as image:
                return await self.add_disk(name, size, block_size, image)
        if source is not None and source.size > size:
            raise BadArgument(f"{label}: image {source.path} ({source.size} bytes) is larger than the disk ({size})")
        tmp = os.path.join(self.path, NEW_PREFIX + name)
        final, base, hidden, active = self._disk_paths(name)
        if os.path.exists(final):
            raise AlreadyExists(f"disk {label}: directory {final} already exists")
        await trio.to_thread.run_sync(check_disk_size, self.path, f"disk {label}", size)
        try:
            await trio.to_thread.run_sync(self._build_disk_dir, tmp, size, block_size, source)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_remove_tree, tmp)
            raise
        ds = DiskState(size=size, block_size=block_size)
        await self._update(lambda s: replace(s, disks={**s.disks, name: ds}))
        os.rename(tmp, final)
        fsync_dir(self.path)
        disk = self._open_disk(name, ds, clean=False)
        self.disks[name] = disk
        log.info("VM %s: created disk %s (%d bytes, %d-byte blocks)", self.name, name, size, block_size)
        return disk

    @staticmethod
    def _build_disk_dir(tmp: str, size: int, block_size: int, source: ImageSource | None) -> None:
        try:
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
            os.mkdir(tmp, 0o700)
            fd = os.open(os.path.join(tmp, BASE_FILE), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                if source is not None:
                    source.copy_into(fd)
                os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)
            for log_name in (HIDDEN_FILE, ACTIVE_FILE):
                lfd = os.open(os.path.join(tmp, log_name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                write_all(lfd, [empty_log(block_size, log_name == ACTIVE_FILE)], 0)  # never an empty file
                os.fsync(lfd)
                os.close(lfd)
            fsync_dir(tmp)
        except OSError as e:
            raise DiskIOError(f"creating disk directory {tmp}: {e.strerror}", e.errno) from e

    def disk(self, name: str) -> Disk:
        try:
            return self.disks[name]
        except KeyError:
            raise NotFound(f"VM {self.name} has no disk {name!r}") from None

    # -- the secondary's operations ---------------------------------------------------

    def check_usable(self) -> None:
        """Refuse everything while the VM is quarantined."""
        if self.damage is not None:
            raise VMDamaged(
                f"VM {self.name} is quarantined: {self.damage.describe()}; "
                f"repair it from its primary (mountctl repair MNT/{self.name})"
            )

    def note_damage(self, err: BaseException) -> None:
        """Quarantine the VM after ``err`` found damage while it was serving (a block failing its digest).

        Recorded durably at once (a rare, small write), so a restart keeps
        the VM quarantined; the damaged files stay as they are.
        """
        if self.damage is not None:
            return
        self.damage = damage_of(err, self.path)
        log.error("VM %s: damaged, quarantined: %s; nothing of it is served until it is repaired "
                  "(mountctl repair MNT/%s on the secondary)", self.name, self.damage.describe(), self.name)
        try:
            save_marker(self.path, self.damage)
        except OSError as e:
            log.error("VM %s: cannot record the damage in %s: %s", self.name, self.path, e)

    def _check_batch(self, seq: int, writes: Sequence[PrimaryWrite]) -> None:
        self.check_usable()
        st = self.state
        if st.role != SECONDARY or st.phase != NORMAL:
            raise RoleError(f"VM {self.name}: primary writes refused, the VM is {st.role} ({st.phase})")
        if not writes:
            raise BadArgument(f"VM {self.name}: empty batch at seq {seq}")
        expected = st.last_applied + 1
        if seq != expected:
            what = "replays or goes backwards" if seq < expected else "skips"
            raise SequenceError(
                f"VM {self.name}: batch at seq {seq} {what}: the next expected seq is {expected}"
            )
        self._check_writes(writes, f"batch at seq {seq}")

    async def apply_primary(self, seq: int, writes: Sequence[PrimaryWrite]) -> int:
        """Apply forwarded primary writes ``seq, seq+1, ...``; returns the last applied seq.

        Validates the whole batch before touching anything, so a bad batch
        changes nothing. Returns once the batch is crash-safe: hidden durable
        and base written (see the module docstring for why base is synced at
        checkpoints rather than here).
        """
        self._check_batch(seq, writes)
        async with self._apply_lock:
            self._check_batch(seq, writes)  # state may have moved while we waited
            await self._apply(writes)
            self.state.last_applied = seq + len(writes) - 1
            return self.state.last_applied

    async def apply_resync(self, writes: Sequence[PrimaryWrite]) -> None:
        """Apply resynchronisation data: like primary writes (V does not change), outside the seq stream.

        The primary sends the current content of blocks that changed while
        the peers were apart; :meth:`finish_resync` then names the sequence
        number the disks are now at.
        """
        self._check_writes(writes, "resync")
        async with self._apply_lock:
            self._check_writes(writes, "resync")
            await self._apply(writes)

    async def finish_resync(self, seq: int) -> None:
        """After a resync: the disks hold the primary's image at ``seq`` (plus later writes to come)."""
        async with self._apply_lock:
            st = self.state
            if seq < st.last_checkpoint:
                raise SequenceError(
                    f"VM {self.name}: resync up to seq {seq} is behind the last checkpoint {st.last_checkpoint}"
                )
            st.last_applied = seq

    async def adopt_epoch(self, epoch: int) -> None:
        """Take over a primary's newer epoch (a pair rebuilt after a failover elsewhere).

        Durable before anything from that primary is applied, so that the
        older primary is refused from then on. Never lowers the epoch.
        """
        async with self._apply_lock:
            st = self.state
            if st.role != SECONDARY or st.phase != NORMAL:
                raise RoleError(f"VM {self.name}: a {st.role} ({st.phase}) does not adopt a peer's epoch")
            if epoch > st.epoch:
                await self._update(lambda s: replace(s, epoch=max(s.epoch, epoch)))
                log.warning("VM %s: adopted the primary's epoch %d", self.name, epoch)

    def _check_writes(self, writes: Sequence[PrimaryWrite], what: str) -> None:
        self.check_usable()
        st = self.state
        if st.role != SECONDARY or st.phase != NORMAL:
            raise RoleError(f"VM {self.name}: {what} refused, the VM is {st.role} ({st.phase})")
        for w in writes:
            disk = self.disks.get(w.disk)
            if disk is None:
                raise NotFound(f"VM {self.name} has no disk {w.disk!r} ({what})")
            disk.check_range(w.offset, len(w.data))
            if not len(w.data):
                raise BadRange(f"{disk.label}: empty write at {w.offset} ({what})")

    async def _apply(self, writes: Sequence[PrimaryWrite]) -> None:
        by_disk: dict[str, list[tuple[int, Buffer]]] = {}
        for w in writes:
            by_disk.setdefault(w.disk, []).append((w.offset, w.data))
        disks = [(self.disks[n], ext) for n, ext in sorted(by_disk.items())]
        held = []
        try:
            for disk, ext in disks:  # disks in name order: no two batches cross
                held.append((disk, await disk.lock.acquire_spans(extents_blocks(disk, ext), True)))
            grown: list[BlockLog] = []
            for disk, ext in disks:
                grown += await disk.cbw.save(disk.cbw.blocks_of(ext))
            await make_durable(grown)  # synced and committed before base changes: see blocklog
            for disk, ext in disks:
                disk.cbw.store(ext)
                disk.cbw.start_writeback()
        finally:
            for disk, req in held:
                disk.lock.release(req)

    async def checkpoint(self, seq: int | None = None) -> int:
        """Checkpoint after ``seq`` (default: the last applied): empty hidden and active of all disks.

        The state file's generation bump is the single commit point; SVM I/O
        is held off while it happens, so no SVM write straddles it.
        """
        async with self._apply_lock:
            self.check_usable()
            st = self.state
            if st.phase != NORMAL:
                raise RoleError(f"VM {self.name}: no checkpoint during a failover")
            if seq is None:
                seq = st.last_applied
            if st.role == PRIMARY:
                # The primary records the checkpoint its peer confirmed; writes went on meanwhile.
                if not st.last_checkpoint <= seq <= st.last_applied:
                    raise SequenceError(
                        f"VM {self.name}: checkpoint at seq {seq} outside "
                        f"[{st.last_checkpoint}, {st.last_applied}]"
                    )
                await self._update(lambda s: replace(s, last_checkpoint=seq))
                return seq
            if seq != st.last_applied:
                raise SequenceError(
                    f"VM {self.name}: checkpoint at seq {seq}, but the last applied seq is {st.last_applied}"
                )
            # Base holds the checkpoint's image once everything applied is on the device.
            await datasync_all([d.base_fd for d in self.disks.values()])
            held = []
            try:
                for disk in self._sorted_disks():
                    held.append((disk, await disk.lock.acquire(0, disk.nblocks, True)))
                new = await self._update(lambda s: replace(s, gen=s.gen + 1, last_checkpoint=seq))
                await self._start_layers_over(new.gen)
            finally:
                for disk, req in held:
                    disk.lock.release(req)
            return seq

    async def failover(self) -> int:
        """Make this secondary the primary: commit V into base while SVM I/O goes on.

        Returns the number of blocks committed. If the commit fails half way
        the error propagates, the disks keep serving V, and calling
        :meth:`failover` again resumes it.
        """
        async with self._failover_lock:
            async with self._apply_lock:
                self.check_usable()
                st = self.state
                if st.role != SECONDARY:
                    raise RoleError(f"VM {self.name}: failover of a {st.role}")
                if st.phase == NORMAL:
                    # Roll-forward after a crash trusts active: make it durable first.
                    await datasync_all([d.active.fd for d in self.disks.values()])
                    await self._update(lambda s: replace(s, phase=FAILOVER, epoch=s.epoch + 1))
                    for disk in self.disks.values():
                        disk.cbw.detach(disk.hidden)
                    log.warning("VM %s: failover started, epoch %d", self.name, self.state.epoch)
            moved = 0
            for disk in self._sorted_disks():
                moved += await disk.commit_buffers()
            await datasync_all([d.base_fd for d in self.disks.values()])
            async with self._apply_lock:
                await self._finish_failover()
            log.warning("VM %s: failover complete, %d blocks committed; now primary", self.name, moved)
            return moved

    async def _finish_failover(self) -> None:
        """Switch to primary with every disk fully locked, so no SVM write straddles the switch."""
        held = []
        try:
            for disk in self._sorted_disks():
                held.append((disk, await disk.lock.acquire(0, disk.nblocks, True)))
            new = await self._update(
                lambda s: replace(s, role=PRIMARY, phase=NORMAL, gen=s.gen + 1, last_checkpoint=s.last_applied)
            )
            await self._start_layers_over(new.gen)
        finally:
            for disk, req in held:
                disk.lock.release(req)

    async def _start_layers_over(self, gen: int) -> None:
        """Empty hidden and active of every disk for ``gen``, which the state file already names.

        The caller holds every disk's whole range. Fresh files are renamed
        over the logs and the old ones freed by the reaper, so the pause
        does not grow with the amount buffered (see ``colofs.core.reaper``).
        """
        old: list[int] = []
        dirs: set[str] = set()
        try:
            for disk in self._sorted_disks():
                for layer in (disk.hidden, disk.active):
                    try:
                        old.append(layer.start_over(gen))
                        dirs.add(os.path.dirname(layer.path))
                    except DiskIOError as e:
                        log.warning("%s; truncating it in place instead", e)
                        layer.reset(gen)
        finally:
            self.reaper.put(old)
        # The new files (their headers) and the renames must be durable before they take data base depends on.
        await datasync_all([lg.fd for d in self._sorted_disks() for lg in (d.hidden, d.active)])
        await trio.to_thread.run_sync(_fsync_dirs, sorted(dirs))

    # -- the primary's writes -----------------------------------------------------

    async def primary_write_locked(self, disk: Disk, offset: int, data: Buffer) -> int:
        """Write to the primary disk and hand the write, with its seq, to the forwarding sink.

        The caller holds the disk's range lock over the write, so writes to a
        block reach the sink in the order they reached base.
        """
        await disk.write_base(offset, data)
        fwd = self.forward
        while True:
            if self.state.last_applied >= self.state.seq_reserved:
                await self._reserve_seqs()
            if fwd is not None:
                await fwd.wait_room(len(data))
            if self.state.last_applied < self.state.seq_reserved:
                break
        # No await between taking the seq and queueing it: the sink stays in seq order.
        seq = self.state.last_applied + 1
        self.state.last_applied = seq
        if fwd is not None:
            fwd.put_nowait(ForwardedWrite(seq, disk.name, offset, data))
        return seq

    async def _reserve_seqs(self) -> None:
        """Persist a high-water mark before handing out more sequence numbers.

        A primary persists its exact count only at checkpoints and clean
        closes; after a crash it resumes past the reserved range, so a number
        its peer may already have seen is never reused.
        """
        async with self._reserve_lock:
            st = self.state
            if st.last_applied < st.seq_reserved:
                return
            await self._update(lambda s: replace(s, seq_reserved=s.last_applied + SEQ_RESERVE))

    # -- snapshots and clones --------------------------------------------------------

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
                await datasync_all([overlay.fd])
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
            held = []
            made: list[tuple[Disk, BlockLog, BlockLog | None]] = []
            try:
                for d in targets:
                    held.append((d, await d.lock.acquire(0, d.nblocks, True)))
                for d in targets:
                    label = f"{d.label}@{name}"
                    target = BlockLog.create(target_path(d.path, name), d.block_size, 0, mutable=False, label=label)
                    overlay = None
                    made.append((d, target, None))
                    if kind == CLONE:
                        overlay = BlockLog.create(overlay_path(d.path, name), d.block_size, 0, mutable=True, label=label)
                        made[-1] = (d, target, overlay)
                    if secondary:
                        await _copy_blocks(d.hidden, target)
                await make_durable([log for _, t, o in made for log in (t, o) if log is not None])
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
            finally:
                for d, req in held:
                    d.lock.release(req)

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
            held = await d.lock.acquire(0, d.nblocks, True)
            own = await snap.lock.acquire(0, d.nblocks, True)
            try:
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
            finally:
                snap.lock.release(own)
                d.lock.release(held)
            log.info("%s: deleted %s (%d bytes freed)", snap.label, snap.state.kind, freed)
            return freed

    # -- status and shutdown --------------------------------------------------------

    def _sorted_disks(self) -> list[Disk]:
        return [self.disks[n] for n in sorted(self.disks)]

    def status(self) -> dict[str, object]:
        st = self.state
        damaged = self.damage is not None
        return {
            "vm": self.name,
            "role": st.role,
            "phase": PHASE_DAMAGED if damaged else st.phase,
            **({"damage": self.damage.as_dict()} if self.damage is not None else {}),
            "epoch": st.epoch,
            "last_applied": st.last_applied,
            "last_checkpoint": st.last_checkpoint,
            "disks": {n: d.status() for n, d in sorted(self.disks.items())},
        }

    async def flush(self) -> None:
        for disk in self._sorted_disks():
            await disk.flush()

    def _log_lengths(self, st: VMState) -> dict[str, DiskState]:
        """The disks' states with the current lengths of every log (for a clean close)."""
        disks = {}
        for n, ds in st.disks.items():
            d = self.disks[n]
            snaps = {}
            for name, sn in ds.snapshots.items():
                snap = d.snapshots[name]
                snaps[name] = replace(
                    sn,
                    target_len=snap.target.end if snap.target is not None else 0,
                    overlay_len=snap.overlay.end if snap.overlay is not None else 0,
                )
            disks[n] = replace(ds, hidden_len=d.hidden.end, active_len=d.active.end, snapshots=snaps)
        return disks

    async def close(self) -> None:
        """Make everything durable and mark the state clean, so the next open keeps the layers."""
        if self.closed:
            return
        if self.damage is not None:  # never call a damaged store clean: it stays quarantined
            self._close_files()
            await self.reaper.stop()
            return
        async with self._failover_lock, self._apply_lock:
            fds: list[int] = []
            for d in self.disks.values():
                fds += [d.base_fd, d.hidden.fd, d.active.fd]
                for snap in d.snapshots.values():
                    fds += [log.fd for log in snap.logs()]
            await datasync_all(fds)
            await self._update(lambda s: replace(s, clean=True, disks=self._log_lengths(s)))
            self._close_files()
        await self.reaper.stop()

    def _close_files(self) -> None:
        for d in self.disks.values():
            d.close()
        self.closed = True

    def abandon(self) -> None:
        """Drop the VM without a clean close, as a crash would (for tests and fatal errors)."""
        self._close_files()
        self.reaper.stop_now()


def _fsync_dirs(paths: Sequence[str]) -> None:
    for path in paths:
        try:
            fsync_dir(path)
        except OSError as e:
            raise DiskIOError(f"cannot make the new block logs in {path} durable: {e.strerror}", e.errno) from e


def _remove_tree(path: str) -> None:
    """Remove what a failed creation left at ``path`` (if anything), durably."""
    if os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=True)
        fsync_dir(os.path.dirname(path))


async def _copy_blocks(src: BlockLog, dst: BlockLog) -> None:
    """Append every block of ``src`` to ``dst`` (a snapshot taking hidden's undo copies)."""
    bs = src.block_size
    blocks = sorted(src.map)
    step = max(1, (8 << 20) // bs)
    for i in range(0, len(blocks), step):
        chunk = blocks[i : i + step]
        buf = bytearray(len(chunk) * bs)
        mv = memoryview(buf)
        for j, b in enumerate(chunk):
            await read_into(src.fd, mv[j * bs : (j + 1) * bs], src.map[b])
            src.verify(b, mv[j * bs : (j + 1) * bs])
        dst.append(chunk, [mv])
