"""What every VM operation stands on: the state file, the locks, the disks, damage, numbering and shutdown.

:class:`VMBase` holds the VM's state and the one way to change it durably
(:meth:`VMBase._update`), the locks that order its operations, the
sequence numbers a primary hands out, and the switch that empties the
layers for a new generation. Opening and recovery (``colofs.core.recovery``),
snapshot management (``colofs.core.vmsnapshots``) and the replication
operations (``colofs.core.vm``) build on it; :class:`colofs.core.vm.VM`
joins them.

Lock order, outermost first: ``_failover_lock``, ``_apply_lock``, then the
disks' range locks in disk-name order (a disk before its snapshots).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from functools import partial

import trio

from colofs.core.blocklog import BlockLog
from colofs.core.damage import PHASE_DAMAGED, Damage, damage_of, save_marker
from colofs.core.disk import Disk, whole_disks
from colofs.core.errors import DiskIOError, NotFound, VMDamaged
from colofs.core.fileio import Buffer, fsync_dir, write_all
from colofs.core.forward import ForwardedWrite, WriteSink
from colofs.core.ioctx import IOContext
from colofs.core.logsync import settle_renames
from colofs.core.reaper import FdReaper
from colofs.core.state import NORMAL, PRIMARY, DiskState, VMState, save_vm_state
from colofs.core.together import together

log = logging.getLogger(__name__)

STATE_FILE = "state"
SEQ_RESERVE = 1 << 20  # sequence numbers a primary may hand out per state save


class VMBase:
    """The disks of one VM and the state that covers them all."""

    def __init__(self, path: str, state: VMState, io: IOContext) -> None:
        self.path = path
        self.io = io  # the store's pool, read policy and writeback, handed to every disk
        self.name = state.vm
        self.state = state
        self.disks: dict[str, Disk] = {}
        self._apply_lock = trio.Lock()
        self._failover_lock = trio.Lock()
        self._reserve_lock = trio.Lock()
        self._state_lock = trio.Lock()
        self.forward: WriteSink | None = None
        self.closed = False
        self.reaper = FdReaper(self.name)
        self.damage: Damage | None = None
        """Set when the VM is quarantined (see ``colofs.core.damage``): nothing of it is served."""
        self.switch_seconds = 0.0
        """How long the last checkpoint's or failover's switch held every disk (no VM I/O meanwhile)."""

    async def _update(self, change: Callable[[VMState], VMState],
                      alongside: Callable[[], Awaitable[object]] | None = None) -> VMState:
        """Durably replace the state with ``change(current state)``; returns the new state.

        Updates are serialised and each is computed from the state as it is
        when its turn comes, so two updates never undo each other. A
        primary's writes keep counting sequence numbers on the live state
        while the file is written (they take no VM lock): those increments
        are carried over, so no sequence number is handed out twice.
        ``alongside`` makes durable what must be before the new state is
        (a failover's active logs): it runs beside the new file's own sync,
        and the rename that commits the state follows both.
        """
        async with self._state_lock:
            live = self.state
            mark = live.last_applied
            new = change(live)
            path = os.path.join(self.path, STATE_FILE)
            if alongside is not None:
                await together(alongside, partial(trio.to_thread.run_sync, _write_state_tmp, path, new))
                await trio.to_thread.run_sync(_install_state, path)
            else:
                await trio.to_thread.run_sync(save_vm_state, path, new)
            new.last_applied += live.last_applied - mark
            self.state = new
            return new

    def disk(self, name: str) -> Disk:
        try:
            return self.disks[name]
        except KeyError:
            raise NotFound(f"VM {self.name} has no disk {name!r}") from None

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

    # -- the primary's writes -----------------------------------------------------

    async def _number_write(self, disk: str, offset: int, data: Buffer) -> int:
        """Give a primary's write, already in base, its seq and hand it to the forwarding sink.

        Each disk calls this (its ``number_write``) with the write's range
        lock held, so writes to a block reach the sink in the order they
        reached base.
        """
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
            fwd.put_nowait(ForwardedWrite(seq, disk, offset, data))
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

    async def _finish_failover(self) -> None:
        """Sync base (which now holds V) and switch to primary with every disk fully locked, so no SVM write straddles it."""
        await self._new_generation(
            lambda s: replace(s, role=PRIMARY, phase=NORMAL, gen=s.gen + 1, last_checkpoint=s.last_applied),
            [d.base_fd for d in self._sorted_disks()],
        )

    async def _new_generation(self, change: Callable[[VMState], VMState], sync_first: Sequence[int]) -> VMState:
        """Commit ``change`` (a new generation) and empty hidden and active of every disk for it; returns the state.

        The caller holds ``_apply_lock``, so nothing else moves the state's
        sequence numbers. What needs no pause is done first, beside the
        ``fdatasync`` of ``sync_first`` (base, which must hold the image the
        new state names): the new state file written and synced under a
        temporary name, and a fresh synced log file for each layer
        (``BlockLog.make_spare``). Only the switch itself runs with every
        disk's whole range held: the state file renamed into place and its
        directory synced (the commit point; a crash before it keeps the old
        generation, whose logs are still in place), then the fresh logs
        renamed over the old ones. Their directories are synced by the first
        sync that relies on them (``blocklog.make_durable`` before the first
        batch's base writes, a flush, a failover's start, a clean close), not
        here: a checkpoint waits for two journal commits (the prepared files,
        the state's rename), not three. The old files are freed by the reaper
        once the switch is over (see ``colofs.core.reaper``).
        :attr:`switch_seconds` keeps how long the VM's I/O was held.

        ``_state_lock`` is held while the disks are waited for: safe, since
        only a primary's numbering takes it under a disk's range lock, and a
        new generation is only made on a secondary (or in recovery, before
        any I/O is served).
        """
        disks = self._sorted_disks()
        layers = [lg for d in disks for lg in (d.hidden, d.active)]
        path = os.path.join(self.path, STATE_FILE)
        spares: dict[int, int] = {}  # id(layer) -> its spare's descriptor, until taken

        async def spare(layer: BlockLog) -> None:
            try:
                spares[id(layer)] = await trio.to_thread.run_sync(layer.make_spare)
            except DiskIOError as e:
                log.warning("%s; truncating it in place instead", e)

        async with self._state_lock:
            live = self.state
            mark = live.last_applied
            new = change(live)
            try:
                await together(partial(self.io.syncs.datasync_all, list(sync_first)),
                               partial(trio.to_thread.run_sync, _write_state_tmp, path, new),
                               *[partial(spare, layer) for layer in layers])
                with self.reaper.deferred():
                    async with whole_disks(disks):
                        t0 = trio.current_time()
                        await trio.to_thread.run_sync(_install_state, path)
                        new.last_applied += live.last_applied - mark
                        self.state = new
                        await self._switch_layers(layers, spares, new.gen)
                        self.switch_seconds = trio.current_time() - t0
            finally:
                for fd in spares.values():  # not taken: the switch failed before it got to them
                    os.close(fd)
        return new

    async def _switch_layers(self, layers: Sequence[BlockLog], spares: dict[int, int], gen: int) -> None:
        """Rename each layer's spare over it (a layer without one is truncated in place and synced)."""
        old: list[int] = []
        reset: list[int] = []
        try:
            for layer in layers:
                fd = spares.pop(id(layer), None)
                if fd is not None:
                    try:
                        old.append(layer.take_spare(fd, gen))
                        continue
                    except DiskIOError as e:
                        os.close(fd)
                        log.warning("%s; truncating it in place instead", e)
                layer.reset(gen)
                reset.append(layer.fd)
        finally:
            self.reaper.put(old)
        if reset:  # a header rewritten in place
            await self.io.syncs.datasync_all(reset)

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
            await together(partial(self.io.syncs.datasync_all, fds),
                           partial(settle_renames, [lg for d in self.disks.values() for lg in (d.hidden, d.active)]))
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

def _write_state_tmp(path: str, state: VMState) -> None:
    """The first half of ``save_vm_state``: the new state in ``path``.tmp, synced (blocking)."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, [state.encode()], 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def _install_state(path: str) -> None:
    """The second half: ``path``.tmp renamed over ``path`` and the rename made durable (blocking)."""
    os.rename(f"{path}.tmp", path)
    fsync_dir(os.path.dirname(path) or ".")
