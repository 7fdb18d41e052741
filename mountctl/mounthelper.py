"""``mount -t fuse.colofs`` and ``/etc/fstab``: the mount helper, a front for ``mountctl mount``.

mount(8) runs ``/sbin/mount.fuse.colofs STORE MOUNTPOINT [-sfnv] -o OPTIONS``
when that file exists. Without it, mount(8) falls back to ``mount.fuse3``,
which runs ``colofs STORE MOUNTPOINT -o OPTIONS`` from ``PATH`` (after
dropping ``_netdev`` and ``nofail``). Both names are console scripts for this
module, so either path works. Every option of ``mountctl mount`` (save the
store, which is the source, and ``--foreground``) is an ``-o`` option of the
same name (``role=secondary,listen=H:P,key_file=F,metrics=H:P`` is ``--role
secondary --listen H:P --key-file F --metrics H:P``); generic ones that only mean something to mount(8), systemd
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

# ``mountctl mount`` flags a mount helper cannot pass on: the store is the source, and mount(8)
# waits for the helper, which must return once the mount answers rather than stay attached.
NOT_OPTIONS = {"--store", "--foreground", "--help"}

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


def mount_options(parser: argparse.ArgumentParser | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """``(valued, flags)``: each ``-o`` name (``key_file``) and the ``mountctl mount`` flag it stands for.

    Read from the ``mount`` parser itself, so every option the daemon takes
    (``metrics``, ``nbd_listen``, ``tls_ca``, ...) is an ``-o`` option and a
    new one needs no second list here. Flags are the options taking no value.
    """
    if parser is None:
        parser = _mount_parser()
    valued: dict[str, str] = {}
    flags: dict[str, str] = {}
    for action in parser._actions:
        long = [o for o in action.option_strings if o.startswith("--") and o not in NOT_OPTIONS]
        if not long:
            continue
        name = long[0][2:].replace("-", "_")
        (flags if action.nargs == 0 else valued)[name] = long[0]
    return valued, flags


def _mount_parser() -> argparse.ArgumentParser:
    """``mountctl mount``'s parser (its options are the daemon's, from :mod:`colofs.fs.config`)."""
    from mountctl.cli import build_parser

    top = build_parser()
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices["mount"]
    raise RuntimeError("mountctl has no mount command")


def mount_args(options: str, *, sloppy: bool = False) -> list[str]:
    """``mountctl mount`` flags for a comma-separated ``-o`` string (raises :class:`OptionError`)."""
    valued, flags = mount_options()
    args: list[str] = []
    role = None
    for opt in filter(None, (o.strip() for o in options.split(","))):
        name, sep, value = opt.partition("=")
        key = name.replace("-", "_")
        if name in IGNORED or name.startswith("x-") or key in IGNORED_VALUED:
            continue
        if name == "ro":
            raise OptionError("ro: a colofs mount is read-write (its VMs write their disks)")
        if key in flags and not sep:
            args.append(flags[key])
        elif key in valued and sep and value:
            args += [valued[key], value]
            role = value if key == "role" else role
        elif key in valued:
            raise OptionError(f"{name}: needs a value ({name}=...)")
        elif key in flags:
            raise OptionError(f"{name}: takes no value")
        elif not sloppy:
            known = ", ".join(sorted([*valued, *flags]))
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
    from colofs.fs.config import ConfigError, config_from_args
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
    if args.fake:  # mount -f: everything but the mount, so the configuration is checked too
        try:
            config_from_args(ns)
        except ConfigError as e:
            print(f"mount.fuse.colofs: {e}", file=sys.stderr)
            return USAGE_ERROR
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
