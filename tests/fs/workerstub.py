"""A stand-in supervisor for tests of one VM's worker process, alone.

No supervisor runs: the "root mount" is a plain directory MOUNTPOINT (or any
mount), the worker mounts its VM-rooted filesystem on MOUNTPOINT/VM, and the
test speaks the channel's protocol (docs/processes.md) through
:class:`Supervisor`. Each worker is a subprocess running
``colofs.workers.worker.main``, started as the zygote leaves a worker (SIGPIPE
at its default); whatever happens, :meth:`Supervisor.cleanup` kills it and
detaches its mount.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio

from colofs.core import Store
from colofs.fs.mountpoint import fuse_unmount, mount_type
from colofs.workers.channel import Channel, WorkerArgs, channel_pair
from tests.waiting import wait_until

XATTR = "user.colofs."
MiB = 1 << 20
ENTRY = ("import json, signal, sys\n"
         "signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as the zygote leaves a worker\n"
         "from colofs.workers.channel import WorkerArgs\n"
         "from colofs.workers.worker import main\n"
         "sys.exit(main(WorkerArgs.from_json(json.loads(sys.argv[1]))))\n")


class Supervisor:
    """The test's stand-in for a supervisor: one worker subprocess and its channel."""

    def __init__(self, base: Path, role: str, vm: str = "vm0", options: tuple[str, ...] = ()) -> None:
        self.store = str(base / "store")
        self.mnt = base / "mnt"
        self.mnt.mkdir(parents=True, exist_ok=True)  # several stand-ins may share one root
        self.options = options
        self.vm = vm
        self.role = role
        self.vm_mount = str(self.mnt / vm)
        self.messages: list[dict[str, Any]] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: Channel | None = None

    def argv(self) -> list[str]:
        return ["--role", self.role, "--store", self.store, *self.options, "--workers", str(self.mnt)]

    async def start(self, nursery: trio.Nursery, *, create_vm: str | None = None, restarts: int = 0,
                    env: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> None:
        ours, theirs = channel_pair()
        args = WorkerArgs(vm=self.vm, argv=self.argv(), restarts=restarts, create_vm=create_vm,
                          channel_fd=theirs.fileno(), extra=dict(extra or {}))
        self.proc = subprocess.Popen([sys.executable, "-c", ENTRY, json.dumps(args.to_json())],
                                     pass_fds=[theirs.fileno()], env=env)
        theirs.close()
        self.channel = Channel(ours, label="test supervisor")
        nursery.start_soon(self.channel.run, self._handle)

    async def _handle(self, msg: dict[str, Any], fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        self.messages.append(msg)

    def got(self, op: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("op") == op]

    async def wait_for(self, op: str) -> dict[str, Any]:
        found = await wait_until(lambda: self.got(op) or self.got("failed"), what=f"the worker's {op}")
        assert found[0]["op"] == op, f"the worker failed: {found[0]}"
        return found[0]

    async def exit_status(self) -> int:
        assert self.proc is not None
        return await trio.to_thread.run_sync(lambda: self.proc.wait(timeout=60))

    def mounted(self) -> bool:
        return mount_type(self.vm_mount) is not None

    def cleanup(self) -> None:
        """Kill the worker if it still runs and detach its mount: a failed test leaves nothing behind."""
        if self.channel is not None:
            self.channel.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=60)
        if self.mounted():
            fuse_unmount(self.vm_mount, lazy=True)


@contextlib.asynccontextmanager
async def supervising(base: Path, role: str, *, create_store: bool = True,
                      options: tuple[str, ...] = ()) -> AsyncIterator[tuple[Supervisor, trio.Nursery]]:
    sup = Supervisor(base, role, options=options)
    if create_store:
        store = await Store.open(sup.store, role=role, create=True)
        await store.close()
    try:
        async with trio.open_nursery() as nursery:
            yield sup, nursery
            nursery.cancel_scope.cancel()
    finally:
        sup.cleanup()


def status(path: str) -> dict[str, Any]:
    return json.loads(os.getxattr(path, XATTR + "status"))

