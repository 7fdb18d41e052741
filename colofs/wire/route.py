"""The route preamble: which VM a replication connection is for, sent in clear before anything else.

A primary opens every connection to a secondary with::

    b"COLOROUT" (8 bytes) | version u8 (= 1) | name length u8 | VM name (UTF-8, 1..255 bytes)

then starts TLS (if configured) and the HELLO handshake. The preamble lets a
secondary that serves each VM from its own process pick which process takes
the connection before anyone speaks TLS; it proves nothing and grants
nothing: the process it reaches authenticates the peer as usual and checks
that ATTACH names the same VM.

Whoever reads it reads exactly its bytes and never more (:func:`read_route`),
because what follows belongs to TLS or to the frame stream, possibly read by
another process once the socket has been handed over. A server that accepts
connections with or without it looks first with :func:`peek_route`, which
consumes nothing; a router looks at what follows the preamble with
:func:`peek_head` (consuming nothing either) to refuse a connection whose
transport cannot work here before it starts a process for it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import trio

from colofs.core.errors import InvalidName
from colofs.core.names import MAX_NAME, check_name
from colofs.wire.errors import ProtocolError

ROUTE_MAGIC = b"COLOROUT"
ROUTE_VERSION = 1
HEADER_LEN = len(ROUTE_MAGIC) + 2
MAX_ROUTE_NAME = 255
"""What the length byte can say; names colofs accepts are shorter (:data:`colofs.core.names.MAX_NAME`)."""


class RouteError(ProtocolError):
    """The route preamble is malformed, names no valid VM, or did not arrive in time."""


def encode_route(vm: str) -> bytes:
    """The preamble routing a connection to ``vm``; raises :class:`RouteError` for a name no peer would accept."""
    _check(vm)
    name = vm.encode()
    return ROUTE_MAGIC + bytes((ROUTE_VERSION, len(name))) + name


def _check(vm: str) -> None:
    try:
        check_name("VM", vm)
    except InvalidName as e:
        raise RouteError(f"route preamble: {e}") from None


async def _read_exactly(stream: trio.SocketStream, n: int, what: str) -> bytes:
    """``n`` bytes, asking the socket for no more than are still missing (the rest is not ours)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise RouteError(f"route preamble: the connection closed after {len(buf)} of the {n} bytes of {what}")
        buf += chunk
    return bytes(buf)


async def read_route(stream: trio.SocketStream, timeout: float) -> str:
    """Read one preamble from ``stream`` and return the VM it names; not one byte past it is read.

    Raises :class:`RouteError` saying what was wrong: another magic (not a
    routed colofs connection), another version, a length the name rules
    cannot allow (checked from the header, before the name is read), a name
    colofs refuses, a connection closed early, or ``timeout`` seconds passing
    before the whole preamble arrived (a slow or stalled peer).
    """
    timeout = max(timeout, 0.0)  # what is left of a deadline may be spent already
    try:
        with trio.fail_after(timeout):
            magic = await _read_exactly(stream, len(ROUTE_MAGIC), "the magic")
            if magic != ROUTE_MAGIC:
                raise RouteError(f"route preamble: bad magic {magic!r}, expected {ROUTE_MAGIC!r}")
            version, length = await _read_exactly(stream, 2, "the header")
            if version != ROUTE_VERSION:
                raise RouteError(f"route preamble: version {version}, this node speaks {ROUTE_VERSION}")
            if length == 0:
                raise RouteError("route preamble: the VM name is empty (length 0)")
            if length > MAX_NAME:
                raise RouteError(f"route preamble: a VM name of {length} bytes claimed, "
                                 f"names are at most {MAX_NAME}")
            raw = await _read_exactly(stream, length, "the VM name")
    except trio.TooSlowError:
        raise RouteError(f"route preamble: not complete after {timeout:g} s") from None
    try:
        vm = raw.decode()
    except UnicodeDecodeError:
        raise RouteError(f"route preamble: the VM name {raw[:80]!r} is not UTF-8") from None
    _check(vm)
    return vm


async def peek_route(sock: trio.socket.SocketType, timeout: float) -> bool:
    """Whether the connection on ``sock`` starts with the preamble's magic; consumes nothing.

    Waits until the first 8 bytes have arrived, or a byte that differs from
    the magic, or the peer closed (then False: the frame reader reports what
    it got). Raises :class:`RouteError` if ``timeout`` passes first.
    """
    head = await _peek(sock, len(ROUTE_MAGIC), timeout, lambda got: not ROUTE_MAGIC.startswith(got),
                       "a route preamble or HELLO")
    return head == ROUTE_MAGIC


async def peek_head(sock: trio.socket.SocketType, n: int, timeout: float) -> bytes:
    """The first ``n`` bytes queued on ``sock`` after the preamble, consuming nothing.

    For a router that must tell, before handing the socket on, whether the
    peer's transport can work here (it starts TLS or frames, see
    :func:`colofs.repl.tls.transport_refusal`). Fewer than ``n`` bytes if
    the peer closed first; :class:`RouteError` if ``timeout`` passes first.
    """
    return await _peek(sock, n, timeout, lambda got: False, "the first bytes after the route preamble")


async def _peek(sock: trio.socket.SocketType, n: int, timeout: float, enough: Callable[[bytes], bool],
                waiting_for: str) -> bytes:
    """Up to ``n`` queued bytes, without consuming them: once ``n`` arrived, ``enough(head)``, or the peer closed.

    A peek returns what is queued, possibly fewer bytes than asked, and a
    socket with some data queued stays readable; so between peeks the
    socket's receive low-water mark is set just past what is queued and the
    task sleeps until more arrives, instead of spinning. The mark is put
    back to 1 before returning: the socket may be handed to another process.
    """
    timeout = max(timeout, 0.0)  # what is left of a deadline may be spent already
    seen = -1
    try:
        with trio.fail_after(timeout):
            while True:
                await trio.lowlevel.wait_readable(sock)
                head = await sock.recv(n, socket.MSG_PEEK)
                if len(head) >= n or enough(head):
                    return head
                if len(head) == seen:  # woken with nothing new: end of stream (or an error) before n bytes
                    return head
                seen = len(head)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, len(head) + 1)
    except trio.TooSlowError:
        raise RouteError(f"timed out after {timeout:g} s waiting for {waiting_for}") from None
    finally:
        if seen >= 0:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            except OSError:
                pass


__all__ = ["HEADER_LEN", "MAX_ROUTE_NAME", "ROUTE_MAGIC", "ROUTE_VERSION", "RouteError", "encode_route",
           "peek_head", "peek_route", "read_route"]
