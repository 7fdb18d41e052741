"""Fixtures for the NBD tests: a store served over in-memory streams (fast, no FUSE), or a real mount."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from colofs.core.store import Store
from colofs.nbd.exports import Exports
from colofs.nbd.service import Limits, Server
from tests.fs.mounts import Mount
from tests.mountable import skip_mount_tests
from tests.nbd.rawclient import RawClient

SIZE = 4 << 20
MOUNTED = Path(__file__).parent / "test_mounted.py"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The mounted tests skip, with the reason, where mounts or the NBD tools are missing."""
    skip_mount_tests(items, MOUNTED, ("fusermount3", "qemu-img", "qemu-io", "nbdinfo", "nbdcopy"))


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    """``mounted(role)``: a real mount serving NBD on ``tmp_path/nbd.sock``; unmounted at the end."""
    made: list[Mount] = []

    def make(role: str = "primary", *extra: str) -> Mount:
        m = Mount(tmp_path, role, f"m{len(made)}")
        made.append(m)
        m.sock = tmp_path / f"nbd{len(made)}.sock"  # type: ignore[attr-defined]
        m.mount("--nbd-socket", str(m.sock), *extra)  # type: ignore[attr-defined]
        return m

    try:
        yield make
    finally:
        for m in made:
            m.cleanup()


class Served:
    """A store, its NBD server, and a way to open client connections to it."""

    def __init__(self, store: Store, server: Server, nursery: trio.Nursery) -> None:
        self.store = store
        self.server = server
        self.nursery = nursery

    async def client(self) -> RawClient:
        client_end, server_end = trio.testing.memory_stream_pair()
        self.server.active += 1
        self.nursery.start_soon(self.server.handle, server_end, "test")
        return RawClient(client_end)

    async def connect(self, name: str = "vm/d", **kw: bool) -> RawClient:
        c = await self.client()
        replies = await c.go(name, **kw)
        assert replies[-1][0] == 1, replies  # ACK
        return c


@pytest.fixture
async def serve(tmp_path) -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    """``await serve(role)``: a store with disk ``vm/d`` of 4 MiB, served; everything closed at the end."""
    stores: list[Store] = []
    async with trio.open_nursery() as nursery:

        async def make(role: str = "secondary", limits: Limits | None = None) -> Served:
            store = await Store.open(os.path.join(tmp_path, f"store-{len(stores)}"), role=role, create=True)
            stores.append(store)
            await store.create_disk("vm", "d", SIZE)
            return Served(store, Server(Exports(store), limits), nursery)

        try:
            yield make
        finally:
            nursery.cancel_scope.cancel()
    for s in stores:
        s.abandon()
