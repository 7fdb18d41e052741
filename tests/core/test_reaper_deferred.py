"""The old logs of a checkpoint or failover are freed after the operation's own syncs, not during them.

Freeing a big unlinked log makes an overlapping ``fsync`` wait for the file
system's journal (and its discards), so ``FdReaper.deferred`` keeps the
descriptors handed over open until the block ends; the checkpoint and the
failover's switch hold it over the whole switch.
"""

from __future__ import annotations

import os

import pytest

from colofs.core import PrimaryWrite, vmbase
from colofs.core.reaper import FdReaper

SIZE = 1 << 20


def _open_unlinked(tmp_path, name: str) -> tuple[int, tuple[int, int]]:
    path = os.path.join(tmp_path, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.unlink(path)
    st = os.fstat(fd)
    return fd, (st.st_dev, st.st_ino)


def _is_open(fd: int, ident: tuple[int, int]) -> bool:
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == ident


async def test_descriptors_handed_over_in_a_deferred_block_stay_open_until_it_ends(tmp_path) -> None:
    reaper = FdReaper("t")
    a, a_id = _open_unlinked(tmp_path, "a")
    b, b_id = _open_unlinked(tmp_path, "b")
    try:
        with reaper.deferred():
            reaper.put([a])
            with reaper.deferred():  # nested: only the outermost end releases
                reaper.put([b])
            assert _is_open(b, b_id)
            assert _is_open(a, a_id)
            assert reaper.pending == 2
    finally:
        await reaper.stop()
    assert reaper.pending == 0
    assert not _is_open(a, a_id) and not _is_open(b, b_id)


async def test_stop_closes_what_a_deferred_block_still_holds(tmp_path) -> None:
    reaper = FdReaper("t")
    a, a_id = _open_unlinked(tmp_path, "a")
    with reaper.deferred():
        reaper.put([a])
        reaper.stop_now()  # a crash path closes everything, held or not
        assert not _is_open(a, a_id)
    assert reaper.pending == 0


@pytest.mark.parametrize("operation", ["checkpoint", "failover"])
async def test_old_logs_stay_open_until_the_new_state_is_durable(open_store, monkeypatch, operation: str) -> None:
    """The old logs are handed over in the switch, after the state's rename and its directory's sync."""
    store = await open_store()
    await store.create_disk("vm", "d", SIZE)
    vm, disk = store.vm("vm"), store.disk("vm", "d")
    await vm.apply_primary(1, [PrimaryWrite("d", 0, b"A" * SIZE)])
    await vm.checkpoint(1)
    await vm.apply_primary(2, [PrimaryWrite("d", 0, b"B" * 65536)])  # hidden holds A's
    await disk.write(SIZE // 2, b"S" * 65536)  # active holds the SVM's
    old = {fd: (os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in (disk.hidden.fd, disk.active.fd)}
    seen: list[bool] = []
    install_state = vmbase._install_state

    def watching(path):  # type: ignore[no-untyped-def]
        install_state(path)
        seen.append(vm.reaper.pending == 0 and all(_is_open(fd, ident) for fd, ident in old.items()))

    monkeypatch.setattr(vmbase, "_install_state", watching)
    if operation == "checkpoint":
        await vm.checkpoint(2)
    else:
        await vm.failover()
    assert seen[-1:] == [True]
    await vm.reaper.stop()
    assert not any(_is_open(fd, ident) for fd, ident in old.items())
