"""The root's ``create`` and ``import``: a new disk (and its VM if new), empty or filled from a raw image.

A part of the control plane (:mod:`colofs.fs.control`): set as the root's
``user.colofs.create``/``import`` (JSON), or asked by a supervisor of the
worker serving the VM (:meth:`DiskCommands.root_command`). A failure leaves
the store as it was.
"""

from __future__ import annotations

import errno
import os
import time
from typing import Any

import trio

from colofs.core.disk import Disk
from colofs.core.disksize import DiskTooLarge
from colofs.core.errors import AlreadyExists, ColofsError
from colofs.core.imagesource import ImageSource, SourceChanged, open_image
from colofs.core.names import check_name
from colofs.core.provision import create_disk
from colofs.core.store import Store
from colofs.fs.errnos import errno_for
from colofs.fs.inodes import DISK_SUFFIX, InodeTable, Kind, Node
from colofs.fs.replication import Replication
from colofs.fs.values import Refused, int_field, parse_json, str_field

CREATE = "create"
IMPORT = "import"
QCOW2_MAGIC = b"QFI\xfb"


class DiskCommands:
    """Creates and imports disks in the store of one mount (``mountpoint``: where their files show)."""

    def __init__(self, store: Store, inodes: InodeTable, repl: Replication, mountpoint: str) -> None:
        self.store = store
        self.inodes = inodes
        self.repl = repl
        self.mountpoint = mountpoint

    def _check_not_pending(self, vm: str, disk: str) -> None:
        node = self.inodes.disk_node(vm, disk)
        if node is not None and node.kind is Kind.PENDING:
            raise AlreadyExists(
                f"{vm}/{disk}{DISK_SUFFIX} is a pending file: give it a size with truncate, or remove it"
            )

    async def create(self, node: Node, value: bytes) -> dict[str, Any]:
        return await self._create_disk(parse_json(value, CREATE))

    async def root_command(self, key: str, req: dict[str, Any]) -> dict[str, Any]:
        """The root's ``create`` or ``import`` asked by a supervisor (no FUSE request): its ``last_result``.

        Raises what the xattr would fail with (:class:`Refused`, a ``ColofsError``).
        """
        commands = {CREATE: self._create_disk, IMPORT: self._import_disk}
        if key not in commands:
            raise Refused(errno.EINVAL, f"{key}: not a command of the root (only {CREATE}, {IMPORT})")
        started = time.monotonic()
        result = await commands[key](req)
        return {"ok": True, "op": key, "target": "/", "seconds": round(time.monotonic() - started, 6), **result}

    async def _create_disk(self, req: dict[str, Any]) -> dict[str, Any]:
        vm = check_name("VM", str_field(req, "vm", CREATE))
        disk = check_name("disk", str_field(req, "disk", CREATE))
        size = int_field(req, "size", CREATE)
        block_size = int_field(req, "block_size", CREATE, 4096)
        d = await self._new_disk(CREATE, vm, disk, size, block_size)
        return {"vm": vm, "disk": disk, "size": d.size, "block_size": d.block_size,
                "file": os.path.join(self.mountpoint, vm, disk + DISK_SUFFIX)}

    async def _new_disk(self, op: str, vm: str, disk: str, size: int, block_size: int,
                        source: ImageSource | None = None) -> Disk:
        """Create the disk (and its VM if new); a failure leaves the store as it was."""
        self._check_not_pending(vm, disk)
        try:
            d = await create_disk(self.store, vm, disk, size, block_size=block_size, source=source)
        except DiskTooLarge as e:
            raise Refused(errno.EFBIG, f"{op}: {e}") from None
        except SourceChanged as e:
            raise Refused(errno.EBUSY, f"{op}: {e}") from None
        self.repl.vm_created(vm)
        return d

    async def import_(self, node: Node, value: bytes) -> dict[str, Any]:
        return await self._import_disk(parse_json(value, IMPORT))

    async def _import_disk(self, req: dict[str, Any]) -> dict[str, Any]:
        vm = check_name("VM", str_field(req, "vm", IMPORT))
        disk = check_name("disk", str_field(req, "disk", IMPORT))
        source = str_field(req, "source", IMPORT)
        if not os.path.isabs(source):
            raise Refused(errno.EINVAL, f"import: source {source!r} must be an absolute path")
        try:
            # Never a blocking open (a FIFO would hold the root until written), and off the loop:
            # the image may sit on a slow file system.
            image = await trio.to_thread.run_sync(open_image, source)
        except OSError as e:
            raise Refused(e.errno or errno.EIO, f"import: {source}: {e.strerror}") from None
        except ColofsError as e:
            raise Refused(errno_for(e), f"import: {e}") from None
        with image:
            if await trio.to_thread.run_sync(image.magic) == QCOW2_MAGIC:
                raise Refused(
                    errno.EINVAL,
                    f"import: {source} is a qcow2 image; import raw images (qemu-img convert -O raw), "
                    "or qemu-img convert it straight into the mounted disk file",
                )
            size = int_field(req, "size", IMPORT, (image.size + 511) // 512 * 512 or 512)
            block_size = int_field(req, "block_size", IMPORT, 4096)
            d = await self._new_disk(IMPORT, vm, disk, size, block_size, image)
        return {"vm": vm, "disk": disk, "size": d.size, "block_size": d.block_size, "source": source,
                "source_bytes": image.size, "source_kind": image.kind,
                "file": os.path.join(self.mountpoint, vm, disk + DISK_SUFFIX)}
