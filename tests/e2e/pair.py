"""Two real colofs daemons on 127.0.0.1, a primary replicating into a secondary: :mod:`mountctl.pair` for tests.

The harness generates the key, finds the port, mounts with mountctl and cleans
up by the daemons' own PIDs. This adds what tests need on top: mounts that fail
like a test (``tests/fs/mounts.Mount``), the tests' waits, an optional
fault-injection proxy (``tests/repl/proxy.py``, in a thread of its own) between
the two, and the reads and writes tests make through the mounts.
"""

from __future__ import annotations

import json
import mmap
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from mountctl.pair import Pair as HarnessPair
from tests.fs.mounts import Mount, mountctl
from tests.repl.proxy import FaultProxy
from tests.waiting import DEADLINE, wait_until_sync

MiB = 1 << 20
T = TypeVar("T")


def read_file(path: Path, *, direct: bool = False) -> bytes:
    """The whole file: through the page cache (what a VM sees), or with O_DIRECT (what the daemon answers)."""
    if not direct:
        with open(path, "rb") as f:
            return f.read()
    size = os.stat(path).st_size
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, size)
        with buf:
            n = os.preadv(fd, [buf], 0)
            assert n == size, (n, size)
            return bytes(buf)
    finally:
        os.close(fd)


def direct_pwrite(path: Path, offset: int, data: bytes) -> None:
    """An O_DIRECT write (offset and length multiples of 4096)."""
    buf = mmap.mmap(-1, len(data))
    with buf:
        buf.write(data)
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        try:
            assert os.pwrite(fd, buf, offset) == len(data)
        finally:
            os.close(fd)


class ProxyThread:
    """A :class:`FaultProxy` run by trio in a thread; ``cutting`` switches its cuts on and off."""

    def __init__(self, target_port: int, budget: Callable[[], int | None]) -> None:
        self.proxy = FaultProxy(target_port, budget)
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(self.proxy.run)
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def start(self) -> int:
        self._thread.start()
        assert self._ready.wait(10), "the proxy did not start"
        return self.proxy.port

    def cut_all(self) -> None:
        """Cut the connections open now (each new one asks the budget again)."""
        assert self._token is not None
        trio.from_thread.run_sync(self.proxy.cut_all, trio_token=self._token)

    def stop(self) -> None:
        if self._token is not None and self._thread.is_alive():
            assert self._stop is not None
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            self._thread.join(10)


class Pair(HarnessPair):
    """The harness's pair with tests' mounts (``sec``/``pri``), tests' waits and an optional fault proxy."""

    node_class = Mount

    def __init__(self, base: Path) -> None:
        super().__init__(base)
        self.base = base
        self.proxy: ProxyThread | None = None

    @property
    def sec(self) -> Mount:
        return self.secondary  # type: ignore[return-value]

    @property
    def pri(self) -> Mount:
        return self.primary  # type: ignore[return-value]

    def wait(self, pred: Callable[[], T], timeout: float, what: str) -> T:
        return wait_until_sync(pred, timeout, what)

    def start(self, *, budget: Callable[[], int | None] | None = None) -> Pair:
        """Mount both; with ``budget``, through a proxy that cuts each connection after that many bytes."""
        self.mount_secondary()
        via = None
        if budget is not None:
            self.proxy = ProxyThread(self.port, budget)
            via = self.proxy.start()
        self.mount_primary(via=via)
        return self

    def cleanup(self) -> None:
        try:
            super().cleanup()
        finally:
            if self.proxy is not None:
                self.proxy.stop()

    # -- driving and looking ---------------------------------------------------------

    def pfile(self, vm: str = "vm1", disk: str = "d0") -> Path:
        return self.primary.file(vm, disk)

    def sfile(self, vm: str = "vm1", disk: str = "d0") -> Path:
        return self.secondary.file(vm, disk)

    def checkpoint(self, vm: str = "vm1", *, timeout: float = 30) -> dict[str, Any]:  # type: ignore[override]
        """``mountctl checkpoint`` on the primary, the command itself; the daemon's outcome."""
        res = mountctl("checkpoint", "--json", "--timeout", str(timeout), self.pri.path(vm), timeout=timeout + 30)
        return json.loads(res.stdout)

    @staticmethod
    def status(which: Mount) -> dict[str, Any]:
        """The root status, read as ``mountctl status --json`` does (without starting an interpreter)."""
        return which.read_status()

    def vm_status(self, which: Mount, vm: str = "vm1") -> dict[str, Any] | None:
        """The VM directory's status (the root's names the VMs only); None while there is no such VM."""
        return which.vm_status(vm)

    def peer(self, which: Mount, vm: str = "vm1") -> dict[str, Any]:
        st = self.vm_status(which, vm)
        return st["peer"] if st else {}

    def wait_disk(self, vm: str, disk: str, size: int, timeout: float = DEADLINE) -> Path:  # type: ignore[override]
        """The disk shows on the secondary's mount with this size."""
        f = self.sfile(vm, disk)
        wait_until_sync(lambda: f.exists() and os.stat(f).st_size == size, timeout, f"{vm}/{disk} on the secondary",
                        catch=(OSError,))
        return f

    def wait_caught_up(self, vm: str = "vm1", timeout: float = DEADLINE) -> None:
        self.wait_applied(vm, timeout)
