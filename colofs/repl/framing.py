"""Sending frames without stalling the event loop, and counting what compression saves.

Encoding a 4 MiB batch (join, lz4, xxh3, and the MAC's pass over the
payload) takes milliseconds; on the loop that would delay every FUSE request
of the host. :class:`FrameSender` encodes bulk frames in a worker thread (lz4
and hashlib release the GIL) and writes them through the connection's one
:class:`~colofs.wire.stream.FrameWriter`, shared with its
:class:`~colofs.wire.stream.FrameStream`, so frames never interleave and MAC
counters follow the wire order. Receiving stays with the ``FrameStream``,
which also ran the handshake and may hold bytes the peer sent right after it.

Compression adapts: when recent bulk frames did not shrink (encrypted or
already compressed guest data), lz4 is skipped for a while and then tried
again, so incompressible data does not cost CPU for nothing.
"""

from __future__ import annotations

import trio

from colofs.wire.messages import Batch, Message, MessageType, ResyncData
from colofs.wire.stream import FrameStream

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
    """Sends whole frames on ``fs``'s stream, bulk ones encoded off the loop; frames never interleave."""

    def __init__(self, fs: FrameStream) -> None:
        self.writer = fs.writer
        self.bulk_raw = 0
        """Payload bytes of bulk frames before compression."""
        self.bulk_wire = 0
        """The same frames' payload bytes as sent."""
        self._ratio = 0.5
        self._skip = 0

    def _compress_next(self) -> bool:
        if self._skip:
            self._skip -= 1
            return False
        return True

    async def send(self, msg: Message) -> None:
        bulk = msg.TYPE in _BULK
        compress = self._compress_next() if bulk else False
        writer = self.writer
        if bulk and bulk_bytes(msg) >= THREAD_ENCODE_MIN:
            frame = await trio.to_thread.run_sync(writer.encode, msg, compress)
        else:
            frame = writer.encode(msg, compress)
        raw_len = frame.raw_len
        if bulk:
            self.bulk_raw += raw_len
            self.bulk_wire += len(frame.payload)
            if compress and raw_len:
                self._ratio = 0.8 * self._ratio + 0.2 * (len(frame.payload) / raw_len)
                if self._ratio > _POOR_RATIO:
                    self._skip = _PROBE_EVERY
                    self._ratio = 0.9  # one good probe brings compression back
        await writer.write(frame)
