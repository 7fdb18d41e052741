"""Telling a service manager how the daemon is doing, the ``sd_notify`` way, with the stdlib only.

systemd starts a ``Type=notify`` unit with ``NOTIFY_SOCKET`` naming a unix
datagram socket; it holds the unit in "activating" until ``READY=1`` arrives,
so units ordered after the mount (the VMs) start only once it answers
requests. Without ``NOTIFY_SOCKET`` (started by hand, by ``mount``, by tests)
every call is a no-op. A failure to notify is logged, never fatal: the mount
serves either way.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def _address(env: str) -> str | bytes:
    """The socket address: a path, or an abstract name (``@name``, a leading NUL byte)."""
    if env.startswith("@"):
        return b"\0" + env[1:].encode()
    return env


def notify(**fields: str | int) -> bool:
    """Send ``KEY=value`` lines (``notify(READY=1, STATUS="...")``); True if a manager got them."""
    env = os.environ.get("NOTIFY_SOCKET")
    if not env:
        return False
    message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(_address(env))
            sock.sendall(message)
    except OSError as e:
        log.warning("could not notify the service manager at %s: %s", env, e)
        return False
    return True
