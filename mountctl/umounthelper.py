"""Plain ``umount`` of a colofs mount: the helper umount(8) runs, a front for ``mountctl umount``.

umount(8) runs ``/sbin/umount.fuse.colofs DIR [-nlfvr] [-t TYPE]`` for a
mount of type ``fuse.colofs`` when that file exists (systemd's mount units
and ``umount -R`` go through it too). Without it, a plain ``umount`` of a
mount with a worker per VM fails with ``EBUSY``, since each VM directory is
a mount of its own on top of the root; with it:

- the root of a mount is stopped as ``mountctl umount`` stops it: every VM
  closed cleanly, then the root unmounted, and the helper returns once the
  daemon let go of the store (``-l``: detach now, as ``mountctl umount
  --lazy``);
- a VM's own mount (its worker's) is unmounted alone; the worker closes that
  VM and is not restarted (``umount -R`` and systemd unmount these first);
- a stale mount (its daemon gone) is detached.

The actual unmounts go through ``fusermount3``, which never calls a helper.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from colofs.fs.mountpoint import MountpointError, detach_stale, fuse_unmount
from mountctl.client import CtlError, resolve
from mountctl.mounting import unmount

FAILURE = 32  # umount(8): unmount failure
USAGE_ERROR = 1
TIMEOUT = 300.0


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="umount.fuse.colofs",
                                description="Unmount a colofs mount as mountctl umount does (run by umount(8))")
    p.add_argument("mountpoint", metavar="DIR")
    p.add_argument("-l", dest="lazy", action="store_true", help="detach now; the store closes once unused")
    p.add_argument("-f", dest="force", action="store_true", help="(ignored: colofs always closes cleanly)")
    p.add_argument("-n", dest="nomtab", action="store_true", help="(ignored: the kernel keeps the table)")
    p.add_argument("-r", dest="remount_ro", action="store_true", help="(ignored: a colofs mount is read-write)")
    p.add_argument("-v", dest="verbose", action="store_true", help="say what was done")
    p.add_argument("-t", dest="type", metavar="TYPE", help="fuse.colofs (given by umount(8); ignored)")
    p.add_argument("-N", dest="namespace", metavar="NS", help="(not supported)")
    return p.parse_args(argv)


def umount(path: str, *, lazy: bool) -> str:
    """Unmount ``path`` as the kind of colofs mount it is; what to say (raises CtlError)."""
    try:
        if detach_stale(path):
            return f"{path}: the daemon was gone (stale mount); detached it"
    except MountpointError as e:
        raise CtlError(str(e)) from None
    target = resolve(path)
    if target.kind == "root":
        return unmount(path, lazy=lazy, timeout=TIMEOUT)
    if target.kind == "vm" and os.path.ismount(path):
        ok, msg = fuse_unmount(path, lazy=lazy)
        if not ok:
            raise CtlError(f"unmounting VM {target.status.get('vm')} at {path} failed: {msg}")
        return f"{path}: VM {target.status.get('vm')} unmounted; its worker closes it and is not restarted"
    raise CtlError(f"{path} is not a colofs mountpoint (it is a {target.kind} path)")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:
        return 0 if e.code == 0 else USAGE_ERROR
    if args.namespace:
        print("umount.fuse.colofs: -N is not supported", file=sys.stderr)
        return USAGE_ERROR
    try:
        said = umount(os.path.abspath(args.mountpoint), lazy=args.lazy)
    except CtlError as e:
        print(f"umount.fuse.colofs: {e}", file=sys.stderr)
        return FAILURE
    if args.verbose:
        print(said)
    return 0


if __name__ == "__main__":
    sys.exit(main())
