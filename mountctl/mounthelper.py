"""``mount -t fuse.colofs`` and ``/etc/fstab``: the mount helper, a front for ``mountctl mount``.

mount(8) runs ``/sbin/mount.fuse.colofs STORE MOUNTPOINT [-sfnv] -o OPTIONS``
when that file exists. Without it, mount(8) falls back to ``mount.fuse3``,
which runs ``colofs STORE MOUNTPOINT -o OPTIONS`` from ``PATH`` (after
dropping ``_netdev`` and ``nofail``). Both names are console scripts for this
module, so either path works. The options map onto ``mountctl mount``'s flags
(``role=secondary,listen=H:P,key_file=F`` is ``--role secondary --listen H:P
--key-file F``); generic ones that only mean something to mount(8), systemd
or the kernel's generic layer (``_netdev``, ``nofail``, ``defaults``,
``noauto``, ``rw``, ``x-systemd.*``, ...) are ignored. The helper returns
once the mount answers, like ``mountctl mount``, and exits with mount(8)'s
codes: 1 for a bad option, 32 for a mount that failed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mountctl.client import CtlError

USAGE_ERROR = 1  # mount(8): incorrect invocation
MOUNT_FAILURE = 32  # mount(8): mount failure

# option -> mountctl mount flag; both spellings (key_file, key-file) are read
VALUED = {
    "role": "--role",
    "listen": "--listen",
    "peer": "--peer",
    "key_file": "--key-file",
    "log_file": "--log-file",
    "tls_cert": "--tls-cert",
    "tls_key": "--tls-key",
    "tls_ca": "--tls-ca",
    "nbd_socket": "--nbd-socket",
    "nbd_listen": "--nbd-listen",
    "timeout": "--timeout",
}
FLAGS = {"allow_other": "--allow-other", "debug": "--debug"}

# Options meant for mount(8), systemd, fstab tools or the generic mount layer: no meaning for colofs.
IGNORED = {
    "_netdev", "nofail", "defaults", "auto", "noauto", "rw", "user", "nouser", "users", "owner",
    "group", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "async", "atime", "noatime",
    "relatime", "strictatime", "lazytime", "nodiratime", "diratime", "loud", "silent",
    "default_permissions",
}
IGNORED_VALUED = {"subtype", "fsname", "comment"}


class OptionError(ValueError):
    """An ``-o`` option colofs cannot take; the message names it."""


def mount_args(options: str, *, sloppy: bool = False) -> list[str]:
    """``mountctl mount`` flags for a comma-separated ``-o`` string (raises :class:`OptionError`)."""
    args: list[str] = []
    role = None
    for opt in filter(None, (o.strip() for o in options.split(","))):
        name, sep, value = opt.partition("=")
        key = name.replace("-", "_")
        if name in IGNORED or name.startswith("x-") or key in IGNORED_VALUED:
            continue
        if name == "ro":
            raise OptionError("ro: a colofs mount is read-write (its VMs write their disks)")
        if key in FLAGS and not sep:
            args.append(FLAGS[key])
        elif key in VALUED and sep and value:
            args += [VALUED[key], value]
            role = value if key == "role" else role
        elif key in VALUED:
            raise OptionError(f"{name}: needs a value ({name}=...)")
        elif key in FLAGS:
            raise OptionError(f"{name}: takes no value")
        elif not sloppy:
            known = ", ".join(sorted([*VALUED, *FLAGS]))
            raise OptionError(f"unknown option {opt!r} (colofs takes {known})")
    if role is None:
        raise OptionError("role=primary or role=secondary is required")
    return args


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The command line mount(8) and mount.fuse3 use: SOURCE DIR [-sfnv] [-o OPTIONS] [-t TYPE]."""
    p = argparse.ArgumentParser(prog="mount.fuse.colofs",
                                description="Mount a colofs store: mount -t fuse.colofs STORE DIR -o OPTIONS")
    p.add_argument("store", metavar="STORE")
    p.add_argument("mountpoint", metavar="DIR")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS")
    p.add_argument("-t", dest="type", metavar="TYPE", help="fuse.colofs (given by mount(8); ignored)")
    p.add_argument("-s", dest="sloppy", action="store_true", help="ignore options colofs does not know")
    p.add_argument("-f", dest="fake", action="store_true", help="check the options, do not mount")
    p.add_argument("-n", dest="nomtab", action="store_true", help="(ignored: the kernel keeps the table)")
    p.add_argument("-v", dest="verbose", action="store_true", help="say what is run")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from mountctl.cli import build_parser

    try:
        args = parse(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:
        return 0 if e.code == 0 else USAGE_ERROR
    store = args.store.split("#", 1)[-1]  # the old "colofs#STORE" spelling of fstab's first field
    try:
        flags = mount_args(",".join(args.options), sloppy=args.sloppy)
    except OptionError as e:
        print(f"mount.fuse.colofs: {e}", file=sys.stderr)
        return USAGE_ERROR
    ctl = ["mount", *flags, "--store", store, args.mountpoint]
    if args.verbose:
        print("mount.fuse.colofs: mountctl " + " ".join(ctl), file=sys.stderr)
    parser = build_parser()
    try:
        ns = parser.parse_args(ctl)
    except SystemExit:
        return USAGE_ERROR
    if args.fake:
        return 0
    try:
        return MOUNT_FAILURE if ns.func(ns, parser) else 0
    except SystemExit as e:  # a configuration error (argparse's error() from the shared checks)
        return 0 if e.code == 0 else USAGE_ERROR
    except CtlError as e:
        print(f"mount.fuse.colofs: {e}", file=sys.stderr)
        return MOUNT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
