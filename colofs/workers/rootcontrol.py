"""The root's control that runs in the VMs' workers, and the status of a VM no worker serves.

With a worker per VM the root of the mount (:mod:`colofs.workers.rootfs`)
holds no VM itself: a root ``create`` or ``import`` names a VM, and runs in
that VM's worker (one started for it if the VM is new); a VM directory the
worker does not cover (starting, crashed, failed) answers its status from
what the supervisor knows of the worker.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from colofs.core.names import check_name
from colofs.fs.control import CREATE
from colofs.fs.values import Refused, int_field, parse_json, str_field
from colofs.workers.channel import RemoteError
from colofs.workers.fleet import Fleet
from colofs.workers.table import STARTING, Table

COMMAND_TIMEOUT = 600.0
"""How long a create or import may take in its worker (an import copies the image)."""


class RootCommands:
    """The root's ``create`` and ``import``, each run in its VM's worker."""

    def __init__(self, fleet: Fleet, role: str) -> None:
        self.fleet = fleet
        self.role = role
        self._commands: dict[str, int] = {}  # create/import requests under way, per VM

    async def run(self, key: str, value: bytes) -> dict[str, Any]:
        """Run the root's ``create`` or ``import`` (``value``: its JSON) in the VM's worker; its ``last_result``.

        A VM not on this host yet gets a worker started for the command, which
        makes the VM only if the command succeeds; if it fails, and no other
        command for that VM is under way, the VM is forgotten at once.
        """
        req = parse_json(value, key)
        vm = check_name("VM", str_field(req, "vm", key))
        fields: dict[str, Any] = {"vm": vm, "disk": check_name("disk", str_field(req, "disk", key))}
        if key == CREATE:
            fields["size"] = int_field(req, "size", key)
            fields["block_size"] = int_field(req, "block_size", key, 4096)
        else:
            source = str_field(req, "source", key)
            if not os.path.isabs(source):
                raise Refused(errno.EINVAL, f"import: source {source!r} must be an absolute path")
            fields["source"] = source
            for opt in ("size", "block_size"):
                if opt in req:
                    fields[opt] = int_field(req, opt, key)
        fleet = self.fleet
        w = fleet.table.get(vm)
        if w is None:
            await fleet.start(vm, create_vm=self.role, on_command=True)  # made only if the command succeeds
        elif not (w.opened and w.pid is not None) and w.state != STARTING:
            raise RemoteError(f"{key}: VM {vm}: its worker is {w.state}, not serving; try again", errno.EAGAIN)
        op = "create_disk" if key == CREATE else "import_disk"
        self._commands[vm] = self._commands.get(vm, 0) + 1
        try:
            return await fleet.call(vm, op, COMMAND_TIMEOUT, **fields)
        except BaseException:
            if self._commands[vm] == 1:
                fleet.forget_pending(vm)  # a VM no command made: gone from the root at once, as in one process
            raise
        finally:
            self._commands[vm] -= 1
            if not self._commands[vm]:
                del self._commands[vm]


def unserved_vm_status(table: Table, vm: str) -> dict[str, Any]:
    """A VM whose worker does not serve: its worker's state, and what the supervisor last heard.

    The VM's own figures (sequence numbers, disks) are its worker's to give; they read as
    unknown (None) here, and ``phase`` says why (``worker-crashed``), so a reader of the usual
    VM status keys still finds each of them.
    """
    w = table.get(vm)
    state = w.state if w is not None else "missing"
    return {"kind": "vm", "vm": vm, "worker": w.status() if w is not None else {"state": state},
            "role": (w.role if w is not None else None) or "unknown", "phase": f"worker-{state}",
            "epoch": None, "last_checkpoint": None, "last_applied": None, "disks": {}, "pending": [],
            "peer": {"state": f"unknown: the VM's worker is {state}"}}
