"""``mountctl events MOUNTPOINT [--json]``: follow a mount's changes, one line each, until interrupted.

The daemon listens on ``STORE/.colofs-events.sock`` (mode 0600; the store is
named in the mountpoint's status). A new listener first gets one ``exists``
line per VM and a ``listening`` line, then every change as it happens. With
``--json`` the daemon's lines are printed as they come; without, each is
``TIME EVENT key=value ...``. A listener that does not keep up is dropped by
the daemon with a last ``dropped`` line: this command then exits with status
1, and 0 when the daemon ends the stream (the mount stopped).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from typing import Any

from colofs.events import DROPPED, socket_path
from mountctl.client import CtlError, expect, resolve


def add_parser(sub: Any) -> None:
    e = sub.add_parser("events", help="print one line per change of the mount (checkpoint, failover, peer "
                                      "connected/lost/refused, resync, verify, damage) until interrupted")
    e.add_argument("mountpoint", metavar="MOUNTPOINT")
    e.add_argument("--json", action="store_true", help="one JSON object per line, as the daemon sends them")
    e.set_defaults(func=cmd_events)


def format_event(ev: dict[str, Any]) -> str:
    """``2026-01-02T03:04:05.678Z checkpoint vm=vm1 seq=7 ...``"""
    t = float(ev.get("time", 0.0))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"
    rest = " ".join(f"{k}={_value(v)}" for k, v in ev.items() if k not in ("time", "event") and v is not None)
    return f"{stamp} {ev.get('event')} {rest}".rstrip()


def _value(v: object) -> str:
    text = v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))
    return json.dumps(text) if any(c in text for c in " \t\"=") else text


def cmd_events(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    root = expect(resolve(args.mountpoint), "root", "give the mountpoint itself")
    path = socket_path(str(root.status["store"]))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        raise CtlError(f"{args.mountpoint}: cannot connect to the event socket {path}: {e.strerror or e} "
                       "(see the mount's log)") from None
    last = None
    with sock, sock.makefile("rb") as stream:
        for raw in stream:
            try:
                ev = json.loads(raw)
            except ValueError:
                continue
            last = ev.get("event")
            print(raw.decode().rstrip("\n") if args.json else format_event(ev), flush=True)
    if last == DROPPED:
        print("mountctl: the daemon dropped this listener: it read too slowly", file=sys.stderr)
        return 1
    print(f"mountctl: the event stream of {args.mountpoint} ended (the mount stopped)", file=sys.stderr)
    return 0
