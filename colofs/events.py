"""The daemon's event stream: one JSON line per change, sent to every listener of a unix socket.

Parts of the daemon that see a change (a checkpoint, a failover, a peer that
connects, is lost or is refused, a resync, a verify, a damaged VM) call
:meth:`EventBus.emit`; it never blocks and never awaits, so it can be called
from anywhere in the trio loop, the hot path of a checkpoint included.

Each listener (``mountctl events MNT``) has a bounded queue. A listener that
reads too slowly to keep up fills it; it is then dropped, sent a last
``{"event": "dropped", "reason": "too slow"}`` line if it reads within
:data:`NOTE_GRACE` seconds, and closed: one slow reader never holds the
daemon, nor costs it more than :data:`QUEUE_EVENTS` lines of memory (and a
small kernel socket buffer).

Synchronous watchers (:meth:`EventBus.watch`) see every event too: the metrics
count checkpoints and failovers from the same emits, so each is reported once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import trio

log = logging.getLogger(__name__)

SOCKET_NAME = ".colofs-events.sock"
QUEUE_EVENTS = 128
"""Lines queued per listener before it counts as too slow."""
NOTE_GRACE = 30.0
"""Seconds a dropped listener gets to take its last line before its socket is closed."""
SEND_BUFFER = 16384
"""The kernel's send buffer per listener: small, so a reader that stalls is noticed soon."""
DROPPED = "dropped"

Watcher = Callable[[dict[str, Any]], None]


def socket_path(store: str) -> str:
    """Where a store's daemon listens for event listeners (mode 0600, inside the store)."""
    return os.path.join(store, SOCKET_NAME)


class _Listener:
    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.send, self.receive = trio.open_memory_channel[bytes](QUEUE_EVENTS)
        self.dropped = False
        self.scope: trio.CancelScope | None = None


class EventBus:
    """Fans each event out to the socket listeners and the in-process watchers."""

    def __init__(self) -> None:
        self.greeting: Callable[[], list[dict[str, Any]]] = list
        """What a new listener is sent first (one ``exists`` line per VM, say), then ``listening``."""
        self._listeners: set[_Listener] = set()
        self._watchers: list[Watcher] = []
        self.emitted = 0
        self.dropped_listeners = 0

    def watch(self, fn: Watcher) -> None:
        """Call ``fn(event)`` for every event, synchronously (it must be quick and must not raise)."""
        self._watchers.append(fn)

    def emit(self, kind: str, **fields: Any) -> None:
        """Publish one event now; never blocks (a listener whose queue is full is dropped)."""
        event = {"time": round(time.time(), 6), "event": kind, **fields}
        self.emitted += 1
        for fn in self._watchers:
            try:
                fn(event)
            except Exception:
                log.exception("events: a watcher failed on %s", kind)
        if not self._listeners:
            return
        line = (json.dumps(event, default=str) + "\n").encode()
        for lst in list(self._listeners):
            try:
                lst.send.send_nowait(line)
            except trio.WouldBlock:
                self._drop(lst)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._listeners.discard(lst)

    def _drop(self, lst: _Listener) -> None:
        self._listeners.discard(lst)
        lst.dropped = True
        lst.send.close()
        self.dropped_listeners += 1
        if lst.scope is not None:  # a send under way gets the grace period, no more
            lst.scope.deadline = min(lst.scope.deadline, trio.current_time() + NOTE_GRACE)
        log.warning("events: dropped listener %s: too slow (%d events queued)", lst.peer, QUEUE_EVENTS)

    @property
    def listeners(self) -> int:
        return len(self._listeners)

    async def serve(self, path: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept listeners on the unix socket ``path`` (replacing a stale one) until cancelled."""
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if os.path.exists(path):
                os.unlink(path)  # left by a daemon that died; the store lock says no other one runs
            old = os.umask(0o177)
            try:
                await sock.bind(path)
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
            sock.listen(16)
        except OSError:
            sock.close()
            raise
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                await trio.serve_listeners(self._handle, [listener], handler_nursery=nursery)
        finally:
            try:
                os.unlink(path)
            except OSError:
                pass

    async def _handle(self, stream: trio.SocketStream) -> None:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        lst = _Listener(f"fd {stream.socket.fileno()}")
        self._listeners.add(lst)  # from now on nothing is missed: it queues while the greeting goes out
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._hangup, stream, nursery.cancel_scope)
                now = round(time.time(), 6)
                hello = [{"time": now, **e} for e in self.greeting()] + [{"time": now, "event": "listening"}]
                with trio.move_on_after(NOTE_GRACE) as greeted:
                    await stream.send_all("".join(json.dumps(e, default=str) + "\n" for e in hello).encode())
                if not greeted.cancelled_caught:
                    await self._write(stream, lst)
                nursery.cancel_scope.cancel()
        finally:
            self._listeners.discard(lst)
            lst.send.close()
            lst.receive.close()
            await trio.aclose_forcefully(stream)

    async def _write(self, stream: trio.SocketStream, lst: _Listener) -> None:
        try:
            async for line in lst.receive:
                if lst.dropped:
                    break
                with trio.CancelScope() as scope:
                    lst.scope = scope
                    await stream.send_all(line)
                lst.scope = None
                if scope.cancelled_caught:
                    return
            if lst.dropped:
                with trio.move_on_after(NOTE_GRACE):
                    note = {"time": round(time.time(), 6), "event": DROPPED, "reason": "too slow",
                            "queue": QUEUE_EVENTS}
                    await stream.send_all((json.dumps(note) + "\n").encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    @staticmethod
    async def _hangup(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
        """End the listener when its reader closes the connection (it sends nothing else)."""
        try:
            while await stream.receive_some(4096):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()
