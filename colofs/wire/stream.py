"""``FrameStream``: whole colofs messages over any ``trio.abc.Stream``.

The transport is deliberately abstract (a TCP ``SocketStream``, or a
``trio.SSLStream`` wrapping it), so framing, limits and authentication never
depend on how the bytes travel.

A connection has exactly one send path, :class:`FrameWriter`: whoever sends
on it (``FrameStream.send``, or ``colofs.repl.framing.FrameSender`` encoding
bulk frames in a worker thread) goes through it, so frames never interleave
and, once the handshake has agreed session keys, each frame's MAC counter is
the frame's real position in the stream.
"""

from __future__ import annotations

import errno
import hmac
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import trio

from colofs.wire.errors import ConnectionClosed, DecompressionBomb, FrameTooLarge
from colofs.wire.frames import (
    DEFAULT_MAX_RAW_LEN,
    DEFAULT_MAX_WIRE_LEN,
    FrameDecoder,
    encode_frame_parts,
)
from colofs.wire.mac import FrameMac, SessionKeys
from colofs.wire.messages import Message, MessageType

RECEIVE_CHUNK = 64 * 1024
"""Smallest read: many small frames (ACKs, PINGs) arrive per receive_some call."""

MAX_RECEIVE_CHUNK = 4 * 1024 * 1024
"""Largest read, used while the rest of a big frame is outstanding."""

_JOIN_BELOW = 64 * 1024
"""Frames smaller than this go out in one send_all (one syscall, no interleaving)."""


@dataclass(frozen=True, slots=True)
class EncodedFrame:
    """A frame ready to be written: header, payload, and its MAC so far (if authenticated)."""

    type: MessageType
    header: bytes
    payload: bytes
    partial_mac: hmac.HMAC | None

    @property
    def raw_len(self) -> int:
        return int.from_bytes(self.header[12:16], "little")


class FrameWriter:
    """The one send path of a connection: encoding, limits, MAC, and non-interleaved writes.

    :meth:`encode` is pure CPU and may run in a worker thread; :meth:`write`
    takes the lock, gives the frame its MAC counter and writes it, so counters
    follow the order frames really leave.  If a write is cancelled or fails
    part-way, the writer is broken for good: later writes raise
    ``trio.BrokenResourceError`` instead of corrupting the framing (or
    skipping a MAC counter the peer would refuse).
    """

    def __init__(self, stream: trio.abc.Stream, *, max_wire_len: int, max_raw_len: int) -> None:
        self.stream = stream
        self.max_wire_len = max_wire_len
        self.max_raw_len = max_raw_len
        self._mac: FrameMac | None = None
        self._lock = trio.Lock()
        self._broken = False
        self.bytes_sent = 0

    @property
    def authenticated(self) -> bool:
        """Frames carry a MAC tag (:meth:`require_mac` was called)."""
        return self._mac is not None

    def require_mac(self, mac: FrameMac) -> None:
        """MAC every frame encoded from now on with ``mac`` (the session's send direction)."""
        self._mac = mac

    def encode(self, msg: Message, compress: bool | None = None) -> EncodedFrame:
        """Encode ``msg`` and start its MAC; refuses a frame the peer would (``FrameTooLarge``)."""
        mac = self._mac
        header, payload = encode_frame_parts(msg, compress, mac=mac is not None)
        frame = EncodedFrame(msg.TYPE, header, payload, None)
        if len(payload) > self.max_wire_len:
            raise FrameTooLarge(
                f"{msg.TYPE.name} payload {len(payload)} bytes exceeds the limit of "
                f"{self.max_wire_len}"
            )
        if frame.raw_len > self.max_raw_len:
            raise FrameTooLarge(
                f"{msg.TYPE.name} raw payload {frame.raw_len} bytes exceeds the limit of "
                f"{self.max_raw_len}"
            )
        if mac is None:
            return frame
        return EncodedFrame(msg.TYPE, header, payload, mac.absorb(payload))

    async def write(self, frame: EncodedFrame) -> None:
        """Write ``frame`` whole, after every frame whose write started before."""
        async with self._lock:
            if self._broken:
                raise trio.BrokenResourceError(
                    "an earlier send was interrupted mid-frame; the stream's framing is lost"
                )
            mac = self._mac
            if (frame.partial_mac is None) != (mac is None):
                raise RuntimeError(f"{frame.type.name} frame was encoded before the session keys changed")
            try:
                tag = mac.seal(frame.partial_mac, frame.header) if mac is not None else b""
                if len(frame.payload) < _JOIN_BELOW:
                    await self.stream.send_all(frame.header + frame.payload + tag)
                else:
                    await self.stream.send_all(frame.header)
                    await self.stream.send_all(frame.payload)
                    if tag:
                        await self.stream.send_all(tag)
            except BaseException:
                self._broken = True
                raise
            self.bytes_sent += len(frame.header) + len(frame.payload) + len(tag)


class FrameStream(trio.abc.AsyncResource):
    """Send and receive whole messages on a byte stream.

    * One task may :meth:`send` while another :meth:`receive`\\ s.  Concurrent
      senders are serialised by a lock so their frames never interleave; a
      second concurrent receiver gets ``trio.BusyResourceError``.
    * :meth:`receive` reads in chunks of at least 64 KiB but never asks for
      more than the current frame still needs once past that size, so at most
      one frame within the limits (plus one chunk) is ever buffered, and a
      frame over the limits is refused from its header alone.
    * :meth:`receive` is cancellation-safe: a cancelled call loses no bytes.
      :meth:`send` is not (nothing over a byte stream can be): if it is
      cancelled or fails mid-frame, later sends raise
      ``trio.BrokenResourceError`` instead of corrupting the framing.
    * Both ends are assumed to share the limits, so :meth:`send` refuses a
      message the peer would refuse (``FrameTooLarge``) before writing a byte,
      leaving the stream usable.
    * After :meth:`require_mac` (the handshake calls it) every frame in both
      directions carries a MAC; a frame that fails it raises
      :class:`~colofs.wire.errors.BadMac`.
    * Transport errors (``trio.BrokenResourceError``, ``OSError``) propagate
      unchanged; decoding errors are :class:`~colofs.wire.errors.ProtocolError`.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        max_wire_len: int = DEFAULT_MAX_WIRE_LEN,
        max_raw_len: int = DEFAULT_MAX_RAW_LEN,
    ) -> None:
        self._stream = stream
        self._decoder = FrameDecoder(max_wire_len=max_wire_len, max_raw_len=max_raw_len)
        self._writer = FrameWriter(stream, max_wire_len=max_wire_len, max_raw_len=max_raw_len)
        self._receiving = False
        self._recv_into = _recv_into_of(stream)

    @property
    def writer(self) -> FrameWriter:
        """The connection's one send path (for another sender sharing this stream)."""
        return self._writer

    @property
    def authenticated(self) -> bool:
        """Frames are MAC'd in both directions."""
        return self._decoder.authenticated and self._writer.authenticated

    def require_mac(self, keys: SessionKeys) -> None:
        """MAC every later frame both ways with the session's keys; call it on a frame boundary."""
        self._decoder.require_mac(FrameMac(keys.receive))
        self._writer.require_mac(FrameMac(keys.send))

    @contextmanager
    def limited(self, max_len: int, why: str) -> Iterator[None]:
        """Refuse received frames over ``max_len`` bytes inside the block (the handshake's).

        A peer that has not proved anything yet cannot make this node buffer a
        full-size frame; ``why`` names the phase in the refusal.
        """
        decoder = self._decoder
        saved = decoder.max_wire_len, decoder.max_raw_len
        decoder.max_wire_len = min(max_len, saved[0])
        decoder.max_raw_len = min(max_len, saved[1])
        try:
            yield
        except (FrameTooLarge, DecompressionBomb) as exc:
            raise type(exc)(f"{exc} ({why} frames are limited to {max_len} bytes)") from None
        finally:
            decoder.max_wire_len, decoder.max_raw_len = saved

    @property
    def stream(self) -> trio.abc.Stream:
        """The underlying byte stream."""
        return self._stream

    @property
    def max_wire_len(self) -> int:
        """Largest accepted payload as on the wire."""
        return self._decoder.max_wire_len

    @property
    def max_raw_len(self) -> int:
        """Largest accepted payload after decompression."""
        return self._decoder.max_raw_len

    async def send(self, msg: Message, *, compress: bool | None = None) -> None:
        """Encode ``msg`` into one frame and write it (see ``encode_frame_parts``)."""
        writer = self._writer
        await writer.write(writer.encode(msg, compress))

    async def receive(self) -> Message:
        """Return the next message.

        Raises :class:`ConnectionClosed` when the peer closed on a frame
        boundary, :class:`TruncatedFrame` when it closed mid-frame, another
        :class:`ProtocolError` for anything malformed.
        """
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this FrameStream")
        self._receiving = True
        try:
            decoder = self._decoder
            recv_into = self._recv_into
            while True:
                msg = decoder.next_message()
                if msg is not None:
                    return msg
                want = min(max(decoder.needed, RECEIVE_CHUNK), MAX_RECEIVE_CHUNK)
                if recv_into is None:
                    data = await self._stream.receive_some(want)
                    if not data:
                        decoder.feed_eof()
                    decoder.feed(data)
                    continue
                with decoder.receive_buffer(want) as room:
                    try:
                        n = await recv_into(room, want)
                    except OSError as exc:  # as trio.SocketStream.receive_some reports them
                        if exc.errno == errno.EBADF:
                            raise trio.ClosedResourceError("this socket was already closed") from None
                        raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
                if not n:
                    decoder.feed_eof()
                decoder.received(n)
        finally:
            self._receiving = False

    def __aiter__(self) -> FrameStream:
        return self

    async def __anext__(self) -> Message:
        """Iterate over messages until the peer closes cleanly."""
        try:
            return await self.receive()
        except ConnectionClosed:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        """Close the underlying stream."""
        await self._stream.aclose()


def _recv_into_of(stream: trio.abc.Stream) -> Callable[[memoryview, int], Awaitable[int]] | None:
    """The socket's ``recv_into`` under a plain TCP stream (bytes land in the decoder's buffer), else None.

    Other streams (TLS, in-memory ones in tests) only offer ``receive_some``,
    whose ``bytes`` are then copied into the decoder.
    """
    if type(stream) is trio.SocketStream:
        return stream.socket.recv_into
    return None


__all__ = ["MAX_RECEIVE_CHUNK", "RECEIVE_CHUNK", "EncodedFrame", "FrameStream", "FrameWriter"]
