"""A TCP proxy on 127.0.0.1 that cuts connections at chosen byte counts, holds one direction,
or rewrites frames (after the route preamble, passed on as is) as an attacker on the path without the key would.

It sits between the primary and the secondary: ``budget()`` is asked, per
connection, how many bytes (both directions together) may pass before the
connection is cut abruptly -- possibly in the middle of a frame -- and
``hold_down`` stops the secondary-to-primary direction (acknowledgements)
while set. With ``rewrite``, every primary-to-secondary frame is decoded
and, if ``rewrite`` returns another message, re-encoded with a correct xxh3
digest; a MAC tag, which needs the key, is passed on unchanged. With
``record``, every byte from the primary is kept in ``recorded`` (what an
eavesdropper sees).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import lz4.block
import trio
import xxhash

from colofs.wire.messages import Message, MessageType, decode_message
from colofs.wire.route import HEADER_LEN, ROUTE_MAGIC

_HEADER = struct.Struct("<4sBBHIIQ")
_FLAG_LZ4 = 0x1
_FLAG_MAC = 0x2
_TAG_LEN = 16


class FrameRewriter:
    """Splits a byte stream into frames, without any key, and re-encodes those ``rewrite`` changes."""

    def __init__(self, rewrite: Callable[[Message], Message | None]) -> None:
        self.rewrite = rewrite
        self.rewritten = 0
        self._buf = bytearray()
        self._routed = False

    def feed(self, data: bytes) -> bytes:
        """The bytes to forward for ``data``: whole frames only, the rest is held back."""
        self._buf += data
        out = bytearray()
        if not self._routed:  # the route preamble comes first, in clear: passed on as it is
            if not ROUTE_MAGIC.startswith(bytes(self._buf[: len(ROUTE_MAGIC)])):
                self._routed = True  # no preamble on this connection
            elif len(self._buf) < HEADER_LEN or len(self._buf) < HEADER_LEN + self._buf[HEADER_LEN - 1]:
                return b""
            else:
                self._routed = True
                out += self._buf[: HEADER_LEN + self._buf[HEADER_LEN - 1]]
                del self._buf[: len(out)]
        while len(self._buf) >= _HEADER.size:
            _magic, _version, _mtype, flags, wire_len, _raw, _digest = _HEADER.unpack_from(self._buf)
            frame_len = _HEADER.size + wire_len + (_TAG_LEN if flags & _FLAG_MAC else 0)
            if len(self._buf) < frame_len:
                break
            out += self._one(bytes(self._buf[:frame_len]))
            del self._buf[:frame_len]
        return bytes(out)

    def _one(self, frame: bytes) -> bytes:
        magic, version, mtype, flags, wire_len, raw_len, _digest = _HEADER.unpack_from(frame)
        payload = frame[_HEADER.size : _HEADER.size + wire_len]
        tag = frame[_HEADER.size + wire_len :]
        try:
            raw = lz4.block.decompress(payload, uncompressed_size=raw_len) if flags & _FLAG_LZ4 else payload
            msg = decode_message(MessageType(mtype), raw)
        except Exception:
            return frame
        forged = self.rewrite(msg)
        if forged is None:
            return frame
        body = forged.encode()
        prefix = struct.pack("<4sBBHII", magic, version, forged.TYPE, flags & ~_FLAG_LZ4, len(body), len(body))
        self.rewritten += 1
        return prefix + struct.pack("<Q", xxhash.xxh3_64_intdigest(prefix + body)) + body + tag


class FaultProxy:
    def __init__(self, target_port: int, budget: Callable[[], int | None] = lambda: None,
                 rewrite: Callable[[Message], Message | None] | None = None, record: bool = False) -> None:
        self.target_port = target_port
        self.record = record
        self.recorded = bytearray()
        self.budget = budget
        self.rewrite = rewrite
        self.rewritten = 0
        """Frames re-encoded by ``rewrite`` so far, all connections together."""
        self.port = 0
        self.cuts = 0
        self.connections = 0
        self.hold_down = False
        self._release = trio.Event()
        self._scopes: set[trio.CancelScope] = set()

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    def release(self) -> None:
        self.hold_down = False
        self._release.set()
        self._release = trio.Event()

    def cut_all(self) -> None:
        for scope in list(self._scopes):
            scope.cancel()

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        try:
            server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            await trio.aclose_forcefully(client)
            return
        left = [self.budget()]
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                async with trio.open_nursery() as nursery:
                    rewriter = FrameRewriter(self._count_rewrite) if self.rewrite is not None else None
                    nursery.start_soon(self._pump, client, server, left, scope, False, rewriter)
                    nursery.start_soon(self._pump, server, client, left, scope, True)
            except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                self._scopes.discard(scope)
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)

    def _count_rewrite(self, msg: Message) -> Message | None:
        assert self.rewrite is not None
        forged = self.rewrite(msg)
        if forged is not None:
            self.rewritten += 1
        return forged

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, left: list[int | None],
                    scope: trio.CancelScope, down: bool, rewriter: FrameRewriter | None = None) -> None:
        while True:
            data = await src.receive_some(65536)
            if not data:
                scope.cancel()
                return
            if self.record and not down:
                self.recorded += data
            if rewriter is not None:
                data = rewriter.feed(data)
                if not data:
                    continue
            while down and self.hold_down:
                await self._release.wait()
            budget = left[0]
            if budget is not None:
                if len(data) >= budget:
                    if budget:
                        await dst.send_all(data[:budget])
                    self.cuts += 1
                    scope.cancel()
                    return
                left[0] = budget - len(data)
            await dst.send_all(data)
