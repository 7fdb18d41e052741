"""``FrameStream``: whole colofs messages over any ``trio.abc.Stream``.

The transport is deliberately abstract (a TCP ``SocketStream`` today, a
``trio.SSLStream`` wrapping it if TLS is added), so framing, limits and
authentication never depend on how the bytes travel.
"""

from __future__ import annotations

import trio

from colofs.wire.errors import ConnectionClosed, FrameTooLarge
from colofs.wire.frames import (
    DEFAULT_MAX_RAW_LEN,
    DEFAULT_MAX_WIRE_LEN,
    FrameDecoder,
    encode_frame_parts,
)
from colofs.wire.messages import Message

RECEIVE_CHUNK = 64 * 1024
"""Smallest read: many small frames (ACKs, PINGs) arrive per receive_some call."""

MAX_RECEIVE_CHUNK = 4 * 1024 * 1024
"""Largest read, used while the rest of a big frame is outstanding."""

_JOIN_BELOW = 64 * 1024
"""Frames smaller than this go out in one send_all (one syscall, no interleaving)."""


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
        self._send_lock = trio.Lock()
        self._send_broken = False
        self._receiving = False

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
        header, payload = encode_frame_parts(msg, compress)
        raw_len = int.from_bytes(header[12:16], "little")
        if len(payload) > self.max_wire_len:
            raise FrameTooLarge(
                f"{msg.TYPE.name} payload {len(payload)} bytes exceeds the limit of "
                f"{self.max_wire_len}"
            )
        if raw_len > self.max_raw_len:
            raise FrameTooLarge(
                f"{msg.TYPE.name} raw payload {raw_len} bytes exceeds the limit of "
                f"{self.max_raw_len}"
            )
        async with self._send_lock:
            if self._send_broken:
                raise trio.BrokenResourceError(
                    "an earlier send was interrupted mid-frame; the stream's framing is lost"
                )
            try:
                if len(payload) < _JOIN_BELOW:
                    await self._stream.send_all(header + payload)
                else:
                    await self._stream.send_all(header)
                    await self._stream.send_all(payload)
            except BaseException:
                self._send_broken = True
                raise

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
            while True:
                msg = decoder.next_message()
                if msg is not None:
                    return msg
                want = min(max(decoder.needed, RECEIVE_CHUNK), MAX_RECEIVE_CHUNK)
                data = await self._stream.receive_some(want)
                if not data:
                    decoder.feed_eof()
                decoder.feed(data)
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


__all__ = ["MAX_RECEIVE_CHUNK", "RECEIVE_CHUNK", "FrameStream"]
