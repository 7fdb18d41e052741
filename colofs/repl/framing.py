"""Sending frames without stalling the event loop, and counting what compression saves.

Encoding a 4 MiB batch (join, lz4, xxh3) takes milliseconds; on the loop
that would delay every FUSE request of the host. :class:`FrameSender`
encodes bulk frames in a worker thread (lz4 releases the GIL) and writes
them under a lock so frames never interleave. Receiving stays with
:class:`~colofs.wire.stream.FrameStream`, which also ran the handshake and
may hold bytes the peer sent right after it.

Compression adapts: when recent bulk frames did not shrink (encrypted or
already compressed guest data), lz4 is skipped for a while and then tried
again, so incompressible data does not cost CPU for nothing.
"""

from __future__ import annotations

import trio

from colofs.wire.errors import FrameTooLarge
from colofs.wire.frames import encode_frame_parts
from colofs.wire.messages import Batch, Message, MessageType, ResyncData

THREAD_ENCODE_MIN = 128 << 10
_BULK = (MessageType.BATCH, MessageType.RESYNC_DATA)
_PROBE_EVERY = 32
_POOR_RATIO = 0.95


def bulk_bytes(msg: Message) -> int:
    """Write data a frame carries: what encoding costs, and what a receiver's budget counts."""
    if isinstance(msg, Batch):
        return msg.data_bytes
    if isinstance(msg, ResyncData):
        return sum(len(b.data) for b in msg.blocks)
    return 0


class FrameSender:
    """Writes whole frames to a stream; one task at a time, frames never interleave."""

    def __init__(self, stream: trio.abc.Stream, *, max_wire_len: int, max_raw_len: int) -> None:
        self.stream = stream
        self.max_wire_len = max_wire_len
        self.max_raw_len = max_raw_len
        self._lock = trio.Lock()
        self._broken = False
        self.bulk_raw = 0
        """Payload bytes of bulk frames before compression."""
        self.bulk_wire = 0
        """The same frames' payload bytes as sent."""
        self.bytes_sent = 0
        self._ratio = 0.5
        self._skip = 0

    @property
    def lz4_ratio(self) -> float | None:
        """Wire bytes per raw byte of bulk frames so far (1.0: nothing saved)."""
        return self.bulk_wire / self.bulk_raw if self.bulk_raw else None

    def _compress_next(self) -> bool:
        if self._skip:
            self._skip -= 1
            return False
        return True

    async def send(self, msg: Message) -> None:
        bulk = msg.TYPE in _BULK
        compress = self._compress_next() if bulk else False
        if bulk and bulk_bytes(msg) >= THREAD_ENCODE_MIN:
            header, payload = await trio.to_thread.run_sync(encode_frame_parts, msg, compress)
        else:
            header, payload = encode_frame_parts(msg, compress)
        raw_len = int.from_bytes(header[12:16], "little")
        if len(payload) > self.max_wire_len or raw_len > self.max_raw_len:
            raise FrameTooLarge(
                f"{msg.TYPE.name} frame of {raw_len} bytes exceeds the limits "
                f"({self.max_raw_len} raw, {self.max_wire_len} on the wire)"
            )
        if bulk:
            self.bulk_raw += raw_len
            self.bulk_wire += len(payload)
            if compress and raw_len:
                self._ratio = 0.8 * self._ratio + 0.2 * (len(payload) / raw_len)
                if self._ratio > _POOR_RATIO:
                    self._skip = _PROBE_EVERY
                    self._ratio = 0.9  # one good probe brings compression back
        async with self._lock:
            if self._broken:
                raise trio.BrokenResourceError("an earlier send was interrupted mid-frame")
            try:
                if len(payload) < 65536:
                    await self.stream.send_all(header + payload)
                else:
                    await self.stream.send_all(header)
                    await self.stream.send_all(payload)
            except BaseException:
                self._broken = True
                raise
            self.bytes_sent += len(header) + len(payload)
