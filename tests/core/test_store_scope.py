"""A VM-scoped store (``Store.open(only=VM)``): one worker process's view, touching no other VM's files.

Each VM's files belong to the process serving it; a scoped store must neither
open (nor recover) another VM, nor create one, nor mark one clean at close.
"""

from __future__ import annotations

import os

import pytest

from colofs.core import PrimaryWrite, Store
from colofs.core.errors import BadArgument, InvalidName, NotFound

SIZE = 1 << 20


async def _two_vms(open_store) -> str:
    store = await open_store(role="secondary")
    await store.create_disk("a", "d", SIZE)
    await store.create_disk("b", "d", SIZE)
    await store.close()
    return store.path


async def test_only_opens_just_that_vm(open_store) -> None:
    path = await _two_vms(open_store)
    store = await Store.open(path, role="secondary", only="a")
    try:
        assert sorted(store.vms) == ["a"]
        assert store.vm("a").disk("d").size == SIZE
        with pytest.raises(NotFound):
            store.vm("b")
    finally:
        await store.close()


async def test_only_creates_just_that_vm(open_store) -> None:
    path = await _two_vms(open_store)
    store = await Store.open(path, role="primary", only="new")
    try:
        assert store.vms == {}
        with pytest.raises(BadArgument, match="serves only VM new"):
            await store.create_vm("other")
        with pytest.raises(BadArgument, match="serves only VM new"):
            await store.create_disk("b", "d2", SIZE)
        assert not os.path.exists(os.path.join(path, "other"))
        assert not os.path.exists(os.path.join(path, "b", "d2"))
        vm = await store.create_vm("new")
        assert vm.state.role == "primary"
        await store.create_disk("new", "d", SIZE)
    finally:
        await store.close()
    full = await Store.open(path, role="secondary")
    try:
        assert sorted(full.vms) == ["a", "b", "new"]
    finally:
        await full.close()


async def test_only_recovers_its_vm_and_leaves_the_others_crashed(open_store) -> None:
    """Crash recovery runs for the scoped VM; the other crashed VM is left for its own process."""
    store = await open_store(role="secondary")
    for name in ("a", "b"):
        await store.create_disk(name, "d", SIZE)
        vm = store.vm(name)
        await vm.apply_primary(1, [PrimaryWrite("d", 0, b"A" * 4096)])
        await vm.checkpoint(1)
        await vm.apply_primary(2, [PrimaryWrite("d", 0, b"B" * 4096)])
    store.abandon()  # a crash: both VMs have writes after their checkpoint

    b_state = open(os.path.join(store.path, "b", "state"), "rb").read()
    scoped = await Store.open(store.path, role="secondary", only="a")
    try:
        assert scoped.vm("a").recovery.action == "rolled-back"
        assert await scoped.vm("a").disk("d").read(0, 4096) == b"A" * 4096
    finally:
        await scoped.close()
    # b was neither recovered nor marked clean by a's process.
    assert open(os.path.join(store.path, "b", "state"), "rb").read() == b_state
    full = await Store.open(store.path, role="secondary")
    try:
        assert full.vm("b").recovery.action == "rolled-back"
        assert full.vm("a").recovery.action != "rolled-back"
    finally:
        await full.close()


async def test_only_a_missing_vm_opens_empty_and_a_bad_name_is_refused(open_store) -> None:
    path = await _two_vms(open_store)
    store = await Store.open(path, role="secondary", only="missing")
    try:
        assert store.vms == {}
    finally:
        await store.close()
    with pytest.raises(InvalidName):
        await Store.open(path, role="secondary", only="../a")
