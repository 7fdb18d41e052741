"""The route preamble on real loopback TCP: read exactly, refused with the reason, never read past.

Each test sends bytes from a client socket and reads them with the server
side's stream; whatever the preamble reader did not take is read back
afterwards and must be exactly what followed the preamble's bytes.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from colofs.wire.errors import ProtocolError
from colofs.wire.route import ROUTE_MAGIC, RouteError, encode_route, peek_route, read_route

TAIL = b"\x16\x03\x01TLS-or-HELLO-bytes"
"""What follows a preamble on the wire: the next reader's, never the preamble reader's."""


@asynccontextmanager
async def _connection() -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream]]:
    """(client, server) ends of one TCP connection on 127.0.0.1."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    await listeners[0].aclose()
    try:
        yield client, server
    finally:
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)


async def _rest(stream: trio.SocketStream) -> bytes:
    """Everything left on ``stream`` until the peer's close."""
    got = b""
    with trio.fail_after(60):
        while chunk := await stream.receive_some(65536):
            got += chunk
    return got


def test_encode_layout() -> None:
    assert encode_route("vm0") == b"COLOROUT\x01\x03vm0"
    assert encode_route("a" * 64)[9] == 64
    assert RouteError.__mro__[1] is ProtocolError  # one except clause refuses it with the rest


@pytest.mark.parametrize("name", ["", "../etc", "a" * 65, "é", "-x", "a b"])
def test_encode_refuses_a_name_no_peer_takes(name: str) -> None:
    with pytest.raises(RouteError, match="VM name"):
        encode_route(name)


async def test_round_trip_reads_exactly_the_preamble() -> None:
    async with _connection() as (client, server):
        await client.send_all(encode_route("vm-1.a_b") + TAIL)
        await client.send_eof()
        assert await peek_route(server.socket, 60) is True
        assert await read_route(server, 60) == "vm-1.a_b"
        assert await _rest(server) == TAIL


async def test_round_trip_split_in_single_bytes() -> None:
    """A preamble arriving a byte at a time is still read whole, and nothing past it."""
    async with _connection() as (client, server):
        data = encode_route("vm7")
        async with trio.open_nursery() as nursery:
            got: list[str] = []

            async def read() -> None:
                got.append(await read_route(server, 60))

            nursery.start_soon(read)
            for b in data:
                await client.send_all(bytes([b]))
                await trio.testing.wait_all_tasks_blocked()
            await client.send_all(TAIL)
        assert got == ["vm7"]
        await client.send_eof()
        assert await _rest(server) == TAIL


@pytest.mark.parametrize(
    ("sent", "consumed", "says"),
    [
        (b"COLF\x01\x01\x00\x00" + b"\x00" * 16, 8, "bad magic"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03", 8, "bad magic"),
        (b"COLOROUT\x02\x03vm0", 10, "version 2"),
        (b"COLOROUT\x00\x03vm0", 10, "version 0"),
        (b"COLOROUT\x01\x00", 10, "empty"),
        (b"COLOROUT\x01\xff" + b"a" * 255, 10, "255 bytes claimed"),
        (b"COLOROUT\x01\x41" + b"a" * 65, 10, "65 bytes claimed"),
        (b"COLOROUT\x01\x06../etc", 16, "may use only letters"),
        (b"COLOROUT\x01\x03.vm", 13, "must start with a letter"),
        (b"COLOROUT\x01\x02\xff\xfe", 12, "not UTF-8"),
    ],
    ids=["hello-frame", "tls-hello", "version-2", "version-0", "length-0", "length-255", "length-65",
         "dotdot", "leading-dot", "not-utf8"],
)
async def test_malformed_refused_without_reading_past(sent: bytes, consumed: int, says: str) -> None:
    async with _connection() as (client, server):
        await client.send_all(sent + TAIL)
        await client.send_eof()
        with pytest.raises(RouteError, match=says):
            await read_route(server, 60)
        assert await _rest(server) == sent[consumed:] + TAIL


@pytest.mark.parametrize("sent", [b"COLO", b"COLOROUT\x01", b"COLOROUT\x01\x05vm"],
                         ids=["in-magic", "in-header", "in-name"])
async def test_stalled_preamble_times_out(sent: bytes) -> None:
    async with _connection() as (client, server):
        await client.send_all(sent)
        start = trio.current_time()
        with pytest.raises(RouteError, match="not complete after 0.5 s"):
            await read_route(server, 0.5)
        assert trio.current_time() - start >= 0.5


@pytest.mark.parametrize("sent", [b"", b"COLO", b"COLOROUT\x01\x05vm"], ids=["nothing", "in-magic", "in-name"])
async def test_closed_mid_preamble_refused(sent: bytes) -> None:
    async with _connection() as (client, server):
        await client.send_all(sent)
        await client.send_eof()
        with pytest.raises(RouteError, match=f"closed after {len(sent) if len(sent) < 8 else len(sent) - 10} of"):
            await read_route(server, 60)


# -- peek ---------------------------------------------------------------------------------------


async def test_peek_consumes_nothing_and_tells_a_frame_from_a_preamble() -> None:
    async with _connection() as (client, server):
        frame = b"COLF\x01\x01" + b"\x00" * 18
        await client.send_all(frame)
        await client.send_eof()
        assert await peek_route(server.socket, 60) is False
        assert await _rest(server) == frame


async def test_peek_decides_on_the_first_differing_byte() -> None:
    """Three bytes that cannot start the magic decide at once: no wait for eight."""
    async with _connection() as (client, server):
        await client.send_all(b"COX")
        with trio.fail_after(60):
            assert await peek_route(server.socket, 60) is False


async def test_peek_waits_for_the_whole_magic_without_spinning() -> None:
    """A prefix of the magic is not enough: the peek sleeps until more arrives, then answers."""
    async with _connection() as (client, server):
        result: list[bool] = []
        async with trio.open_nursery() as nursery:
            async def peek() -> None:
                result.append(await peek_route(server.socket, 60))

            nursery.start_soon(peek)
            await client.send_all(ROUTE_MAGIC[:3])
            with trio.fail_after(60):  # a peek that spun on the queued prefix would never block
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            assert result == []
            await client.send_all(ROUTE_MAGIC[3:7])
            with trio.fail_after(60):
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            assert result == []
            await client.send_all(ROUTE_MAGIC[7:] + b"\x01\x03vm0")
        assert result == [True]
        # The low-water mark it set while waiting is back to one byte, and nothing was consumed.
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
        assert await read_route(server, 60) == "vm0"


async def test_peek_prefix_then_close_is_not_a_preamble() -> None:
    async with _connection() as (client, server):
        await client.send_all(b"COLOR")
        await client.send_eof()
        with trio.fail_after(60):
            assert await peek_route(server.socket, 60) is False
        assert await _rest(server) == b"COLOR"


@pytest.mark.parametrize("sent", [b"", b"COLORO"], ids=["silent", "prefix"])
async def test_peek_times_out(sent: bytes) -> None:
    async with _connection() as (client, server):
        await client.send_all(sent)
        with pytest.raises(RouteError, match="after 0.5 s"):
            await peek_route(server.socket, 0.5)
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1


async def test_a_spent_budget_times_out_instead_of_failing() -> None:
    """Callers pass what is left of a handshake deadline, which may already be below zero."""
    async with _connection() as (client, server):
        with pytest.raises(RouteError, match="after 0 s"):
            await read_route(server, -0.1)
        with pytest.raises(RouteError, match="after"):
            await peek_route(server.socket, -0.1)
        await client.send_all(encode_route("vm0"))
        assert await read_route(server, 60) == "vm0"  # nothing consumed by the refusals
