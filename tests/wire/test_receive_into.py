"""Frames received straight into the decoder's buffer: FrameDecoder's lent room, FrameStream over a socket."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing

from colofs.wire import (
    Ack,
    Batch,
    ConnectionClosed,
    FrameDecoder,
    FrameStream,
    ResyncBlock,
    ResyncData,
    TruncatedFrame,
    Write,
    encode_frame,
)
from colofs.wire.frames import KEEP_BUFFER


def _batch(n: int, size: int = 4096) -> Batch:
    return Batch(1, tuple(Write(0, i * size, os.urandom(size // 2) * 2) for i in range(n)))


def _receive_in_pieces(decoder: FrameDecoder, data: bytes, piece: int) -> list[object]:
    out = []
    pos = 0
    while pos < len(data):
        n = min(piece, len(data) - pos)
        with decoder.receive_buffer(n) as room:
            room[:n] = data[pos : pos + n]
        decoder.received(n)
        pos += n
        while (msg := decoder.next_message()) is not None:
            out.append(msg)
    return out


@pytest.mark.parametrize("piece", [1, 7, 24, 4096, 1 << 20])
def test_lent_room_decodes_like_feed(piece: int) -> None:
    msgs = [Ack(5), _batch(3), ResyncData(2, 8192, (ResyncBlock(0, b"x" * 5000),)), Ack(9), _batch(40)]
    data = b"".join(encode_frame(m) for m in msgs)
    assert _receive_in_pieces(FrameDecoder(), data, piece) == msgs


def test_room_larger_than_written_keeps_only_what_was_received() -> None:
    decoder = FrameDecoder()
    frame = encode_frame(Ack(3))
    with decoder.receive_buffer(65536) as room:
        room[: len(frame)] = frame
    decoder.received(len(frame))
    assert decoder.buffered == len(frame)
    assert decoder.next_message() == Ack(3)
    assert decoder.buffered == 0
    with pytest.raises(ValueError):
        decoder.received(1 << 30)


def test_decoded_batch_survives_the_buffer_being_reused() -> None:
    decoder = FrameDecoder()
    first, second = _batch(4), _batch(4)
    got = _receive_in_pieces(decoder, encode_frame(first, compress=False), 1 << 20)
    _receive_in_pieces(decoder, encode_frame(second, compress=False), 1 << 20)
    assert got == [first]


def test_a_large_buffer_is_not_kept() -> None:
    decoder = FrameDecoder()
    big = _batch((KEEP_BUFFER // 4096) + 8)
    assert _receive_in_pieces(decoder, encode_frame(big, compress=False), 1 << 22) == [big]
    with decoder.receive_buffer(64) as room:
        assert len(room) == 64
    decoder.received(0)
    assert len(decoder._buf) <= KEEP_BUFFER


async def _socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def test_socket_stream_receives_into_the_decoder_not_through_receive_some(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = await _socket_pair()
    calls = []
    real = trio.SocketStream.receive_some

    async def counting(self: trio.SocketStream, max_bytes: int | None = None) -> bytes | bytearray:
        calls.append(max_bytes)
        return await real(self, max_bytes)

    msgs = [_batch(300), Ack(1), _batch(2)]
    async with FrameStream(a) as tx, FrameStream(b) as rx:
        monkeypatch.setattr(trio.SocketStream, "receive_some", counting)
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                for m in msgs:
                    await tx.send(m)
                await a.send_eof()

            nursery.start_soon(send)
            got = [m async for m in rx]
    assert got == msgs
    assert calls == []


async def test_socket_stream_eof_mid_frame_and_on_a_boundary() -> None:
    a, b = await _socket_pair()
    frame = encode_frame(_batch(5))
    async with FrameStream(b) as rx:
        await a.send_all(frame + frame[:100])
        await a.send_eof()
        assert isinstance(await rx.receive(), Batch)
        with pytest.raises(TruncatedFrame):
            await rx.receive()
    await a.aclose()
    c, d = await _socket_pair()
    async with FrameStream(d) as rx:
        await c.send_all(encode_frame(Ack(2)))
        await c.send_eof()
        assert await rx.receive() == Ack(2)
        with pytest.raises(ConnectionClosed):
            await rx.receive()
    await c.aclose()


async def test_socket_stream_receive_cancelled_loses_no_bytes() -> None:
    a, b = await _socket_pair()
    frame = encode_frame(_batch(64))
    async with FrameStream(b) as rx:
        await a.send_all(frame[:5000])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rx.receive)
            await trio.testing.wait_all_tasks_blocked()  # the receive waits for the rest of the frame
            nursery.cancel_scope.cancel()
        assert rx._decoder.buffered == 5000
        await a.send_all(frame[5000:])
        assert isinstance(await rx.receive(), Batch)
    await a.aclose()


async def test_socket_stream_closed_locally_is_a_closed_resource() -> None:
    a, b = await _socket_pair()
    rx = FrameStream(b)
    b.socket.close()
    with pytest.raises(trio.ClosedResourceError):
        await rx.receive()
    await a.aclose()
