"""A VM: the consistency group of its disks, and the operations on all of them at once.

Applying primary writes, checkpoints and failover are VM operations because
sequence numbers are per VM and a checkpoint covers every disk of the VM
atomically (docs/design.md, invariants 3-5). The rest of the VM lives next
door: the state, locks, numbering and shutdown in ``colofs.core.vmbase``,
opening and crash recovery in ``colofs.core.recovery``, snapshots and
clones in ``colofs.core.vmsnapshots``; :class:`VM` joins them.

Durability order of one applied batch (group commit), each disk through
its own ``CopyBeforeWrite.write`` (:meth:`Disk.apply`), the disks at once:
  1. copy-before-write of every first-touched block into hidden;
  2. ``fdatasync`` of the hidden log if it grew, and its commit record;
  3. base overwritten in place; once every disk is done the batch counts
     as applied.
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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Self

import trio

from colofs.core.blocks import check_block_size
from colofs.core.commit import commit_disk
from colofs.core.disk import Disk, apply_to_disks
from colofs.core.disksize import check_disk_size
from colofs.core.errors import (
    AlreadyExists,
    BadArgument,
    BadRange,
    DiskIOError,
    NotFound,
    RoleError,
    SequenceError,
)
from colofs.core.fileio import Buffer, fsync_dir, write_all
from colofs.core.imagesource import ImageSource, open_image
from colofs.core.ioctx import IOContext
from colofs.core.logformat import empty_log
from colofs.core.logsync import make_durable
from colofs.core.names import check_name
from colofs.core.recovery import (
    ACTIVE_FILE,
    BASE_FILE,
    HIDDEN_FILE,
    NEW_PREFIX,
    Recovery,
    VMOpening,
    disk_paths,
)
from colofs.core.state import (
    FAILOVER,
    NORMAL,
    PRIMARY,
    ROLES,
    SECONDARY,
    DiskState,
    VMState,
    save_vm_state,
)
from colofs.core.vmbase import STATE_FILE
from colofs.core.vmsnapshots import VMSnapshots

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PrimaryWrite:
    """One forwarded primary write: ``data`` at ``offset`` of disk ``disk``."""

    disk: str
    offset: int
    data: Buffer


class VM(VMOpening, VMSnapshots):
    """The disks of one VM and the state that covers them all."""

    failover_phases: dict[str, float] | None = None
    """Seconds of each phase of this process's last completed failover (for the control reply)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Writes an ingest connection answered but has not applied yet: each drains its queue (colofs.nbd.ingest).
        self.before_checkpoint: set[Callable[[], Awaitable[None]]] = set()

    async def drain_ingest(self) -> None:
        """Wait until every write answered so far to an ingest client of this VM is applied (raises a failed one)."""
        for drain in list(self.before_checkpoint):
            await drain()

    @classmethod
    async def create(cls, path: str, name: str, role: str, io: IOContext) -> Self:
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
        vm = cls(path, state, io)
        vm.recovery = Recovery("clean", 0, 0)
        return vm

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
        check_block_size(label, block_size)
        if isinstance(source, str):
            with await trio.to_thread.run_sync(open_image, source) as image:
                return await self.add_disk(name, size, block_size, image)
        if source is not None and source.size > size:
            raise BadArgument(f"{label}: image {source.path} ({source.size} bytes) is larger than the disk ({size})")
        tmp = os.path.join(self.path, NEW_PREFIX + name)
        final, base, hidden, active = disk_paths(self.path, name)
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

    # -- the secondary's operations ---------------------------------------------------

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
        # Each disk saves into hidden, syncs and only then writes base (see blocklog); the disks at once.
        await apply_to_disks([(self.disks[n], ext) for n, ext in sorted(by_disk.items())])

    async def checkpoint(self, seq: int | None = None) -> int:
        """This host's checkpoint after ``seq`` (default: the last applied): a secondary's; returns ``seq``.

        It empties hidden and active of all disks. A primary buffers nothing
        and takes no checkpoint of its own: it records the one its secondary
        (or, unreplicated, whoever replicates it) holds, with
        :meth:`record_confirmed_checkpoint`. The role is read under the apply
        lock, which a failover's switch also holds. Writes an ingest client
        was answered for are applied first: the checkpoint holds them.
        """
        await self.drain_ingest()
        async with self._apply_lock:
            st = self._checkpointable()
            if st.role == PRIMARY:
                raise RoleError(f"VM {self.name}: a primary takes no checkpoint of its own; it records the one "
                                "its secondary holds (record_confirmed_checkpoint)")
            return await self._take_checkpoint(st, seq)

    async def record_confirmed_checkpoint(self, seq: int | None = None) -> int:
        """A primary: record that its image at ``seq`` is a checkpoint, the one its secondary holds.

        ``seq`` may lie anywhere from the last checkpoint to the last write
        (writes went on while the secondary took it); ``None`` is the last
        write (an unreplicated primary whose peer checkpoints now).
        """
        async with self._apply_lock:
            st = self._checkpointable()
            if st.role != PRIMARY:
                raise RoleError(f"VM {self.name}: a {st.role} takes its checkpoints, it does not record a peer's")
            return await self._record_checkpoint(st, seq)

    def _checkpointable(self) -> VMState:
        self.check_usable()
        st = self.state
        if st.phase != NORMAL:
            raise RoleError(f"VM {self.name}: no checkpoint during a failover")
        return st

    async def _record_checkpoint(self, st: VMState, seq: int | None) -> int:
        # Writes went on while the secondary took it: seq may lie anywhere up to the last write.
        if seq is None:
            seq = st.last_applied
        if not st.last_checkpoint <= seq <= st.last_applied:
            raise SequenceError(
                f"VM {self.name}: checkpoint at seq {seq} outside [{st.last_checkpoint}, {st.last_applied}]"
            )
        await self._update(lambda s: replace(s, last_checkpoint=seq))
        return seq

    async def _take_checkpoint(self, st: VMState, seq: int | None) -> int:
        """A secondary's checkpoint after ``seq``: empty hidden and active of all disks (apply lock held).

        The state file's generation bump is the single commit point; SVM I/O
        is held off while it happens, so no SVM write straddles it.
        """
        if seq is None:
            seq = st.last_applied
        if seq != st.last_applied:
            raise SequenceError(
                f"VM {self.name}: checkpoint at seq {seq}, but the last applied seq is {st.last_applied}"
            )
        # Base holds the checkpoint's image once everything applied is on the device: synced before the
        # state names it, beside the switch's preparation (the new state file, the fresh logs).
        await self._new_generation(lambda s: replace(s, gen=s.gen + 1, last_checkpoint=seq),
                                   [d.base_fd for d in self._sorted_disks()])
        return seq

    async def failover(self) -> int:
        """Make this secondary the primary: commit V into base while SVM I/O goes on.

        Returns the number of blocks committed. If the commit fails half way
        the error propagates, the disks keep serving V, and calling
        :meth:`failover` again resumes it.
        """
        async with self._failover_lock:
            clock = trio.current_time
            t0 = clock()
            async with self._apply_lock:
                self.check_usable()
                st = self.state
                if st.role != SECONDARY:
                    raise RoleError(f"VM {self.name}: failover of a {st.role}")
                if st.phase == NORMAL:
                    # Roll-forward after a crash trusts active: durable before the state says FAILOVER.
                    active = [d.active for d in self._sorted_disks()]
                    await self._update(lambda s: replace(s, phase=FAILOVER, epoch=s.epoch + 1),
                                       alongside=partial(make_durable, self.io, active))
                    for disk in self.disks.values():
                        disk.cbw.detach(disk.hidden)
                    log.warning("VM %s: failover started, epoch %d", self.name, self.state.epoch)
            t1 = clock()
            moved = 0
            for disk in self._sorted_disks():
                moved += await commit_disk(disk)
            t2 = clock()
            async with self._apply_lock:
                await self._finish_failover()  # base synced beside the switch's preparation, then the switch
            t3 = clock()
            # sync: base's fdatasync and the switch's preparation (beside it); finish: the switch itself.
            self.failover_phases = {"start_seconds": t1 - t0, "commit_seconds": t2 - t1,
                                    "sync_seconds": t3 - t2 - self.switch_seconds,
                                    "finish_seconds": self.switch_seconds}
            log.warning("VM %s: failover complete, %d blocks committed; now primary", self.name, moved)
            return moved

def _remove_tree(path: str) -> None:
    """Remove what a failed creation left at ``path`` (if anything), durably."""
    if os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=True)
        fsync_dir(os.path.dirname(path))

