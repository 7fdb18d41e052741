"""The failover's commit plans from copies of the layers' maps, and stays right when the SVM writes meanwhile.

``commit.commit_disk`` copies both maps once per pass and asks them per
block; a write of the SVM to a block still buffered changes active behind
those copies (a hidden-only block gains an active copy, an active block may
move), so the commit must take those blocks from the live maps.
"""

from __future__ import annotations

import os

from colofs.core import PrimaryWrite, Store
from colofs.core.disk import Disk
from colofs.core.state import PRIMARY

BS = 4096
N = 16
SIZE = N * BS


def read_base(store: Store) -> bytes:
    with open(os.path.join(store.path, "vm", "d", "base.raw"), "rb") as f:
        return f.read(SIZE)


async def test_svm_writes_during_the_commit_reach_base(open_store, monkeypatch) -> None:
    store = await open_store()
    await store.create_disk("vm", "d", SIZE)
    vm, disk = store.vm("vm"), store.disk("vm", "d")
    await vm.apply_primary(1, [PrimaryWrite("d", 0, b"A" * SIZE)])
    await vm.checkpoint(1)
    await vm.apply_primary(2, [PrimaryWrite("d", 0, b"B" * (8 * BS))])  # hidden keeps the A's of blocks 0-7
    await disk.write(8 * BS, b"S" * (8 * BS))  # active: blocks 8-15
    image = bytearray(b"A" * (8 * BS) + b"S" * (8 * BS))
    disk.commit_chunk = BS  # one block per step: the later blocks wait while the first is committed
    steps: list[list[int]] = []
    commit_step = Disk._commit_step

    async def step_then_write(self: Disk, chunk: list[int], amap: dict[int, int]) -> None:
        steps.append(list(chunk))
        if len(steps) == 1:  # the plan is made; the SVM now writes blocks it has not reached
            await disk.write(5 * BS, b"X" * BS)  # hidden-only: active gains it
            await disk.write(12 * BS, b"Y" * BS)  # already in active
            await disk.write(14 * BS + 100, b"Z" * 50)  # part of an active block
        await commit_step(self, chunk, amap)

    monkeypatch.setattr(Disk, "_commit_step", step_then_write)
    image[5 * BS : 6 * BS] = b"X" * BS
    image[12 * BS : 13 * BS] = b"Y" * BS
    image[14 * BS + 100 : 14 * BS + 150] = b"Z" * 50
    assert await vm.failover() == N
    assert vm.state.role == PRIMARY
    assert [b for s in steps for b in s] == list(range(N))
    assert read_base(store) == bytes(image)
    assert bytes(await disk.read(0, SIZE)) == bytes(image)
    assert not disk.active.map and not disk.hidden.map
