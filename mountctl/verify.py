"""``mountctl verify MOUNTPOINT/VM``: compare a primary VM's disks with its secondary, online.

One ``setxattr`` of ``user.colofs.verify`` starts the verify in the daemon;
this command then reads the same attribute about once a second, printing the
progress and ETA while it runs, and finally the report. The verify goes on
in the daemon if this command is interrupted (``--no-wait`` returns at once;
``--cancel`` stops it); the report stays in the VM's status until the next.

Exit status: 0 when no differing block remains, 1 when some do (or the
verify failed), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from mountctl.client import CtlError, command, expect, query, resolve
from mountctl.units import human_bytes, human_seconds

POLL_SECONDS = 1.0


def add_parser(sub: Any) -> None:
    v = sub.add_parser("verify", help="primary: compare a VM's disks with the secondary's copy at a checkpoint "
                                      "(xxh3 digests per block, while the VM runs)")
    v.add_argument("vm_dir", metavar="MOUNTPOINT/VM")
    v.add_argument("--disk", action="append", metavar="D", help="only this disk (repeatable; default: all)")
    v.add_argument("--resync", action="store_true", help="repair differing blocks with the digest-compared resync, "
                                                         "then prove them equal with a final pass")
    v.add_argument("--rate", type=float, metavar="MB/s", help="bytes each side reads a second (default 100 MB/s)")
    v.add_argument("--checkpoint-wait", type=float, metavar="S",
                   help="--resync: seconds to wait for the checkpoint the final pass compares against (default 60)")
    v.add_argument("--no-wait", action="store_true", help="start it and return; read it later with --show")
    v.add_argument("--show", action="store_true", help="print the running or last verify of the VM")
    v.add_argument("--cancel", action="store_true", help="stop the running verify")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(func=cmd_verify)


def cmd_verify(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    path = expect(resolve(args.vm_dir), "vm", "give a VM directory: MOUNTPOINT/VM").path
    if args.show:
        return _finish(args, query(path, "verify"))
    if args.cancel:
        res = command(path, "verify", json.dumps({"cancel": True}))
        print(f"{res.get('vm')}: verify {res.get('id')} cancelled")
        return 0
    req: dict[str, Any] = {"resync": args.resync}
    if args.disk:
        req["disks"] = [d.removesuffix(".raw") for d in args.disk]
    if args.rate is not None:
        if not args.rate > 0:
            parser.error("--rate: give MB/s above 0")
        req["rate"] = args.rate
    if args.checkpoint_wait is not None:
        if not 0 < args.checkpoint_wait <= 3600:
            parser.error("--checkpoint-wait: give seconds from 0 to 3600")
        req["checkpoint_wait"] = args.checkpoint_wait
    res = command(path, "verify", json.dumps(req))
    ident = res.get("id")
    if args.no_wait:
        print(f"{res.get('vm')}: verify {ident} started; progress in 'mountctl status', "
              f"the report with: mountctl verify {args.vm_dir} --show")
        return 0
    last = ""
    while True:
        rep = query(path, "verify")
        if rep.get("id") != ident:
            raise CtlError(f"verify {ident} was replaced by verify {rep.get('id')} (started elsewhere)")
        if rep.get("state") != "running":
            break
        line = progress_line(rep)
        if line != last:  # on stderr: stdout keeps only the report (JSON with --json)
            print(line, file=sys.stderr, flush=True)
            last = line
        time.sleep(POLL_SECONDS)
    return _finish(args, rep)


def progress_line(rep: dict[str, Any]) -> str:
    eta = rep.get("eta_s")
    return (f"{rep.get('vm')}: verify {rep.get('phase')}: {rep.get('percent')}% "
            f"({rep.get('blocks_done')}/{rep.get('blocks_total')} blocks, {rep.get('blocks_differing')} differing)"
            + (f", ETA {human_seconds(float(eta))}" if eta is not None else ""))


def _finish(args: argparse.Namespace, rep: dict[str, Any]) -> int:
    if not rep:
        raise CtlError(f"{args.vm_dir}: no verify has run since the mount started")
    if args.json:
        print(json.dumps(rep, indent=2, sort_keys=True))
    else:
        print(summary(rep))
    if rep.get("state") == "failed":
        raise CtlError(f"verify {rep.get('id')} failed: {rep.get('error')}")
    return 1 if rep.get("blocks_differing") else 0


def summary(rep: dict[str, Any]) -> str:
    """The report for people: counts, the differing ranges, what the resync did."""
    lines = [
        f"{rep.get('vm')}: verify {rep.get('id')} {rep.get('state')}: {rep.get('blocks_compared')} of "
        f"{rep.get('blocks_total')} blocks compared in {human_seconds(float(rep.get('duration_s', 0)))}; "
        f"{rep.get('blocks_differing')} differing, {rep.get('blocks_unverified')} unverified "
        f"(written between every checkpoint); checkpoints {rep.get('checkpoints')}; "
        f"{rep.get('interruptions')} interruptions"
    ]
    for r in rep.get("differing") or []:
        lines.append(f"  differs: {r['disk']} blocks {r['first_block']}+{r['blocks']} "
                     f"(offset {r['offset']}, {human_bytes(int(r['bytes']))})")
    res = rep.get("resync")
    if res:
        lines.append(f"  resync: {res.get('blocks')} differing blocks sent for repair; final pass "
                     f"{res.get('final_pass')}: {res.get('repaired')} repaired, {res.get('still_differing')} "
                     "still differing")
        for r in res.get("ranges") or []:
            lines.append(f"  repaired: {r['disk']} blocks {r['first_block']}+{r['blocks']} (offset {r['offset']})")
    if rep.get("error"):
        lines.append(f"  error: {rep['error']}")
    return "\n".join(lines)
