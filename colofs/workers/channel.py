"""The channel between the supervisor and one VM's worker: JSON messages, and sockets, over a socketpair.

Each message is one datagram of a ``SOCK_SEQPACKET`` unix socketpair: a UTF-8
JSON object of at most :data:`MAX_MESSAGE` bytes, with file descriptors in
``SCM_RIGHTS`` where an operation hands one over (a secondary's accepted
connection). Datagrams keep message boundaries and cannot interleave, so
neither side needs framing or a send lock.

A request carries ``"id"`` and gets exactly one reply ``{"reply_to": id, ...}``,
or ``{"reply_to": id, "error": text, "errno": N}``; a notification has no
``id`` and no reply. The operations themselves are listed in
``docs/processes.md``; this module knows only the mechanism.
"""

from __future__ import annotations

import array
import errno
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from colofs.fs.errnos import errno_for

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 * 1024
MAX_FDS = 4
_FD_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)

Handler = Callable[[dict[str, Any], list[int]], Awaitable[dict[str, Any] | None]]


@dataclass(frozen=True)
class WorkerArgs:
    """What a worker is started with; it travels as JSON through the zygote."""

    vm: str
    argv: list[str]
    """The supervisor's daemon arguments; the worker re-parses them (its mount is ``MOUNTPOINT/VM``)."""
    restarts: int = 0
    """How many times this VM's worker was restarted before (shown in status)."""
    create_vm: str | None = None
    """A role: create the VM with it if the store does not hold it yet (mkdir, create, a first attach)."""
    channel_fd: int = -1
    """In the worker: its end of the channel."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Settings the supervisor hands down that are not mount options (the retained-writes budget)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerArgs:
        return cls(vm=str(data["vm"]), argv=[str(a) for a in data["argv"]],
                   restarts=int(data.get("restarts", 0)), create_vm=data.get("create_vm"),
                   channel_fd=int(data.get("channel_fd", -1)), extra=dict(data.get("extra") or {}))


class ChannelClosed(Exception):
    """The other process closed its end (it exited, or it is shutting down)."""


class RemoteError(Exception):
    """The other side answered a request with an error; ``errno`` is what a FUSE client should see."""

    def __init__(self, message: str, errno_: int = errno.EIO) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno_


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """A new channel's two ends (supervisor's, worker's), not inherited by exec'd programs."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return a, b


def encode(msg: dict[str, Any]) -> bytes:
    data = json.dumps(msg, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"channel message of {len(data)} bytes is over the {MAX_MESSAGE}-byte limit")
    return data


def fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors an ``SCM_RIGHTS`` control message carried."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % arr.itemsize)])
            fds.extend(arr)
    return fds


def rights(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    """The control message handing ``fds`` over (empty for none)."""
    if not fds:
        return []
    if len(fds) > MAX_FDS:
        raise ValueError(f"at most {MAX_FDS} descriptors per message")
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            socket.close(fd)
        except OSError:
            pass


class Channel:
    """One end of a supervisor–worker channel; :meth:`run` must be running for :meth:`call` to get replies."""

    def __init__(self, sock: socket.socket, *, label: str = "channel") -> None:
        sock.setblocking(False)
        self._sock = trio.socket.from_stdlib_socket(sock)
        self.label = label
        self._next_id = 1
        self._replies: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self.closed = trio.Event()
        """Set once the other end is gone (or this one was closed)."""

    async def _send(self, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
        if self.closed.is_set():
            raise ChannelClosed(f"{self.label}: closed")
        try:
            await self._sock.sendmsg([encode(msg)], rights(fds))
        except (BrokenPipeError, ConnectionResetError, OSError) as e:
            if isinstance(e, BrokenPipeError | ConnectionResetError) or e.errno in (errno.EPIPE, errno.ENOTCONN):
                self._mark_closed()
                raise ChannelClosed(f"{self.label}: the other end is gone") from None
            raise

    async def notify(self, op: str, *, fds: Sequence[int] = (), **fields: Any) -> None:
        """Send ``op`` without waiting for an answer; ``fds`` are duplicated into the other process."""
        await self._send({"op": op, **fields}, fds)

    async def call(self, op: str, *, timeout: float, **fields: Any) -> dict[str, Any]:
        """Send request ``op`` and return its reply; raises :class:`RemoteError`, :class:`ChannelClosed` or ``trio.TooSlowError``."""
        ident = self._next_id
        self._next_id += 1
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._replies[ident] = send
        try:
            with trio.fail_after(timeout):
                await self._send({"op": op, "id": ident, **fields})
                try:
                    reply = await receive.receive()
                except trio.EndOfChannel:
                    raise ChannelClosed(f"{self.label}: closed before {op} was answered") from None
        finally:
            self._replies.pop(ident, None)
        if "error" in reply:
            raise RemoteError(str(reply["error"]), int(reply.get("errno") or errno.EIO))
        return reply

    async def run(self, handler: Handler) -> None:
        """Read until the other end closes; replies resolve :meth:`call`, the rest go to ``handler``.

        Each request (a message with ``id``) is handled in a task of its own,
        so a slow request does not hold up a ``ping``. Notifications are
        handled by the reader itself, one after the other, so they are seen in
        the order they were sent (``opened`` before ``ready``); their handler
        must not block. The handler owns the descriptors it is given.
        Handlers still running when the channel closes are cancelled.
        """
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        data, ancdata, flags, _ = await self._sock.recvmsg(MAX_MESSAGE + 1, _FD_SPACE)
                    except trio.ClosedResourceError:
                        break  # closed on this side
                    except (ConnectionResetError, OSError) as e:
                        log.debug("%s: receive failed: %s", self.label, e)
                        break
                    fds = fds_of(ancdata)
                    if not data:
                        _close_all(fds)
                        break
                    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) > MAX_MESSAGE:
                        _close_all(fds)
                        log.error("%s: dropped an oversized message (%d bytes, flags %#x)", self.label, len(data), flags)
                        continue
                    try:
                        msg = json.loads(data)
                        if not isinstance(msg, dict):
                            raise ValueError("not an object")
                    except ValueError as e:
                        _close_all(fds)
                        log.error("%s: dropped an unreadable message: %s", self.label, e)
                        continue
                    if "reply_to" in msg:
                        _close_all(fds)
                        waiter = self._replies.get(msg["reply_to"])
                        if waiter is not None:
                            waiter.send_nowait(msg)
                        continue
                    if "id" in msg:
                        nursery.start_soon(self._dispatch, handler, msg, fds)
                    else:
                        await self._dispatch(handler, msg, fds)  # notifications keep their order
                nursery.cancel_scope.cancel()
        finally:
            self._mark_closed()

    async def _dispatch(self, handler: Handler, msg: dict[str, Any], fds: list[int]) -> None:
        ident = msg.get("id")
        try:
            reply: dict[str, Any] = dict(await handler(msg, fds) or {})
        except RemoteError as e:
            reply = {"error": e.message, "errno": e.errno}
        except Exception as e:  # any failure is an answer, never a dead channel
            code = errno_for(e)
            if code == errno.EIO and not isinstance(e, OSError):
                log.exception("%s: %s failed", self.label, msg.get("op"))
            reply = {"error": str(e) or type(e).__name__, "errno": code}
        if ident is None:
            if "error" in reply:
                log.warning("%s: %s failed: %s", self.label, msg.get("op"), reply["error"])
            return
        try:
            await self._send({"reply_to": ident, **reply})
        except ChannelClosed:
            pass

    def _mark_closed(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for send in list(self._replies.values()):
            send.close()

    def close(self) -> None:
        """Close this end; the other side sees end of file."""
        self._mark_closed()
        self._sock.close()
