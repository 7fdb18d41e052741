"""``user.colofs.verify`` on a VM directory: start, cancel and read an online verify.

Setting it (on the primary) starts a verify of the VM against its secondary
and returns at once; the value is empty or JSON options
``{"disk"|"disks", "resync", "rate" (MB/s), "checkpoint_wait", "wait"}``, or
``{"cancel": true}``. Reading it gives the running or last verify (progress,
ETA, then the report), which the VM's status also shows as ``verify``. The
comparison itself is :mod:`colofs.repl.verifier`.
"""

from __future__ import annotations

from typing import Any

from colofs.core.store import Store
from colofs.fs.inodes import Node
from colofs.fs.replication import Replication
from colofs.fs.values import Refused, parse_json
from colofs.repl.verify import VerifyError, parse_options

VERIFY = "verify"


async def start_verify(store: Store, repl: Replication, node: Node, value: bytes) -> dict[str, Any]:
    vm = store.vm(node.vm)
    req = parse_json(value, VERIFY) if value.strip() else {}
    try:
        if req.get("cancel") is True:
            run = repl.cancel_verify(vm)
            return {"vm": vm.name, "id": run.id, "cancelled": True}
        run = repl.start_verify(vm, parse_options(req))
    except VerifyError as e:
        raise Refused(e.code, str(e)) from None
    return {"vm": vm.name, "id": run.id, "started": True, "verify": run.as_dict()}


def verify_value(store: Store, repl: Replication, node: Node) -> dict[str, Any]:
    """What reading the attribute gives: the running or last verify, ``{}`` if there was none."""
    return repl.verify_status(store.vm(node.vm)) or {}


__all__ = ["VERIFY", "start_verify", "verify_value"]
