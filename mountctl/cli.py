"""``mountctl``: mount a colofs store and control it through the mount.

Exit status: 0 on success, 1 on a failure (one line on stderr), 2 on a usage
error. Everything but ``mount`` and ``umount`` is a single extended-attribute
call on the mount (see :mod:`colofs.fs.control` for the names), except what
reads lists that grow: ``status`` asks each VM directory for its detail, and
snapshot listings are read page by page.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from colofs.fs.config import ConfigError, add_mount_arguments, config_from_args
from mountctl.client import (
    VM_STATUS_TIMEOUT,
    CtlError,
    Target,
    check_image,
    command,
    expect,
    gather_status,
    remove,
    resolve,
    snapshots,
    vm_detail,
    wait_served,
)
from mountctl.events import add_parser as add_events_parser
from mountctl.mounting import preflight, start_daemon, unmount
from mountctl.render import render_disk, render_root, render_snapshot, render_vm
from mountctl.units import human_bytes, human_seconds, parse_size
from mountctl.verify import add_parser as add_verify_parser


def _vm_disk(text: str, parser: argparse.ArgumentParser) -> tuple[str, str]:
    vm, sep, disk = text.partition("/")
    if not sep or not vm or not disk or "/" in disk:
        parser.error(f"{text!r} is not VM/DISK")
    return vm, disk.removesuffix(".raw")


def _size(text: str, parser: argparse.ArgumentParser, option: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        parser.error(f"{option}: {e}")


def cmd_mount(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        parser.error(str(e))
    preflight(cfg)
    if args.foreground:
        from colofs.mountd import run

        def ready(msg: dict[str, Any]) -> None:
            if msg.get("ready"):
                print(f"mounted {cfg.store} on {cfg.mountpoint} (pid {os.getpid()}, log {cfg.log_file}); "
                      "Ctrl-C or mountctl umount to stop", flush=True)

        return run(cfg, ready=ready, foreground=True)
    msg = start_daemon(cfg, args.timeout)
    for note in msg.get("notes", []):
        print(f"mountctl: {note}", file=sys.stderr)
    vms = msg.get("vms") or []
    print(
        f"mounted {cfg.store} on {cfg.mountpoint}: role {cfg.role}, {len(vms)} VM(s), "
        f"daemon pid {msg.get('pid')}, log {cfg.log_file}"
    )
    if cfg.metrics:
        print(f"Prometheus metrics at http://{cfg.metrics}/metrics")
    if msg.get("nbd"):
        print(f"NBD exports VM/DISK, VM/DISK@SNAPSHOT served on {', '.join(msg['nbd'])}")
    return 0


def cmd_umount(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    print(unmount(args.mountpoint, lazy=args.lazy, timeout=args.timeout))
    return 0


def _root(path: str) -> str:
    target = expect(resolve(path), "root", "give the mountpoint itself")
    return target.path


def cmd_create(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    vm, disk = _vm_disk(args.disk, parser)
    size = _size(args.size, parser, "--size")
    root = _root(args.mountpoint)
    res = command(root, "create", json.dumps({"vm": vm, "disk": disk, "size": size, "block_size": args.block_size}))
    wait_served(root, vm)
    print(f"created {res.get('file')}: {human_bytes(int(res.get('size', size)))}, "
          f"{res.get('block_size')}-byte blocks")
    return 0


def cmd_import(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    vm, disk = _vm_disk(args.disk, parser)
    req: dict[str, Any] = {"vm": vm, "disk": disk, "source": os.path.abspath(args.source),
                           "block_size": args.block_size}
    if args.size is not None:
        req["size"] = _size(args.size, parser, "--size")
    check_image(req["source"])
    root = _root(args.mountpoint)
    res = command(root, "import", json.dumps(req))
    wait_served(root, vm)
    print(f"imported {req['source']} into {res.get('file')}: {human_bytes(int(res.get('size', 0)))} "
          f"in {human_seconds(float(res.get('seconds', 0)))}")
    return 0


def cmd_status(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    root = expect(resolve(args.mountpoint), "root", "give the mountpoint (and optionally VM or VM/DISK)")
    st = root.status
    if not args.what:
        # The root says how many VMs and their names; each VM's directory gives its detail.
        full = gather_status(root, args.timeout)
        print(json.dumps(full, indent=2, sort_keys=True) if args.json else "\n".join(render_root(full)))
        return 0
    vm_name, _, disk_name = args.what.partition("/")
    disk_name = disk_name.removesuffix(".raw") or None
    vm = vm_detail(root.path, vm_name) if vm_name and "/" not in vm_name else None
    if vm is None:
        raise CtlError(f"no VM {vm_name!r} in the colofs mount at {st['mountpoint']}")
    if disk_name is not None and "@" in disk_name:
        return _snapshot_status(st, args.what, args.json)
    if disk_name is not None and disk_name not in vm["disks"]:
        raise CtlError(f"no disk {disk_name!r} in VM {vm_name!r} (mount {st['mountpoint']})")
    if args.json:
        out: Any = vm
        if disk_name is not None:
            out = {"vm": vm_name, "disk": disk_name, "role": vm["role"], "phase": vm["phase"],
                   "epoch": vm["epoch"], **vm["disks"][disk_name]}
        print(json.dumps(out, indent=2, sort_keys=True))
        return 0
    if disk_name is not None:
        print(f"{vm_name} role:{vm['role']} phase:{vm['phase']} epoch:{vm['epoch']}")
        print("\n".join(render_disk(disk_name, vm["disks"][disk_name])))
    else:
        print("\n".join(render_vm(vm)))
    return 0


def _snapshot_status(st: dict[str, Any], what: str, as_json: bool) -> int:
    """``mountctl status MOUNTPOINT VM/DISK@NAME``: ask the snapshot's own file."""
    vm_name, _, file_name = what.partition("/")
    path = os.path.join(st["mountpoint"], vm_name, file_name.removesuffix(".raw") + ".raw")
    target = resolve(path)
    if as_json:
        print(json.dumps(target.status, indent=2, sort_keys=True))
    else:
        print(f"{vm_name}/{render_snapshot(target.status)}")
    return 0


def _vm_target(path: str) -> str:
    return expect(resolve(path), "vm", "give a VM directory: MOUNTPOINT/VM").path


def cmd_checkpoint(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    path = _vm_target(args.vm_dir)
    req: dict[str, Any] = {}
    if args.seq is not None:
        req["seq"] = args.seq
    if args.timeout is not None:
        if not 0 < args.timeout <= 3600:
            parser.error("--timeout: give seconds from 0 to 3600")
        req["timeout"] = args.timeout
    res = command(path, "checkpoint", json.dumps(req) if req else "")
    if args.json:
        print(json.dumps(res, indent=2, sort_keys=True))
    elif res.get("replicated"):
        print(
            f"{res.get('vm')}: checkpoint at seq {res.get('seq')} confirmed by the secondary: "
            f"latency {human_seconds(float(res.get('latency_seconds', 0)))} "
            f"(write-back {human_seconds(float(res.get('writeback_seconds', 0)))}, "
            f"took {human_seconds(float(res.get('seconds', 0)))} in all)"
        )
    else:
        print(
            f"{res.get('vm')}: checkpoint at seq {res.get('seq')}: discarded "
            f"{human_bytes(int(res.get('discarded_active_bytes', 0)))} active and "
            f"{human_bytes(int(res.get('discarded_hidden_bytes', 0)))} hidden; "
            f"took {human_seconds(float(res.get('seconds', 0)))} "
            f"(write-back {human_seconds(float(res.get('writeback_seconds', 0)))}, "
            f"checkpoint {human_seconds(float(res.get('checkpoint_seconds', 0)))}, "
            f"invalidate {human_seconds(float(res.get('invalidate_seconds', 0)))})"
        )
    return 0


def cmd_failover(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    path = _vm_target(args.vm_dir)
    res = command(path, "failover", "")
    closed = f"; closed the session of primary {res['closed_session_of']}" if res.get("closed_session_of") else ""
    print(
        f"{res.get('vm')}: failover complete: {res.get('blocks_committed')} blocks committed "
        f"({human_bytes(int(res.get('active_bytes_before', 0)))} active, "
        f"{human_bytes(int(res.get('hidden_bytes_before', 0)))} hidden); "
        f"epoch {res.get('epoch_before')} -> {res.get('epoch')}; now {res.get('role')}{closed}; "
        f"took {human_seconds(float(res.get('seconds', 0)))}"
    )
    return 0


def cmd_repair(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Rebuild a damaged (quarantined) secondary copy from its primary (``user.colofs.repair``)."""
    path = _vm_target(args.vm_dir)
    res = command(path, "repair", "")
    if args.json:
        print(json.dumps(res, indent=2, sort_keys=True))
        return 0
    dmg = res.get("damage") or {}
    where = f" at offset {dmg['offset']}" if dmg.get("offset") is not None else ""
    print(
        f"{res.get('vm')}: repair started: the damaged copy ({dmg.get('file')}{where}: {dmg.get('reason')}) "
        f"was moved aside to {res.get('moved_aside')}; {res.get('next')}. "
        f"Watch it with: mountctl status {args.vm_dir}"
    )
    return 0


def cmd_mode(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Show or set a VM's replication mode (``user.colofs.mode``)."""
    path = _vm_target(args.vm_dir)
    vm = os.path.basename(path.rstrip("/"))
    if args.mode is None:
        try:
            mode = os.getxattr(path, "user.colofs.mode").decode().strip()
        except OSError as e:
            raise CtlError(f"{path}: reading the mode failed: {e.strerror}") from None
        print(f"{vm}: {mode}")
        return 0
    res = command(path, "mode", args.mode)
    note = "" if res.get("replicated") else " (kept; applies when this host replicates the VM as its primary)"
    print(f"{res.get('vm', vm)}: mode {res.get('mode')}{note}")
    return 0


def _node(path: str) -> Target:
    """``MOUNTPOINT/VM``, ``MOUNTPOINT/VM/DISK`` or ``MOUNTPOINT/VM/DISK[@NAME].raw``: what it names."""
    path = path.rstrip("/") or "/"
    if not path.endswith(".raw") and not os.path.lexists(path):
        path += ".raw"  # MOUNTPOINT/VM/DISK names the disk file
    return resolve(path)


def _snapshot_file(disk: Target, name: str) -> str:
    return os.path.join(os.path.dirname(disk.path), f"{disk.status['disk']}@{name}.raw")


def _report(args: argparse.Namespace, res: dict[str, Any], text: str) -> int:
    """Print the daemon's outcome as JSON with ``--json``, else the line for people."""
    print(json.dumps(res, indent=2, sort_keys=True) if args.json else text)
    return 0


def _need_name(name: str | None, parser: argparse.ArgumentParser, what: str) -> str:
    """The NAME argument, a usage error without it (the daemon checks what it may be)."""
    if not name:
        parser.error(f"{what} needs a NAME")
    return name


def cmd_snapshot(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Take (one disk, or ``--vm``: all at one instant), list or delete snapshots; one xattr call each."""
    if args.list and args.delete:
        parser.error("--list and --delete exclude each other")
    if args.list:
        if args.name is not None:
            parser.error("--list takes no NAME")
        return _list_snapshots(args.path, args.json)
    name = _need_name(args.name, parser, "--delete" if args.delete else "snapshot")
    target = _node(args.path)
    if args.delete:
        if args.vm:
            parser.error("--delete works on one disk: MOUNTPOINT/VM/DISK NAME")
        disk = expect(target, "disk", "give MOUNTPOINT/VM/DISK and the snapshot's NAME")
        path = _snapshot_file(disk, name)
        snap = resolve(path)  # a clear message if there is no such snapshot
        res = remove(path, "snapshot")
        return _report(args, res, f"deleted {snap.kind} {name} of {disk.status['vm']}/{disk.status['disk']} "
                                  f"({os.path.basename(path)}): {human_bytes(int(res.get('freed_bytes', 0)))} freed")
    if args.vm:
        vm = expect(target, "vm", "--vm snapshots every disk of a VM: give MOUNTPOINT/VM")
        res = command(vm.path, "snapshot", name)
        return _report(args, res, f"snapshot {name} of VM {res.get('vm')} ({', '.join(res.get('disks', []))}) "
                                  f"at one instant: {', '.join(res.get('files', []))}; seq {res.get('seq')} "
                                  f"({res.get('role')}); took {human_seconds(float(res.get('seconds', 0)))}")
    if target.kind == "vm":
        raise CtlError(f"{target.path} is a VM directory; give a disk (MOUNTPOINT/VM/DISK), "
                       "or --vm to snapshot all its disks at one instant")
    disk = expect(target, "disk", "give a disk: MOUNTPOINT/VM/DISK")
    res = command(disk.path, "snapshot", name)
    return _report(args, res, f"snapshot {name} of {res.get('vm')}/{disk.status['disk']}: "
                              f"{os.path.join(os.path.dirname(disk.path), res.get('files', ['?'])[0])}; "
                              f"seq {res.get('seq')} ({res.get('role')}); "
                              f"took {human_seconds(float(res.get('seconds', 0)))}")


def _list_snapshots(path: str, as_json: bool) -> int:
    """``user.colofs.snapshots`` of a VM directory or disk file, as JSON or one line each."""
    target = _node(path)
    if target.kind not in ("vm", "disk"):
        expect(target, "disk", "give MOUNTPOINT/VM or MOUNTPOINT/VM/DISK")
    snaps = snapshots(target.path)  # page by page: the list has no bound
    if as_json:
        print(json.dumps(snaps, indent=2, sort_keys=True))
        return 0
    where = target.status["vm"] + ("" if target.kind == "vm" else f"/{target.status['disk']}")
    if not snaps:
        print(f"{where}: no snapshots or clones")
    for snap in snaps:
        print(f"{target.status['vm']}/{render_snapshot(snap)}")
    return 0


def cmd_clone(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """A writable clone of the disk now, or of a snapshot (``--from``, or a snapshot file as PATH)."""
    target = _node(args.path)
    if target.kind == "snapshot":
        if args.source:
            parser.error("--from names a snapshot of the disk; give the disk, or the snapshot file without --from")
        source = target
    else:
        disk = expect(target, "disk", "give a disk (MOUNTPOINT/VM/DISK) or a snapshot file")
        source = resolve(_snapshot_file(disk, args.source)) if args.source else disk
        if args.source:
            expect(source, "snapshot", "--from must name a read-only snapshot")
    res = command(source.path, "clone", args.name)
    what = f"snapshot {res.get('base')}" if res.get("base") else f"the disk (seq {res.get('seq')})"
    return _report(args, res, f"clone {args.name} of {res.get('vm')}/{res.get('disk')} from {what}: "
                              f"{os.path.join(os.path.dirname(source.path), str(res.get('file')))} (writable); "
                              f"took {human_seconds(float(res.get('seconds', 0)))}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mountctl", description="Mount and control colofs stores.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("mount", help="serve a store on a mountpoint (creates the store if new)")
    add_mount_arguments(m)
    m.add_argument("--foreground", action="store_true", help="stay attached; log to stderr too")
    m.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the mount (default 300)")
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser("umount", help="flush everything, unmount, wait for the daemon to close the store")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    u.add_argument("--lazy", action="store_true", help="detach even if busy; the daemon ends when unused")
    u.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the daemon (default 300)")
    u.set_defaults(func=cmd_umount)

    c = sub.add_parser("create", help="create an empty disk")
    c.add_argument("mountpoint", metavar="MOUNTPOINT")
    c.add_argument("disk", metavar="VM/DISK")
    c.add_argument("--size", required=True, help="disk size, e.g. 64M, 10G")
    c.add_argument("--block-size", type=int, default=4096, help="copy-before-write block size (default 4096)")
    c.set_defaults(func=cmd_create)

    i = sub.add_parser("import", help="create a disk from a raw image")
    i.add_argument("mountpoint", metavar="MOUNTPOINT")
    i.add_argument("disk", metavar="VM/DISK")
    i.add_argument("--from", dest="source", required=True, metavar="IMAGE", help="raw image to copy")
    i.add_argument("--size", help="disk size (default: the image's size)")
    i.add_argument("--block-size", type=int, default=4096, help="copy-before-write block size (default 4096)")
    i.set_defaults(func=cmd_import)

    s = sub.add_parser("status", help="role, phase, epoch, sequence numbers and layers of VMs and disks")
    s.add_argument("mountpoint", metavar="MOUNTPOINT")
    s.add_argument("what", nargs="?", metavar="VM[/DISK]")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--timeout", type=float, default=VM_STATUS_TIMEOUT, metavar="S",
                   help=f"seconds to wait for each VM's answer; a VM that gives none (a hung worker) is shown "
                        f"'not answering' (default {VM_STATUS_TIMEOUT:.0f})")
    s.set_defaults(func=cmd_status)

    k = sub.add_parser("checkpoint", help="checkpoint a VM (empties its hidden and active layers)")
    k.add_argument("vm_dir", metavar="MOUNTPOINT/VM")
    k.add_argument("--seq", type=int, help="unreplicated hosts: the sequence number the checkpoint follows "
                                            "(default: last applied)")
    k.add_argument("--timeout", type=float, help="replicated primary: seconds to wait for the secondary "
                                                 "(default 30)")
    k.add_argument("--json", action="store_true", help="machine-readable output (the daemon's outcome)")
    k.set_defaults(func=cmd_checkpoint)

    f = sub.add_parser("failover", help="make this host's copy of a VM the primary (refuses the old primary)")
    f.add_argument("vm_dir", metavar="MOUNTPOINT/VM")
    f.set_defaults(func=cmd_failover)

    rp = sub.add_parser("repair", help="secondary: rebuild a damaged (quarantined) VM from its primary "
                                       "with a full digest-compared sync")
    rp.add_argument("vm_dir", metavar="MOUNTPOINT/VM")
    rp.add_argument("--json", action="store_true", help="machine-readable output (the daemon's outcome)")
    rp.set_defaults(func=cmd_repair)

    md = sub.add_parser("mode", help="show or set a VM's replication mode: async (COLO) or sync")
    md.add_argument("vm_dir", metavar="MOUNTPOINT/VM")
    md.add_argument("mode", nargs="?", choices=("async", "sync"), help="the new mode (omit to show it)")
    md.set_defaults(func=cmd_mode)

    sn = sub.add_parser(
        "snapshot", help="take, list or delete read-only snapshots (files VM/DISK@NAME.raw)",
        description="Take a read-only snapshot of a disk (on a secondary: of the last checkpoint), "
                    "of every disk of a VM at one instant (--vm), list them (--list) or delete one (--delete).",
    )
    sn.add_argument("path", metavar="MOUNTPOINT/VM[/DISK]")
    sn.add_argument("name", nargs="?", metavar="NAME", help="snapshot name (letters, digits, '.', '_', '-')")
    sn.add_argument("--vm", action="store_true", help="snapshot every disk of the VM at one instant")
    sn.add_argument("--list", action="store_true", help="list the snapshots and clones of a VM or disk")
    sn.add_argument("--delete", action="store_true", help="delete snapshot (or clone) NAME of the disk")
    sn.add_argument("--json", action="store_true", help="machine-readable output (the list, or the outcome)")
    sn.set_defaults(func=cmd_snapshot)

    cl = sub.add_parser("clone", help="make a writable clone VM/DISK@NAME.raw of a disk or of a snapshot")
    cl.add_argument("path", metavar="MOUNTPOINT/VM/DISK")
    cl.add_argument("name", metavar="NAME", help="clone name (letters, digits, '.', '_', '-')")
    cl.add_argument("--from", dest="source", metavar="SNAPSHOT", help="clone this snapshot of the disk")
    cl.add_argument("--json", action="store_true", help="machine-readable output (the daemon's outcome)")
    cl.set_defaults(func=cmd_clone)

    add_verify_parser(sub)
    add_events_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args, parser)
    except CtlError as e:
        print(f"mountctl: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
