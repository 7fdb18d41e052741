"""The core against the reference model of docs/design.md, under random interleavings.

Primary batches (multi-disk), SVM writes and reads at unaligned offsets,
checkpoints, failovers, snapshots and clones (taken, written, deleted),
clean restarts and crash restarts (the VM dropped without closing, as
SIGKILL would) are mixed at random. After every step, each disk's view V
and its base file, and every snapshot's and clone's image, must equal the
model's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from colofs.core import VM, PrimaryWrite, Store
from colofs.core.errors import InUse
from tests.core.model import ModelDisk

T = TypeVar("T")
DISKS = {"d0": (40 * 512, 512), "d1": (6 * 4096, 4096)}  # d0: 40 blocks; d1: 6 blocks


def _extent(draw: st.DrawFn, size: int) -> tuple[int, int]:
    off = draw(st.integers(0, size - 1))
    n = draw(st.integers(1, min(size - off, 3 * 4096)))
    return off, n


@st.composite
def extents(draw: st.DrawFn) -> tuple[str, int, int, int]:
    disk = draw(st.sampled_from(sorted(DISKS)))
    off, n = _extent(draw, DISKS[disk][0])
    return disk, off, n, draw(st.integers(1, 255))


class CoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="colofs-model-")
        self.store: Store | None = None
        self.models = {name: ModelDisk(size, bs) for name, (size, bs) in DISKS.items()}
        self.role = "secondary"
        self.seq = 0  # last seq the primary sent
        self.pending: list[tuple[int, list[PrimaryWrite]]] = []  # batches since the last checkpoint
        self.snaps: dict[tuple[str, str], bytearray] = {}  # (disk, name) -> image
        self.clone_base: dict[tuple[str, str], str | None] = {}  # clones -> the snapshot under them

    def teardown(self) -> None:
        if self.store is not None:
            self.store.abandon()
        shutil.rmtree(self.dir, ignore_errors=True)

    def run(self, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        return trio.run(fn, *args)

    @initialize()
    def setup(self) -> None:
        async def go() -> Store:
            store = await Store.open(os.path.join(self.dir, "store"), role="secondary", create=True)
            for name, (size, bs) in DISKS.items():
                await store.create_disk("vm", name, size, block_size=bs)
            return store

        self.store = self.run(go)

    @property
    def vm(self) -> VM:
        assert self.store is not None
        return self.store.vm("vm")

    # -- primary stream -------------------------------------------------------------

    @precondition(lambda self: self.role == "secondary")
    @rule(batch=st.lists(extents(), min_size=1, max_size=4))
    def primary_batch(self, batch: list[tuple[str, int, int, int]]) -> None:
        writes = [PrimaryWrite(d, off, bytes([v]) * n) for d, off, n, v in batch]
        first = self.seq + 1
        last = self.run(self.vm.apply_primary, first, writes)
        assert last == first + len(writes) - 1
        self.seq = last
        self.pending.append((first, writes))
        for w in writes:
            self.models[w.disk].primary_write(w.offset, bytes(w.data))

    # -- the VM on this host ------------------------------------------------------

    @rule(ext=extents())
    def vm_write(self, ext: tuple[str, int, int, int]) -> None:
        disk, off, n, v = ext
        data = bytes([v]) * n
        self.run(self.vm.disk(disk).write, off, data)
        if self.role == "secondary":
            self.models[disk].svm_write(off, data)
        else:
            self.models[disk].plain_write(off, data)
            self.seq += 1

    @rule(ext=extents())
    def vm_read(self, ext: tuple[str, int, int, int]) -> None:
        disk, off, n, _ = ext
        got = self.run(self.vm.disk(disk).read, off, n)
        assert bytes(got) == self.models[disk].read(off, n)

    @precondition(lambda self: self.role == "secondary")
    @rule()
    def checkpoint(self) -> None:
        assert self.run(self.vm.checkpoint, self.seq) == self.seq
        for m in self.models.values():
            m.checkpoint()
            assert m.B == m.P  # after a checkpoint base is the primary's disk
        self.pending.clear()

    @precondition(lambda self: self.role == "secondary")
    @rule()
    def failover(self) -> None:
        self.run(self.vm.failover)
        for m in self.models.values():
            m.failover()
        self.role = "primary"
        self.pending.clear()
        assert self.vm.state.role == "primary"

    # -- snapshots and clones ---------------------------------------------------------

    def _image_now(self, disk: str) -> bytes:
        m = self.models[disk]
        return m.checkpoint_image() if self.role == "secondary" else bytes(m.B)

    @rule(name=st.sampled_from(["s1", "s2", "s3"]), all_disks=st.booleans(), disk=st.sampled_from(sorted(DISKS)))
    def take_snapshot(self, name: str, all_disks: bool, disk: str) -> None:
        disks = sorted(DISKS) if all_disks else [disk]
        if any((d, name) in self.snaps for d in disks):
            return
        self.run(self.vm.snapshot, name, disks)
        for d in disks:
            self.snaps[(d, name)] = bytearray(self._image_now(d))

    @rule(name=st.sampled_from(["c1", "c2"]), disk=st.sampled_from(sorted(DISKS)), base=st.sampled_from([None, "s1", "s2", "s3"]))
    def take_clone(self, name: str, disk: str, base: str | None) -> None:
        if (disk, name) in self.snaps or (base is not None and (disk, base) not in self.snaps):
            return
        self.run(self.vm.clone, disk, name, base)
        image = self.snaps[(disk, base)] if base is not None else self._image_now(disk)
        self.snaps[(disk, name)] = bytearray(image)
        self.clone_base[(disk, name)] = base

    @rule(name=st.sampled_from(["c1", "c2"]), ext=extents())
    def clone_write(self, name: str, ext: tuple[str, int, int, int]) -> None:
        disk, off, n, v = ext
        if (disk, name) not in self.snaps:
            return
        data = bytes([v]) * n
        self.run(self.vm.disk(disk).snapshots[name].write, off, data)
        self.snaps[(disk, name)][off : off + n] = data

    @rule(name=st.sampled_from(["s1", "s2", "s3", "c1", "c2"]), disk=st.sampled_from(sorted(DISKS)))
    def delete_snapshot(self, name: str, disk: str) -> None:
        if (disk, name) not in self.snaps:
            return
        if any(b == name for (d, _), b in self.clone_base.items() if d == disk):
            try:
                self.run(self.vm.delete_snapshot, disk, name)
            except InUse:
                return
            raise AssertionError("deleting a snapshot under a clone was allowed")
        self.run(self.vm.delete_snapshot, disk, name)
        del self.snaps[(disk, name)]
        self.clone_base.pop((disk, name), None)
        assert name not in self.vm.disk(disk).snapshots

    # -- restarts -------------------------------------------------------------------

    def _reopen(self) -> None:
        async def go() -> Store:
            return await Store.open(os.path.join(self.dir, "store"), role="secondary")

        self.store = self.run(go)

    @rule()
    def clean_restart(self) -> None:
        assert self.store is not None
        self.run(self.store.close)
        self._reopen()
        assert self.vm.recovery.action == "clean"
        assert self.vm.state.last_applied == self.seq

    @rule()
    def crash_restart(self) -> None:
        assert self.store is not None
        self.store.abandon()
        self._reopen()
        if self.role == "secondary":
            checkpoint_seq = self.pending[0][0] - 1 if self.pending else self.seq
            assert self.vm.recovery.resume_seq == checkpoint_seq
            for m in self.models.values():
                m.crash()
            self.check_all()
            # The primary resends everything after the checkpoint.
            for first, writes in self.pending:
                self.run(self.vm.apply_primary, first, writes)
                for w in writes:
                    self.models[w.disk].primary_write(w.offset, bytes(w.data))
        else:
            # A primary's own sequence counter is only persisted at clean closes and checkpoints.
            self.seq = self.vm.state.last_applied

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def views_and_bases_match(self) -> None:
        if self.store is not None:
            self.check_all()

    def check_all(self) -> None:
        for name, m in self.models.items():
            disk = self.vm.disk(name)
            assert bytes(self.run(disk.read, 0, m.size)) == bytes(m.view()), f"V of {name}"
            with open(os.path.join(disk.path, "base.raw"), "rb") as f:
                assert f.read() == bytes(m.B), f"base of {name}"
        for (d, sname), image in self.snaps.items():
            snap = self.vm.disk(d).snapshots[sname]
            assert bytes(self.run(snap.read, 0, len(image))) == bytes(image), f"image of {d}@{sname}"


TestCoreModel = CoreMachine.TestCase
