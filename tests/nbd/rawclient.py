"""A raw NBD client for tests: sends exactly the bytes a test asks for, well-formed or not.

It speaks the fixed newstyle handshake and both reply formats, tracks which
cookies asked for reads (a simple read reply carries no length), and exposes
the socket so a test can send garbage and see the server hang up.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass, field

import trio

from colofs.nbd import protocol as p


class Closed(Exception):
    """The server closed the connection."""


@dataclass
class Reply:
    cookie: int
    error: int = 0
    data: bytes = b""
    extents: list[tuple[int, int]] = field(default_factory=list)
    message: str = ""


class RawClient:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.structured = False
        self.cookies = itertools.count(1)
        self.reads: dict[int, int] = {}
        self.size = 0
        self.tflags = 0
        self.block_size: tuple[int, int, int] | None = None

    @classmethod
    async def connect_unix(cls, path: str) -> RawClient:
        return cls(await trio.open_unix_socket(path))

    async def close(self) -> None:
        await trio.aclose_forcefully(self.stream)

    async def recv_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = await self.stream.receive_some(1 << 20)
            if not data:
                raise Closed
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def closed_by_server(self) -> bool:
        """Reads until the server hangs up (True), failing if it sends anything meanwhile."""
        try:
            data = await self.stream.receive_some(1 << 16)
        except trio.BrokenResourceError:
            return True
        assert not data, f"the server sent {data[:64]!r} instead of closing"
        return True

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    # -- handshake --------------------------------------------------------------

    async def greet(self, client_flags: int = p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES) -> int:
        magic, opt_magic, flags = p.GREETING.unpack(await self.recv_exact(p.GREETING.size))
        assert (magic, opt_magic) == (p.NBDMAGIC, p.IHAVEOPT)
        await self.send(struct.pack(">I", client_flags))
        return flags

    async def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; its replies up to and including the final one (ACK or an error)."""
        await self.send(p.OPTION_HEADER.pack(p.IHAVEOPT, opt, len(data)) + data)
        out = []
        while True:
            magic, ropt, rtype, length = p.OPTION_REPLY.unpack(await self.recv_exact(p.OPTION_REPLY.size))
            assert magic == p.OPT_REPLY_MAGIC and ropt == opt, (hex(magic), ropt, opt)
            out.append((rtype, await self.recv_exact(length)))
            if rtype == p.REP_ACK or rtype & (1 << 31):
                return out

    @staticmethod
    def go_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
        raw = name.encode()
        return struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos)) + b"".join(
            struct.pack(">H", i) for i in infos)

    @staticmethod
    def meta_data(name: str, queries: list[str]) -> bytes:
        raw = name.encode()
        out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
        for q in queries:
            out += struct.pack(">I", len(q.encode())) + q.encode()
        return out

    async def go(self, name: str, *, structured: bool = True, meta: bool = True) -> list[tuple[int, bytes]]:
        """Negotiate up to transmission on export ``name``; the GO replies (the last is ACK or an error)."""
        await self.greet()
        if structured:
            assert (await self.option(p.OPT_STRUCTURED_REPLY))[-1][0] == p.REP_ACK
            self.structured = True
            if meta:
                await self.option(p.OPT_SET_META_CONTEXT, self.meta_data(name, [p.META_BASE_ALLOCATION]))
        replies = await self.option(p.OPT_GO, self.go_data(name))
        for rtype, data in replies:
            if rtype == p.REP_INFO:
                (kind,) = struct.unpack_from(">H", data)
                if kind == p.INFO_EXPORT:
                    self.size, self.tflags = struct.unpack_from(">QH", data, 2)
                elif kind == p.INFO_BLOCK_SIZE:
                    self.block_size = struct.unpack_from(">III", data, 2)
        return replies

    # -- transmission -------------------------------------------------------------

    async def request(self, typ: int, offset: int, length: int, *, flags: int = 0, payload: bytes = b"") -> int:
        cookie = next(self.cookies)
        if typ == p.CMD_READ:
            self.reads[cookie] = length
        await self.send(p.pack_request(typ, cookie, offset, length, flags) + payload)
        return cookie

    async def reply(self) -> Reply:
        (magic,) = struct.unpack(">I", await self.recv_exact(4))
        if magic == p.SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", await self.recv_exact(12))
            n = self.reads.pop(cookie, 0)
            data = await self.recv_exact(n) if n and not error else b""
            return Reply(cookie, error, data)
        assert magic == p.STRUCTURED_REPLY_MAGIC, hex(magic)
        out: Reply | None = None
        while True:
            if out is not None:
                (magic,) = struct.unpack(">I", await self.recv_exact(4))
                assert magic == p.STRUCTURED_REPLY_MAGIC
            flags, typ, cookie, length = struct.unpack(">HHQI", await self.recv_exact(16))
            body = await self.recv_exact(length)
            out = out or Reply(cookie)
            if typ == p.REPLY_TYPE_OFFSET_DATA:
                out.data += body[8:]
            elif typ == p.REPLY_TYPE_BLOCK_STATUS:
                out.extents += [struct.unpack_from(">II", body, i) for i in range(4, len(body), 8)]
            elif typ & (1 << 15):
                out.error, mlen = struct.unpack_from(">IH", body)
                out.message = body[6 : 6 + mlen].decode()
            if flags & p.REPLY_FLAG_DONE:
                self.reads.pop(cookie, None)
                return out

    async def call(self, typ: int, offset: int, length: int, *, flags: int = 0, payload: bytes = b"") -> Reply:
        cookie = await self.request(typ, offset, length, flags=flags, payload=payload)
        r = await self.reply()
        assert r.cookie == cookie
        return r

    async def read(self, offset: int, length: int) -> bytes:
        r = await self.call(p.CMD_READ, offset, length)
        assert r.error == 0, (r.error, r.message)
        return r.data

    async def write(self, offset: int, data: bytes, flags: int = 0) -> Reply:
        return await self.call(p.CMD_WRITE, offset, len(data), flags=flags, payload=data)

    async def disconnect(self) -> None:
        await self.send(p.pack_request(p.CMD_DISC, next(self.cookies), 0, 0))
