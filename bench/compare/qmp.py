"""A minimal synchronous QMP client for qemu-storage-daemon's monitor socket.

Enough to time a checkpoint and a failover from the harness: commands with a
deadline, and events kept until someone waits for them (a job's events can
arrive between a command and its reply).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any


class QMPError(Exception):
    """The daemon refused a command, or did not answer in time."""


class QMP:
    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self.timeout = timeout
        greeting = self._read(time.monotonic() + timeout)
        if "QMP" not in greeting:
            raise QMPError(f"not a QMP greeting: {greeting}")
        self.cmd("qmp_capabilities")

    def close(self) -> None:
        self.sock.close()

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QMPError("timed out waiting for the QMP monitor")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise QMPError("timed out waiting for the QMP monitor") from None
            if not chunk:
                raise QMPError("the QMP monitor closed the connection (daemon gone?)")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name: str, timeout: float | None = None, **args: Any) -> Any:
        """Execute a command; return its ``return`` value or raise :class:`QMPError` with QEMU's message."""
        msg: dict[str, Any] = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._read(deadline)
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QMPError(f"{name}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def wait_event(self, name: str, match: Callable[[dict[str, Any]], bool] | None = None,
                   timeout: float | None = None) -> dict[str, Any]:
        """The first (kept or new) event called ``name`` that ``match`` accepts."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("event") == name and (match is None or match(ev)):
                    return self.events.pop(i)
            self.events.append(self._read(deadline))
