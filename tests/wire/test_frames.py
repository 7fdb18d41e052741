"""Frame codec and FrameStream: layout, compression, splitting, and every refusal."""

from __future__ import annotations

import os
import struct

import lz4.block
import pytest
import trio
import trio.testing
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from colofs.wire import (
    DEFAULT_MAX_RAW_LEN,
    DEFAULT_MAX_WIRE_LEN,
    Ack,
    BadCompression,
    BadFlags,
    BadMagic,
    BadVersion,
    Batch,
    ConnectionClosed,
    DecompressionBomb,
    DigestMismatch,
    DiskAdd,
    DiskInfo,
    FrameDecoder,
    FrameStream,
    FrameTooLarge,
    MalformedMessage,
    Message,
    MessageType,
    Ping,
    ProtocolError,
    ResyncBlock,
    ResyncData,
    TruncatedFrame,
    UnknownType,
    Write,
    decode_frame,
    encode_frame,
    encode_frame_parts,
)

from .test_messages import STRATEGIES, any_message


def craft_frame(
    mtype: int,
    payload: bytes,
    *,
    flags: int = 0,
    raw_len: int | None = None,
    wire_len: int | None = None,
    version: int = 1,
    magic: bytes = b"COLF",
    digest: int | None = None,
) -> bytes:
    """Build a frame by hand from the spec (independent of the encoder under test)."""
    wire_len = len(payload) if wire_len is None else wire_len
    raw_len = wire_len if raw_len is None else raw_len
    prefix = struct.pack("<4sBBHII", magic, version, mtype, flags, wire_len, raw_len)
    if digest is None:
        digest = xxhash.xxh3_64_intdigest(prefix + payload)
    return prefix + struct.pack("<Q", digest) + payload


def decode_all(data: bytes, **limits: int) -> list[Message]:
    decoder = FrameDecoder(**limits)
    decoder.feed(data)
    out = []
    while (msg := decoder.next_message()) is not None:
        out.append(msg)
    return out


def zero_batch(size: int = 64 * 1024) -> Batch:
    return Batch(1, (Write(0, 0, bytes(size)),))


# ----------------------------------------------------------------- layout & round trips


def test_encoder_matches_spec_layout() -> None:
    payload = struct.pack("<Q", 7)
    assert encode_frame(Ping(7)) == craft_frame(MessageType.PING, payload)
    header, body = encode_frame_parts(Ping(7))
    assert len(header) == 24 and body == payload


def test_compressed_frame_matches_spec_layout() -> None:
    msg = zero_batch()
    frame = encode_frame(msg)
    raw = msg.encode()
    magic, version, mtype, flags, wire_len, raw_len, digest = struct.unpack_from("<4sBBHIIQ", frame)
    assert (magic, version, mtype, flags) == (b"COLF", 1, MessageType.BATCH, 1)
    assert raw_len == len(raw) and wire_len == len(frame) - 24 < raw_len
    assert digest == xxhash.xxh3_64_intdigest(frame[:16] + frame[24:])
    assert lz4.block.decompress(frame[24:], uncompressed_size=raw_len) == raw


@pytest.mark.parametrize("compress", [None, False, True])
@given(msg=any_message)
def test_frame_roundtrip(compress: bool | None, msg: Message) -> None:
    frame = encode_frame(msg, compress)
    assert decode_frame(frame) == msg


@pytest.mark.parametrize("mtype", list(MessageType), ids=lambda t: t.name)
@given(data=st.data())
@settings(max_examples=20)
def test_frame_roundtrip_every_type_compressed(mtype: MessageType, data: st.DataObject) -> None:
    msg = data.draw(STRATEGIES[mtype])
    assert decode_frame(encode_frame(msg, True)) == msg


def test_compression_kept_only_when_smaller() -> None:
    random_batch = Batch(1, (Write(0, 0, os.urandom(64 * 1024)),))
    header, payload = encode_frame_parts(random_batch, True)
    assert struct.unpack_from("<H", header, 6)[0] == 0  # lz4 would have grown it
    assert payload == random_batch.encode()
    header, payload = encode_frame_parts(zero_batch(), True)
    assert struct.unpack_from("<H", header, 6)[0] == 1
    assert len(payload) < 1024


def test_default_compresses_bulk_types_only() -> None:
    def flags(msg: Message, compress: bool | None = None) -> int:
        return struct.unpack_from("<H", encode_frame_parts(msg, compress)[0], 6)[0]

    resync = ResyncData(0, 65536, (ResyncBlock(0, bytes(65536)),))
    assert flags(zero_batch()) == 1
    assert flags(resync) == 1
    assert flags(zero_batch(), False) == 0
    big_disk = DiskAdd(0, DiskInfo("a" * 200, 0, 4096))  # compressible, but not bulk data
    assert flags(big_disk) == 0
    assert flags(big_disk, True) == 1


@given(
    msgs=st.lists(any_message, min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
)
def test_decoder_any_chunking(msgs: list[Message], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(m) for m in msgs)
    points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    decoder = FrameDecoder()
    out = []
    for a, b in zip(points, points[1:], strict=False):
        decoder.feed(stream[a:b])
        while (msg := decoder.next_message()) is not None:
            out.append(msg)
    assert out == msgs
    with pytest.raises(ConnectionClosed):
        decoder.feed_eof()


def test_decoder_split_at_every_byte_boundary() -> None:
    msgs = [Ping(1), zero_batch(300), Ack(2)]
    stream = b"".join(encode_frame(m) for m in msgs)
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        out = []
        for piece in (stream[:cut], stream[cut:]):
            decoder.feed(piece)
            while (msg := decoder.next_message()) is not None:
                out.append(msg)
        assert out == msgs, cut
    decoder = FrameDecoder()  # and one byte at a time
    out = []
    for i in range(len(stream)):
        decoder.feed(stream[i : i + 1])
        while (msg := decoder.next_message()) is not None:
            out.append(msg)
    assert out == msgs


async def test_stream_split_at_every_byte_boundary() -> None:
    """Each piece is its own send_all on a lockstep stream, so receive_some sees the cut."""
    msgs = [Batch(9, (Write(1, 512, b"data" * 10),)), Ping(3)]
    stream = b"".join(encode_frame(m) for m in msgs)
    for cut in range(1, len(stream)):
        left, right = trio.testing.lockstep_stream_pair()
        received: list[Message] = []

        async def sender(
            data: bytes = stream, cut: int = cut, left: trio.abc.Stream = left
        ) -> None:
            await left.send_all(data[:cut])
            await left.send_all(data[cut:])
            await left.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            fs = FrameStream(right)
            received.extend([m async for m in fs])
        assert received == msgs, cut


async def test_stream_byte_at_a_time() -> None:
    msgs = [Ping(1), Ack(5)]
    data = b"".join(encode_frame(m) for m in msgs)
    left, right = trio.testing.lockstep_stream_pair()

    async def sender() -> None:
        for i in range(len(data)):
            await left.send_all(data[i : i + 1])
        await left.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        assert [m async for m in FrameStream(right)] == msgs


# ----------------------------------------------------------------- refusals (sans I/O)


def test_bad_magic() -> None:
    frame = craft_frame(MessageType.PING, bytes(8), magic=b"COLX")
    with pytest.raises(BadMagic, match="b'COLX'"):
        decode_all(frame)


def test_bad_magic_detected_from_the_first_byte() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"G")  # e.g. an HTTP client
    with pytest.raises(BadMagic):
        decoder.next_message()


def test_tls_client_hello_is_named_as_such() -> None:
    """A peer configured for TLS meeting a node without: the refusal says what the bytes are."""
    decoder = FrameDecoder()
    decoder.feed(b"\x16\x03\x01\x02\x00")
    with pytest.raises(BadMagic, match="the peer starts TLS"):
        decoder.next_message()


def test_bad_version() -> None:
    with pytest.raises(BadVersion, match="frame version 2"):
        decode_all(craft_frame(MessageType.PING, bytes(8), version=2))


@pytest.mark.parametrize("mtype", [0, 14, 19, 255])
def test_unknown_type(mtype: int) -> None:
    with pytest.raises(UnknownType, match=f"unknown frame type {mtype}"):
        decode_all(craft_frame(mtype, bytes(8)))


@pytest.mark.parametrize("flags", [0x4, 0x8000, 0x5])
def test_bad_flags(flags: int) -> None:
    with pytest.raises(BadFlags, match="undefined bits"):
        decode_all(craft_frame(MessageType.PING, bytes(8), flags=flags))


def test_oversize_wire_len_refused_from_the_header() -> None:
    header = craft_frame(MessageType.BATCH, b"", wire_len=40_000_000)
    decoder = FrameDecoder()
    decoder.feed(header)  # the payload never arrives
    with pytest.raises(
        FrameTooLarge, match="frame payload 40000000 bytes exceeds the limit of 33554432"
    ):
        decoder.next_message()


def test_custom_limits() -> None:
    frame = encode_frame(Batch(1, (Write(0, 0, os.urandom(2000)),)))
    with pytest.raises(FrameTooLarge, match="exceeds the limit of 1000"):
        decode_all(frame, max_wire_len=1000)
    compressed = encode_frame(zero_batch(5000))
    with pytest.raises(DecompressionBomb, match="exceeding the limit of 4000"):
        decode_all(compressed, max_raw_len=4000)


def test_lz4_bomb_refused_from_the_header() -> None:
    header = craft_frame(
        MessageType.BATCH, b"", flags=1, wire_len=1000, raw_len=DEFAULT_MAX_RAW_LEN + 1
    )
    decoder = FrameDecoder()
    decoder.feed(header)
    with pytest.raises(DecompressionBomb, match=f"claims {DEFAULT_MAX_RAW_LEN + 1} bytes"):
        decoder.next_message()


def test_digest_mismatch_on_corrupt_payload() -> None:
    frame = bytearray(encode_frame(Ping(42)))
    frame[-1] ^= 0x01
    with pytest.raises(DigestMismatch, match="does not match"):
        decode_all(bytes(frame))


def test_digest_mismatch_on_corrupt_digest() -> None:
    good = encode_frame(Ping(42))
    (digest,) = struct.unpack_from("<Q", good, 16)
    with pytest.raises(DigestMismatch):
        decode_all(craft_frame(MessageType.PING, good[24:], digest=digest ^ 1 << 40))


def test_corrupt_lz4() -> None:
    payload = b"\xff" * 20  # a literal run whose length points past the input
    with pytest.raises(BadCompression, match="does not decompress"):
        decode_all(craft_frame(MessageType.BATCH, payload, flags=1, raw_len=100))


def test_lz4_shorter_than_raw_len() -> None:
    raw = Ping(5).encode() * 8
    packed = lz4.block.compress(raw, store_size=False)
    assert len(packed) < len(raw) + 1
    frame = craft_frame(MessageType.PING, packed, flags=1, raw_len=len(raw) + 1)
    with pytest.raises(BadCompression, match=f"decompressed to {len(raw)} bytes"):
        decode_all(frame)


def test_compressed_not_smaller_refused() -> None:
    with pytest.raises(BadCompression, match="not smaller"):
        decode_all(craft_frame(MessageType.BATCH, bytes(10), flags=1, raw_len=10))


def test_uncompressed_raw_len_mismatch_refused() -> None:
    with pytest.raises(BadCompression, match="declares raw size 9 but carries 8"):
        decode_all(craft_frame(MessageType.PING, bytes(8), raw_len=9))


def test_trailing_bytes_in_payload() -> None:
    with pytest.raises(MalformedMessage, match="1 trailing bytes"):
        decode_all(craft_frame(MessageType.PING, bytes(9)))


def test_trailing_bytes_in_compressed_payload() -> None:
    raw = zero_batch(1000).encode() + b"\x00"
    packed = lz4.block.compress(raw, store_size=False)
    with pytest.raises(MalformedMessage, match="trailing bytes"):
        decode_all(craft_frame(MessageType.BATCH, packed, flags=1, raw_len=len(raw)))


def test_truncated_payload() -> None:
    frame = encode_frame(Ping(1))
    decoder = FrameDecoder()
    decoder.feed(frame[:-3])
    assert decoder.next_message() is None
    with pytest.raises(TruncatedFrame, match="29 bytes into a 32-byte PING frame"):
        decoder.feed_eof()


def test_eof_mid_header() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(Ping(1))[:10])
    assert decoder.next_message() is None
    with pytest.raises(TruncatedFrame, match="after 10 of the 24 frame header bytes"):
        decoder.feed_eof()


def test_eof_between_frames() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(Ping(1)))
    assert decoder.next_message() == Ping(1)
    with pytest.raises(ConnectionClosed):
        decoder.feed_eof()


def test_decoder_stays_failed_after_an_error() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"XXXX")
    with pytest.raises(BadMagic):
        decoder.next_message()
    with pytest.raises(BadMagic):
        decoder.feed(encode_frame(Ping(1)))
    with pytest.raises(BadMagic):
        decoder.next_message()


def test_decode_frame_wants_exactly_one_frame() -> None:
    frame = encode_frame(Ping(1))
    with pytest.raises(TruncatedFrame):
        decode_frame(frame[:-1])
    with pytest.raises(MalformedMessage, match="5 bytes follow the frame"):
        decode_frame(frame + b"COLF\x01")


def test_invalid_limits_refused() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(max_wire_len=-1)
    with pytest.raises(ValueError):
        FrameDecoder(max_raw_len=2**32)


def test_errors_are_protocol_errors() -> None:
    for cls in (
        BadMagic,
        BadVersion,
        UnknownType,
        BadFlags,
        FrameTooLarge,
        DecompressionBomb,
        DigestMismatch,
        BadCompression,
        MalformedMessage,
        ConnectionClosed,
        TruncatedFrame,
    ):
        assert issubclass(cls, ProtocolError)
    assert not issubclass(TruncatedFrame, ConnectionClosed)


# ----------------------------------------------------------------- FrameStream


async def test_stream_roundtrip_both_directions() -> None:
    a, b = trio.testing.memory_stream_pair()
    fa, fb = FrameStream(a), FrameStream(b)
    batch = Batch(1, [Write(0, i * 4096, os.urandom(4096)) for i in range(64)])
    await fa.send(batch)
    await fa.send(zero_batch(1 << 20))
    await fb.send(Ack(64))
    assert await fb.receive() == batch
    assert await fb.receive() == zero_batch(1 << 20)
    assert await fa.receive() == Ack(64)
    await fa.aclose()
    with pytest.raises(ConnectionClosed):
        await fb.receive()


async def test_many_small_frames_need_few_reads() -> None:
    send, recv = trio.testing.memory_stream_one_way_pair()
    reads = 0

    async def count() -> None:
        nonlocal reads
        reads += 1

    recv.receive_some_hook = count
    fs = FrameStream(trio.StapledStream(send, recv))
    await send.send_all(b"".join(encode_frame(Ping(i)) for i in range(500)))
    for i in range(500):
        assert await fs.receive() == Ping(i)
    assert reads == 1  # 16000 bytes in one 64 KiB read, not one read per frame or byte


class RecordingStream(trio.abc.Stream):
    """A real in-memory stream that records how much each receive_some asked for."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.asked: list[int] = []
        self.got = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        self.asked.append(max_bytes)
        data = await self.inner.receive_some(max_bytes)
        self.got += len(data)
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_receive_never_buffers_more_than_a_chunk_past_the_frame() -> None:
    a, b = trio.testing.memory_stream_pair()
    rec = RecordingStream(b)
    fs = FrameStream(rec)
    big = Batch(1, (Write(0, 0, os.urandom(3 << 20)),))
    frames = [encode_frame(big), *(encode_frame(Ping(i)) for i in range(5000))]
    await a.send_all(b"".join(frames))  # everything is available at once
    assert await fs.receive() == big
    assert rec.got <= len(frames[0]) + 65536
    assert all(n >= 65536 for n in rec.asked)
    assert max(rec.asked) <= 4 << 20


async def test_oversize_frame_refused_without_reading_the_payload() -> None:
    a, b = trio.testing.memory_stream_pair()
    fs = FrameStream(b)
    await a.send_all(craft_frame(MessageType.BATCH, b"", wire_len=DEFAULT_MAX_WIRE_LEN + 1))
    with trio.fail_after(5):  # the payload is never sent: refusal must not wait for it
        with pytest.raises(FrameTooLarge, match=f"{DEFAULT_MAX_WIRE_LEN + 1} bytes"):
            await fs.receive()


async def test_bomb_refused_without_reading_the_payload() -> None:
    a, b = trio.testing.memory_stream_pair()
    fs = FrameStream(b)
    await a.send_all(craft_frame(MessageType.BATCH, b"", flags=1, wire_len=100, raw_len=2**32 - 1))
    with trio.fail_after(5):
        with pytest.raises(DecompressionBomb):
            await fs.receive()


async def test_stream_eof_cases() -> None:
    a, b = trio.testing.memory_stream_pair()
    await a.send_all(encode_frame(Ping(1))[:5])
    await a.aclose()
    with pytest.raises(TruncatedFrame, match="after 5 of the 24"):
        await FrameStream(b).receive()
    a, b = trio.testing.memory_stream_pair()
    await a.send_all(encode_frame(Ping(1))[:30])
    await a.aclose()
    with pytest.raises(TruncatedFrame, match="30 bytes into a 32-byte PING frame"):
        await FrameStream(b).receive()


async def test_send_refuses_a_frame_over_the_limits_and_stays_usable() -> None:
    a, b = trio.testing.memory_stream_pair()
    fa, fb = FrameStream(a, max_wire_len=1000, max_raw_len=100_000), FrameStream(b)
    with pytest.raises(FrameTooLarge, match="exceeds the limit of 1000"):
        await fa.send(Batch(1, (Write(0, 0, os.urandom(2000)),)))
    with pytest.raises(FrameTooLarge, match="exceeds the limit of 100000"):
        await fa.send(zero_batch(200_000))
    await fa.send(Ping(9))
    assert await fb.receive() == Ping(9)


async def test_concurrent_senders_do_not_interleave() -> None:
    a, b = trio.testing.memory_stream_pair()
    fa, fb = FrameStream(a), FrameStream(b)
    msgs = [Batch(i * 10, (Write(0, 0, os.urandom(200_000)),)) for i in range(6)]
    async with trio.open_nursery() as nursery:
        for m in msgs:
            nursery.start_soon(fa.send, m)
    got = [await fb.receive() for _ in msgs]
    assert sorted(got, key=lambda m: m.first_seq) == msgs


async def test_send_cancelled_mid_frame_breaks_the_stream() -> None:
    a, b = trio.testing.lockstep_stream_pair()
    fa = FrameStream(a)
    async def cancel_once_stalled(scope: trio.CancelScope) -> None:
        await trio.testing.wait_all_tasks_blocked()  # the send is stuck after the first 10 bytes
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.receive_some, 10)  # the peer takes 10 bytes, then stalls
        with trio.CancelScope() as scope:
            nursery.start_soon(cancel_once_stalled, scope)
            await fa.send(zero_batch(1 << 20), compress=False)
    with pytest.raises(trio.BrokenResourceError, match="framing is lost"):
        await fa.send(Ping(1))


async def test_receive_is_cancellation_safe() -> None:
    a, b = trio.testing.memory_stream_pair()
    fb = FrameStream(b)
    frame = encode_frame(Ping(77))
    await a.send_all(frame[:10])
    async with trio.open_nursery() as nursery:

        async def cancel_once_waiting() -> None:
            await trio.testing.wait_all_tasks_blocked()  # receive() waits for the rest of the frame
            nursery.cancel_scope.cancel()

        nursery.start_soon(cancel_once_waiting)
        await fb.receive()
    await a.send_all(frame[10:])
    assert await fb.receive() == Ping(77)


async def test_second_concurrent_receiver_refused() -> None:
    a, b = trio.testing.memory_stream_pair()
    fb = FrameStream(b)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fb.receive)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await fb.receive()
        await FrameStream(a).send(Ping(1))


def test_default_limits() -> None:
    assert DEFAULT_MAX_WIRE_LEN == 32 * 1024 * 1024
    assert DEFAULT_MAX_RAW_LEN == 64 * 1024 * 1024


def test_4mib_batch_codec_is_fast() -> None:
    """A loose guard against accidental quadratic work (bench/wire_bench.py has numbers)."""
    import time

    batch = Batch(1, [Write(0, i * 4096, os.urandom(4096)) for i in range(1024)])
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        assert decode_frame(encode_frame(batch)) == batch
        best = min(best, time.perf_counter() - t0)
    assert best < 0.2
