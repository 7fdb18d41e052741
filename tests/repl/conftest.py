"""Two stores in one process, a secondary server and a primary replicator between them on 127.0.0.1.

Each node has its own NonceRegistry (two nodes in one process would
otherwise see each other's challenges as reflections). Everything runs in a
nursery owned by the fixture and is cancelled, and the stores abandoned, at
the end of each test.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable

import pytest
import trio

from colofs.core import Store
from colofs.repl import (
    PrimaryReplicator,
    ReplConfig,
    SecondaryHooks,
    SecondaryServer,
    serve_secondary,
)
from colofs.wire import NonceRegistry
from tests.repl.proxy import FaultProxy
from tests.waiting import DEADLINE, wait_until

__all__ = ["FAST", "Pair", "base_of", "file_bytes", "wait_until"]  # wait_until: re-exported for the repl tests

FAST = ReplConfig(
    reconnect_min=0.01,
    reconnect_max=0.1,
    connect_timeout=2.0,
    handshake_timeout=3.0,
    ping_interval=0.2,
    peer_timeout=3.0,
    checkpoint_timeout=10.0,
    scan_interval=0.05,
)


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def base_of(disk: object) -> bytes:
    """The disk's base image as stored (the secondary's mirror), padded to its size."""
    data = file_bytes(os.path.join(disk.path, "base.raw"))  # type: ignore[attr-defined]
    return data + bytes(disk.size - len(data))  # type: ignore[attr-defined]


class Pair:
    """A primary store replicating to a secondary store."""

    def __init__(self, nursery: trio.Nursery, root: str) -> None:
        self.nursery = nursery
        self.root = root
        self.key: bytes | None = secrets.token_bytes(32)
        self.primary: Store | None = None
        self.secondary: Store | None = None
        self.server: SecondaryServer | None = None
        self.repl: PrimaryReplicator | None = None
        self.proxy: FaultProxy | None = None
        self.cfg = FAST
        self.port = 0
        self.primary_nonces = NonceRegistry()
        self.secondary_nonces = NonceRegistry()
        self._server_scope: trio.CancelScope | None = None
        self._server_done: trio.Event | None = None
        self._repl_scope: trio.CancelScope | None = None
        self._repl_done: trio.Event | None = None

    @property
    def pdir(self) -> str:
        return os.path.join(self.root, "primary")

    @property
    def sdir(self) -> str:
        return os.path.join(self.root, "secondary")

    async def open_stores(self) -> None:
        self.primary = await Store.open(self.pdir, role="primary", create=True)
        self.secondary = await Store.open(self.sdir, role="secondary", create=True)

    # -- secondary -------------------------------------------------------------------

    async def start_secondary(self, port: int = 0, key: bytes | None | str = "same",
                              hooks: SecondaryHooks | None = None) -> SecondaryServer:
        if self.secondary is None:
            self.secondary = await Store.open(self.sdir, role="secondary", create=True)
        use_key = self.key if key == "same" else key

        async def run(task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
            done = trio.Event()
            self._server_done = done
            try:
                with trio.CancelScope() as scope:
                    self._server_scope = scope
                    await serve_secondary(self.secondary, ("127.0.0.1", port), use_key,
                                          config=self.cfg, nonces=self.secondary_nonces, hooks=hooks,
                                          task_status=task_status)
            finally:
                done.set()

        self.server = await self.nursery.start(run)
        self.port = self.server.port
        return self.server

    async def stop_secondary(self) -> None:
        if self._server_scope is not None:
            self._server_scope.cancel()
            await self._server_done.wait()
            self._server_scope = None

    async def kill_secondary(self) -> None:
        """As SIGKILL would: stop serving and drop the store without a clean close."""
        await self.stop_secondary()
        self.secondary.abandon()
        self.secondary = None

    # -- primary -----------------------------------------------------------------------

    async def start_primary(self, peer_port: int | None = None, key: bytes | None | str = "same",
                            config: ReplConfig | None = None) -> PrimaryReplicator:
        use_key = self.key if key == "same" else key
        port = peer_port if peer_port is not None else self.port
        self.repl = PrimaryReplicator(self.primary, ("127.0.0.1", port), use_key,
                                      config=config or self.cfg, nonces=self.primary_nonces)

        async def run(task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
            done = trio.Event()
            self._repl_done = done
            try:
                with trio.CancelScope() as scope:
                    self._repl_scope = scope
                    await self.repl.run(task_status=task_status)
            finally:
                done.set()

        await self.nursery.start(run)
        return self.repl

    async def stop_primary(self) -> None:
        if self._repl_scope is not None:
            self._repl_scope.cancel()
            await self._repl_done.wait()
            self._repl_scope = None

    async def start_proxy(self, budget: Callable[[], int | None] = lambda: None) -> FaultProxy:
        self.proxy = FaultProxy(self.port, budget)
        await self.nursery.start(self.proxy.run)
        return self.proxy

    async def start_proxied(self, size: int) -> FaultProxy:
        """Stores, one disk ``vm/d0`` of ``size``, a secondary, a proxy and a primary through it; caught up."""
        await self.open_stores()
        await self.primary.create_disk("vm", "d0", size)
        await self.start_secondary()
        proxy = await self.start_proxy()
        await self.start_primary(peer_port=proxy.port)
        await self.caught_up()
        return proxy

    # -- checks ---------------------------------------------------------------------------

    def link(self, vm: str = "vm"):
        return self.repl.links[vm]

    async def caught_up(self, vm: str = "vm", timeout: float = DEADLINE) -> None:
        link = self.link(vm)
        pvm = self.primary.vm(vm)
        await wait_until(lambda: link.state == "streaming" and link.acked == pvm.state.last_applied,
                         timeout, f"VM {vm} to be caught up")

    async def assert_identical(self, vm: str = "vm") -> None:
        """After a checkpoint: primary disk == secondary base == secondary view, every disk."""
        pvm = self.primary.vm(vm)
        svm = self.secondary.vm(vm)
        assert sorted(pvm.disks) == sorted(svm.disks)
        for name, pdisk in pvm.disks.items():
            sdisk = svm.disks[name]
            assert (sdisk.size, sdisk.block_size) == (pdisk.size, pdisk.block_size)
            pimg = bytes(await pdisk.read(0, pdisk.size))
            assert base_of(pdisk) == pimg
            assert base_of(sdisk) == pimg, f"{vm}/{name}: secondary base differs from the primary"
            assert bytes(await sdisk.read(0, sdisk.size)) == pimg, f"{vm}/{name}: secondary view differs"

    def close(self) -> None:
        for s in (self.primary, self.secondary):
            if s is not None:
                s.abandon()


@pytest.fixture
async def pair(tmp_path) -> AsyncIterator[Pair]:
    async with trio.open_nursery() as nursery:
        p = Pair(nursery, str(tmp_path))
        try:
            yield p
        finally:
            nursery.cancel_scope.cancel()
    p.close()


@pytest.fixture
def repl_errors(caplog) -> Callable[[], list[str]]:
    """Log records of internal errors (bugs), which no test may produce."""
    caplog.set_level(logging.INFO, logger="colofs")

    def bugs() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if "internal error" in r.getMessage() or r.levelno >= logging.CRITICAL]

    return bugs
